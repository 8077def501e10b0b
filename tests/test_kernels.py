"""Float32 CPU linear kernels and their per-row-count plans (dspark.target.kernels) against
ATen's F.linear, the slow oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dspark.target import kernels
from dspark.target.kernels import (ATEN, MKL, ONEDNN, PACK_ROWS, PLAN_ROWS, TALL, KernelPlan, OneDNNLinear, linear,
                                   mkl_packed_works, onednn_works, pack_weight, plan_from, set_linear_kernel)
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


MIXED = KernelPlan(((TALL, 2), (TALL, 2), (TALL, 4), (TALL, 4), (ONEDNN, 6), (ONEDNN, 6), (ATEN, 8), (TALL, 8)), ONEDNN)


@pytest.mark.parametrize("plan", [None, MIXED], ids=["onednn", "mixed-padded"])
@pytest.mark.parametrize("shape", [(1, 3), (1, 7), (2, 9)])
def test_target_forward_agrees_across_kernels(plan, shape):
    from dspark.target import TargetModel

    fast = TargetModel(tiny_llama(vocab_size=32, hidden=32, layers=3), None, linear_kernel="onednn")
    slow = TargetModel(tiny_llama(vocab_size=32, hidden=32, layers=3), None, linear_kernel="aten")
    assert (fast.linear_kernel, slow.linear_kernel) == ("onednn", "aten")
    if plan is not None:
        for module in fast.model.modules():
            if isinstance(module, OneDNNLinear):
                module.plan = plan
    ids = torch.randint(0, 32, shape, generator=torch.Generator().manual_seed(0))
    a, b = fast.forward(ids, fast.new_cache(), layer_ids=(0, 1)), slow.forward(ids, slow.new_cache(), layer_ids=(0, 1))
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.features, b.features, rtol=1e-5, atol=1e-5)


needs_mkl = pytest.mark.skipif(not mkl_packed_works(), reason="this torch build has no MKL packed linear")


@pytest.mark.parametrize("kernel", [ATEN, ONEDNN, TALL, pytest.param(MKL, marks=needs_mkl)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_kernel_matches_aten_padded_or_not(kernel, rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=g)
    bias = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(1, rows, 40, generator=g)  # [B, n, d] as the engines feed it
    for run in sorted({rows, PACK_ROWS} if kernel == MKL else {rows, rows + 1, PACK_ROWS}):
        if run < rows or (kernel == MKL and run != PACK_ROWS):
            continue
        plan = KernelPlan(((kernel, run),) * rows)
        with torch.no_grad():
            fast = linear(x, weight, bias, plan, pack_weight(weight) if kernel == MKL else None)
        assert fast.shape == (1, rows, 96)
        torch.testing.assert_close(fast, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_plan_runs_each_row_count_on_its_kernel_and_padded_rows(monkeypatch):
    calls = []
    for name in ("_onednn_linear", "_tall_linear"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda x, w, b, real=real, name=name: calls.append((name[1:-7], x.shape[0])) or real(x, w, b))
    layer = torch.nn.Linear(40, 24)
    layer.__class__ = OneDNNLinear
    layer.plan = KernelPlan(((ONEDNN, 1), (TALL, 2), (TALL, 4), (TALL, 4)), above=ONEDNN)
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 9):
            x = torch.randn(rows, 40)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer(torch.randn(3, 3, 40))  # [B, n, d]: 9 rows in all
    assert calls == [("onednn", 1), ("tall", 2), ("tall", 4), ("tall", 4), ("onednn", 9), ("onednn", 9)]


def test_the_plan_takes_the_fastest_kernel_per_row_count_padding_where_it_pays():
    rows = (1, 2, 3, 4, 8, 16)
    ms = {ATEN: dict(zip(rows, [10, 30, 30, 30, 40, 80])), ONEDNN: dict(zip(rows, [12, 20, 21, 22, 23, 40])),
          TALL: dict(zip(rows, [12, 11, 25, 12, 50, 90]))}
    plan = plan_from(ms)
    assert plan.small[:5] == ((ATEN, 1), (TALL, 2), (TALL, 4), (TALL, 4), (ONEDNN, 8))  # 3 rows run as 4: 12 < 21
    assert plan.small[5:] == ((ONEDNN, 8),) * (PLAN_ROWS - 5) and plan.above == ONEDNN
    assert plan.name == "aten<=1+tall<=2+tall@4<=3+tall<=4+onednn@8<=7+onednn"
    ms[TALL][4] = 30  # a mutant probe: 4 rows no longer pay on the tall kernel
    assert plan_from(ms).small[1:4] == ((TALL, 2), (ONEDNN, 3), (ONEDNN, 4))
    assert plan_from({ATEN: {1: 1.0, 2: 1.0}, ONEDNN: {1: 2.0, 2: 2.0}}) == KernelPlan(((ATEN, 1), (ATEN, 2)), ATEN)
    assert plan_from({ATEN: {1: 1.0, 2: 1.0}, ONEDNN: {1: 2.0, 2: 2.0}}).name == "aten"


def test_plan_names_read_as_runs_of_row_counts():
    assert KernelPlan.everywhere(ONEDNN).name == "onednn" and KernelPlan.everywhere(ATEN).name == "aten"
    assert KernelPlan(((ATEN, 1), (ATEN, 2), (ATEN, 3)), ONEDNN).name == "aten<=3+onednn"
    with pytest.raises(ValueError, match="2 rows"):
        KernelPlan(((ATEN, 1), (ATEN, 1)))  # cannot run 2 rows over 1
    with pytest.raises(ValueError, match="unknown"):
        KernelPlan((), "fast")
    assert KernelPlan(((ATEN, 1), (ATEN, 2), (ATEN, 3)) + ((MKL, PACK_ROWS),) * 5, ONEDNN).name == "aten<=3+mkl<=8+onednn"
    assert KernelPlan(((ONEDNN, 1), (ONEDNN, 2)), ONEDNN).name == "onednn"


@needs_mkl
def test_the_packed_kernel_is_taken_only_where_it_beats_the_others():
    rows = (1, 2, 4, 8, 16)
    ms = {ATEN: dict(zip(rows, [10, 11, 20, 30, 40])), ONEDNN: dict(zip(rows, [12, 16, 18, 20, 25])),
          MKL: dict(zip(rows[:4], [15, 15, 15, 16]))}
    assert plan_from(ms).name == "aten<=2+mkl<=8+onednn"
    ms[MKL] = dict(zip(rows[:4], [15, 15, 15, 21]))  # lost at 8: only 3-4 rows pack (padded to 8 all the same)
    assert plan_from(ms).small[2:4] == ((MKL, PACK_ROWS),) * 2 and plan_from(ms).small[4] == (ONEDNN, 8)


@needs_mkl
def test_auto_packs_every_weight_once_when_the_plan_packs(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "DISK_CACHE_BYTES", 0)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    monkeypatch.setattr(kernels, "probe", lambda *a, **k: {"aten": {1: 1.0, 4: 9.0}, "onednn": {1: 2.0, 4: 5.0},
                                                           "mkl": {1: 3.0, 4: 4.0}})
    model = tiny_llama(vocab_size=32, hidden=32, layers=2)
    model.lm_head.weight = model.model.embed_tokens.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_linear_kernel(model, "auto", cache_dir=tmp_path) == "aten<=1+mkl<=4+onednn"
    swapped = [m for m in model.modules() if isinstance(m, OneDNNLinear)]
    assert swapped and all(m.packed is not None for m in swapped)
    assert model.state_dict().keys() == before.keys() and model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        fast = model(ids).logits
        assert set_linear_kernel(model, "aten") == "aten"
        torch.testing.assert_close(fast, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any(vars(m).get("packed") is not None for m in model.modules())


def test_auto_probes_once_and_remembers_the_plan_on_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "DISK_CACHE_BYTES", 0)
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    answers = iter([{"aten": {1: 1.0, 2: 5.0, 4: 9.0, 16: 20.0}, "onednn": {1: 2.0, 2: 3.0, 4: 4.0, 16: 10.0},
                     "tall": {1: 3.0, 2: 4.0, 4: 3.5, 16: 30.0}},
                    {"aten": {1: 9.0, 2: 9.0}, "onednn": {1: 1.0, 2: 1.0}}])
    monkeypatch.setattr(kernels, "probe", lambda *a, **k: next(answers))
    model = tiny_llama(vocab_size=32, hidden=32, layers=2)
    assert set_linear_kernel(model, "auto", cache_dir=tmp_path) == "aten<=1+onednn<=2+tall@4<=3+tall<=4+onednn"
    assert {m.plan.at(3) for m in model.modules() if isinstance(m, OneDNNLinear)} == {(TALL, 4)}
    monkeypatch.setattr(kernels, "_CHOSEN", {})  # a new process: the file answers, no second probe
    assert set_linear_kernel(tiny_llama(vocab_size=32, hidden=32, layers=2), "auto", cache_dir=tmp_path) == \
        "aten<=1+onednn<=2+tall@4<=3+tall<=4+onednn"
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
