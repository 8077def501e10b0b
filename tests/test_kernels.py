"""oneDNN float32 linears (dspark.target.kernels) against ATen's F.linear, the slow oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dspark.target import kernels
from dspark.target.kernels import (ALL_ROWS, PACK_ROWS, OneDNNLinear, aten_rows_from, choice_from, choose_aten_rows, kernel_name,
                                   linear, mkl_packed_works, onednn_works, pack_weight, set_linear_kernel)
from conftest import tiny_llama, tiny_target

pytestmark = pytest.mark.skipif(not onednn_works(), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_aten_on_every_row_count(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=g)
    bias = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(2, rows, 40, generator=g)  # [B, n, d] as the engines feed it
    with torch.no_grad():
        fast = linear(x, weight, bias)
    assert fast.shape == (2, rows, 96)
    torch.testing.assert_close(fast, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_linear_takes_a_non_contiguous_input():
    x = torch.randn(40, 6).t()  # [6, 40], strided
    weight = torch.randn(8, 40)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_gradients_fall_back_to_aten():
    layer = torch.nn.Linear(12, 5)
    set_linear_kernel(layer, "onednn")
    assert type(layer) is OneDNNLinear
    x = torch.randn(3, 12, requires_grad=True)
    layer(x).sum().backward()  # oneDNN's inference primitive has no backward: ATen must run
    assert x.grad is not None and layer.weight.grad is not None


def test_swap_keeps_parameters_tied_and_restores():
    model = tiny_llama(vocab_size=11, hidden=16)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's are
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert set_linear_kernel(model, "onednn") == "onednn"
    assert sum(type(m) is OneDNNLinear for m in model.modules()) == linears
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.state_dict().keys() == before.keys()
    assert set_linear_kernel(model, "aten") == "aten"
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())


def test_only_cpu_float32_weights_are_swapped():
    assert set_linear_kernel(torch.nn.Linear(4, 4).to(torch.bfloat16)) == "aten"
    with pytest.raises(ValueError, match="unknown linear kernel"):
        set_linear_kernel(torch.nn.Linear(4, 4), "fast")


def test_target_forward_agrees_across_kernels():
    from dspark.target import TargetModel

    fast = TargetModel(tiny_llama(vocab_size=32, hidden=32, layers=3), None, linear_kernel="onednn")
    slow = TargetModel(tiny_llama(vocab_size=32, hidden=32, layers=3), None, linear_kernel="aten")
    assert (fast.linear_kernel, slow.linear_kernel) == ("onednn", "aten")
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    a, b = fast.forward(ids, fast.new_cache(), layer_ids=(0, 1)), slow.forward(ids, slow.new_cache(), layer_ids=(0, 1))
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.features, b.features, rtol=1e-5, atol=1e-5)


def test_mixed_kernel_runs_aten_up_to_its_rows_and_onednn_above(monkeypatch):
    calls = []
    real = kernels._onednn_linear
    monkeypatch.setattr(kernels, "_onednn_linear", lambda x, w, b: calls.append(x.shape) or real(x, w, b))
    layer = torch.nn.Linear(40, 24)
    layer.__class__, layer.aten_rows = OneDNNLinear, 3
    with torch.no_grad():
        for rows in (1, 3, 4, 9):
            x = torch.randn(rows, 40)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer(torch.randn(2, 2, 40))  # [B, n, d]: 4 rows in all
    assert [tuple(s) for s in calls] == [(4, 40), (9, 40), (2, 2, 40)]


def test_the_choice_is_the_last_row_count_where_aten_never_loses():
    def ms(aten, onednn):
        return {"aten": dict(zip((1, 2, 4, 8), aten)), "onednn": dict(zip((1, 2, 4, 8), onednn))}

    assert aten_rows_from(ms([10, 11, 20, 30], [12, 16, 18, 20])) == 2
    assert aten_rows_from(ms([10, 11, 12, 13], [12, 16, 18, 20])) == ALL_ROWS
    assert aten_rows_from(ms([13, 11, 12, 13], [12, 16, 18, 20])) == 0  # not 2: it lost at 1 row
    assert [kernel_name(n) for n in (0, 2, ALL_ROWS)] == ["onednn", "aten<=2+onednn", "aten"]


needs_mkl = pytest.mark.skipif(not mkl_packed_works(), reason="this torch build has no MKL packed linear")


@needs_mkl
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_aten_on_every_row_count_it_takes(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=g)
    bias = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(1, rows, 40, generator=g)  # [B, n, d]: fewer rows are zero-padded to PACK_ROWS
    with torch.no_grad():
        fast = linear(x, weight, bias, aten_rows=0, packed=pack_weight(weight))
    assert fast.shape == (1, rows, 96)
    torch.testing.assert_close(fast, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_mkl
def test_the_packed_band_runs_between_aten_and_onednn(monkeypatch):
    packed_calls, onednn_calls = [], []
    real_packed, real_onednn = kernels._packed_linear, kernels._onednn_linear
    monkeypatch.setattr(kernels, "_packed_linear", lambda x, w, p, b: packed_calls.append(x.shape[-2]) or real_packed(x, w, p, b))
    monkeypatch.setattr(kernels, "_onednn_linear", lambda x, w, b: onednn_calls.append(x.shape[-2]) or real_onednn(x, w, b))
    layer = torch.nn.Linear(40, 24)
    layer.__class__, layer.aten_rows, layer.packed = OneDNNLinear, 3, pack_weight(layer.weight)
    with torch.no_grad():
        for rows in (1, 3, 4, PACK_ROWS, PACK_ROWS + 1):
            x = torch.randn(rows, 40)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert packed_calls == [4, PACK_ROWS] and onednn_calls == [PACK_ROWS + 1]


def test_the_packed_band_is_taken_only_where_it_beats_onednn():
    def ms(aten, onednn, mkl):
        rows = (1, 2, 4, 8, 16)
        return {"aten": dict(zip(rows, aten)), "onednn": dict(zip(rows, onednn)), "mkl": dict(zip(rows[:4], mkl))}

    assert choice_from(ms([10, 11, 20, 30, 40], [12, 16, 18, 20, 25], [15, 15, 15, 16])) == (2, True)
    assert choice_from(ms([10, 11, 20, 30, 40], [12, 16, 18, 20, 25], [15, 15, 15, 21])) == (2, False)  # lost at 8
    assert choice_from(ms([10, 11, 12, 13, 14], [12, 16, 18, 20, 25], [15, 15, 15, 16])) == (ALL_ROWS, False)
    assert choice_from({"aten": {1: 1.0}, "onednn": {1: 2.0}}) == (ALL_ROWS, False)  # no MKL probed
    assert [kernel_name(n, True) for n in (0, 3, 8)] == ["mkl<=8+onednn", "aten<=3+mkl<=8+onednn", "aten<=8+onednn"]


@needs_mkl
def test_auto_packs_every_weight_once_when_the_packed_band_wins(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "DISK_CACHE_BYTES", 0)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    monkeypatch.setattr(kernels, "probe", lambda *a, **k: {"aten": {1: 1.0, 4: 9.0}, "onednn": {1: 2.0, 4: 5.0},
                                                           "mkl": {1: 3.0, 4: 4.0}})
    model = tiny_llama(vocab_size=32, hidden=32, layers=2)
    model.lm_head.weight = model.model.embed_tokens.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_linear_kernel(model, "auto", cache_dir=tmp_path) == "aten<=1+mkl<=8+onednn"
    swapped = [m for m in model.modules() if isinstance(m, OneDNNLinear)]
    assert swapped and all(m.packed is not None for m in swapped)
    assert model.state_dict().keys() == before.keys() and model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        fast = model(ids).logits
        assert set_linear_kernel(model, "aten") == "aten"
        torch.testing.assert_close(fast, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any(hasattr(m, "packed") and vars(m).get("packed") is not None for m in model.modules())


def test_auto_probes_once_and_remembers_the_choice_on_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "DISK_CACHE_BYTES", 0)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    answers = iter([{"aten": {1: 1.0, 2: 5.0}, "onednn": {1: 2.0, 2: 3.0}},
                    {"aten": {1: 9.0, 2: 9.0}, "onednn": {1: 1.0, 2: 1.0}}])
    monkeypatch.setattr(kernels, "probe", lambda *a, **k: next(answers))
    model = tiny_llama(vocab_size=32, hidden=32, layers=2)
    assert set_linear_kernel(model, "auto", cache_dir=tmp_path) == "aten<=1+onednn"
    assert {m.aten_rows for m in model.modules() if isinstance(m, OneDNNLinear)} == {1}
    monkeypatch.setattr(kernels, "_CHOSEN", {})  # a new process: the file answers, no second probe
    assert set_linear_kernel(tiny_llama(vocab_size=32, hidden=32, layers=2), "auto", cache_dir=tmp_path) == "aten<=1+onednn"
    assert len(list((tmp_path / "kernels").glob("linear-*.json"))) == 1


def test_forward_keeps_only_the_feature_layers_and_the_last_logits(monkeypatch):
    """Issue 29 item 6: a prefill keeps the last position's logits and the requested layers'
    hidden states only (hooks), equal to what output_hidden_states gives; the model is never
    asked for every layer's states."""
    from dspark.target import TargetModel

    target = TargetModel(tiny_llama(vocab_size=32, hidden=32, layers=4), None, linear_kernel="aten")
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        oracle = target.model(input_ids=ids, output_hidden_states=True)
    hooks_before = len(target.model.model.layers[0]._forward_hooks)
    asked = []
    real = target.model.forward
    monkeypatch.setattr(target.model, "forward", lambda *a, **kw: asked.append(kw["output_hidden_states"]) or real(*a, **kw))
    out = target.forward(ids, None, layer_ids=(0, 2), return_last_hidden=True, logits_to_keep=1)
    assert asked == [False]
    torch.testing.assert_close(out.features, torch.cat([oracle.hidden_states[1], oracle.hidden_states[3]], -1))
    torch.testing.assert_close(out.last_hidden, oracle.hidden_states[-1])
    assert out.logits.shape == (2, 1, 32)
    torch.testing.assert_close(out.logits[:, 0], oracle.logits[:, -1])
    assert len(target.model.model.layers[0]._forward_hooks) == hooks_before  # ours are gone after the call


def test_top2_gap_is_the_next_tokens_top1_minus_top2_logit():
    from dspark.target import TargetModel

    target = TargetModel(tiny_llama(vocab_size=32, hidden=32, layers=2), None, linear_kernel="aten")
    with torch.no_grad():
        top = target.model(input_ids=torch.tensor([[3, 1, 4, 1, 5]])).logits[0, -1].topk(2).values
    assert target.top2_gap([3, 1, 4, 1, 5]) == pytest.approx(float(top[0] - top[1]), abs=1e-6)
