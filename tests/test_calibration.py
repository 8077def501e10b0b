"""Sequential Temperature Scaling and its metrics on pure tensors.

The headline test draws rounds from a known calibration map: raw c_k = σ(z_k) while the true
conditional survival probability of slot k is σ(z_k / T_k*). STS must find T_k* and, on fresh
rounds from the same map, lower the ECE of a_k = ∏ c_i to the sampling-noise floor.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark.scheduling.calibration import (
    CALIBRATION_FILE,
    Calibration,
    CalibrationData,
    brier_score,
    expected_calibration_error,
    fit_sts,
    reliability_curve,
    roc_auc,
    slot_metrics,
    threshold_sweep,
)

TRUE_TEMPERATURES = (2.0, 1.5, 0.8, 1.2)  # overconfident, overconfident, underconfident, mild


def synthetic_rounds(n: int, temps=TRUE_TEMPERATURES, seed: int = 0, verified=None) -> CalibrationData:
    g = torch.Generator().manual_seed(seed)
    gamma = len(temps)
    z = torch.randn(n, gamma, generator=g, dtype=torch.float64) * 1.5 + 1.5  # raw logits
    true_c = torch.sigmoid(z / torch.tensor(temps, dtype=torch.float64))
    accept = torch.rand(n, gamma, generator=g, dtype=torch.float64) < true_c
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # the accepted prefix stops at the first rejection
    num_verified = torch.full((n,), gamma) if verified is None else verified
    num_accepted = torch.minimum(num_accepted, num_verified)
    confidences = torch.sigmoid(z).masked_fill(torch.arange(1, gamma + 1) > num_verified.unsqueeze(1), float("nan"))
    return CalibrationData(confidences, num_accepted, num_verified)


@pytest.fixture(scope="module")
def fitted():
    data = synthetic_rounds(40_000, seed=0)
    return data, fit_sts(data)


def test_sts_recovers_the_true_temperatures(fitted):
    _, calibration = fitted
    for got, want in zip(calibration.temperatures, TRUE_TEMPERATURES):
        assert got == pytest.approx(want, rel=0.15), calibration.temperatures


def test_sts_lowers_ece_on_held_out_rounds(fitted):
    _, calibration = fitted
    test = synthetic_rounds(40_000, seed=1)
    before = slot_metrics(test)
    after = slot_metrics(test, calibration)
    oracle = slot_metrics(test, Calibration(TRUE_TEMPERATURES))
    for b, a, o in zip(before, after, oracle):
        assert b.ece > 0.04  # the raw head is visibly miscalibrated ...
        assert a.ece < 0.5 * b.ece  # ... STS removes most of it ...
        assert a.ece < o.ece + 0.01  # ... down to what the true map itself achieves
        assert a.brier <= b.brier + 1e-9


def test_fitting_slot_k_holds_the_calibrated_earlier_slots_fixed():
    # Slot 2 is perfectly calibrated on its own (T_2* = 1) but slot 1 is not (T_1* = 3). A fit of
    # slot 2 against the raw c_1 would have to bend T_2 to absorb slot 1's error.
    data = synthetic_rounds(40_000, temps=(3.0, 1.0), seed=2)
    calibration = fit_sts(data)
    assert calibration.temperatures[0] == pytest.approx(3.0, rel=0.15)
    assert calibration.temperatures[1] == pytest.approx(1.0, rel=0.15)


def test_a_slot_without_survivals_keeps_temperature_one():
    # every round rejects slot 2: the ECE has no interior optimum there
    data = synthetic_rounds(5_000, temps=(1.5, 1.0, 1.0), seed=5)
    data = CalibrationData(data.confidences, data.num_accepted.clamp(max=1), data.num_verified)
    calibration = fit_sts(data)
    assert calibration.temperatures[1:] == (1.0, 1.0)
    assert calibration.temperatures[0] == pytest.approx(1.5, rel=0.2)
    # without the guard the fit runs off to an edge of the grid
    assert abs(math.log(fit_sts(data, min_events=0).temperatures[1])) == pytest.approx(3.0)


def test_sts_preserves_the_ranking_within_slot_one(fitted):
    data, calibration = fitted
    assert slot_metrics(data, calibration)[0].auc == pytest.approx(slot_metrics(data)[0].auc, abs=1e-12)


def test_rounds_cut_short_by_the_token_budget_are_used_only_where_verified():
    g = torch.Generator().manual_seed(3)
    verified = torch.randint(1, 5, (8_000,), generator=g)
    data = synthetic_rounds(8_000, seed=3, verified=verified)
    assert data.verified.sum() == verified.sum()
    assert data.prefix_survival().isnan().sum() == (4 * 8_000 - verified.sum())
    calibration = fit_sts(data)
    assert all(math.isfinite(t) for t in calibration.temperatures)
    assert calibration.temperatures[0] == pytest.approx(TRUE_TEMPERATURES[0], rel=0.15)
    assert [m.count for m in slot_metrics(data)] == [int((verified >= k).sum()) for k in range(1, 5)]


def test_ece_by_hand():
    pred = torch.tensor([0.2, 0.2, 0.8, 0.8, 0.8])
    outcome = torch.tensor([0, 1, 1, 1, 0])
    # bin [0, .5): mean pred .2 vs observed .5, weight 2/5; bin [.5, 1]: .8 vs 2/3, weight 3/5
    assert float(expected_calibration_error(pred, outcome, bins=2)) == pytest.approx(2 / 5 * 0.3 + 3 / 5 * (0.8 - 2 / 3))
    # pred = 1 lands in the last (closed) bin; a leading grid dimension is evaluated row by row
    grid = torch.stack([torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5])])
    assert expected_calibration_error(grid, torch.tensor([1, 0]), bins=4).tolist() == pytest.approx([0.5, 0.0])


def test_roc_auc_matches_mann_whitney_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(4)
    score = torch.randint(0, 6, (300,), generator=g).double() / 5  # many ties
    outcome = torch.rand(300, generator=g) < score * 0.8
    u = stats.mannwhitneyu(score[outcome].numpy(), score[~outcome].numpy()).statistic
    assert roc_auc(score, outcome) == pytest.approx(u / (int(outcome.sum()) * int((~outcome).sum())))


def test_roc_auc_and_brier_by_hand():
    score = torch.tensor([0.1, 0.4, 0.35, 0.8])
    outcome = torch.tensor([0, 0, 1, 1])
    assert roc_auc(score, outcome) == pytest.approx(0.75)  # 3 of the 4 (pos, neg) pairs are ordered
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)
    assert math.isnan(roc_auc(score, torch.ones(4)))
    assert brier_score(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1, 0, 1])) == pytest.approx((0 + 0.25 + 1) / 3)


def test_apply_is_temperature_scaling_of_each_slot():
    calibration = Calibration((2.0, 0.5, 1.0))
    c = torch.tensor([[0.9, 0.9, 0.9], [0.2, 0.6, 0.3]])
    logit = torch.log(c / (1 - c))
    expected = torch.sigmoid(logit / torch.tensor([2.0, 0.5, 1.0]))
    assert torch.allclose(calibration.apply(c), expected, atol=1e-6)
    assert torch.allclose(calibration.apply(c[:, :2]), expected[:, :2], atol=1e-6)  # a block cut short
    assert calibration.apply(c.half()).dtype == torch.float16
    assert torch.isfinite(calibration.apply(torch.tensor([0.0, 1.0, 0.5]))).all()
    with pytest.raises(ValueError, match="γ' <= 3"):
        calibration.apply(torch.rand(2, 4))
    for bad in ((), (1.0, 0.0), (float("nan"),), (-1.0,)):
        with pytest.raises(ValueError):
            Calibration(bad)


def test_save_and_load_beside_the_weights(tmp_path):
    assert Calibration.load(tmp_path) is None
    calibration = Calibration((1.25, 0.75))
    path = calibration.save(tmp_path, rounds=10, per_slot=[{"slot": 1, "ece_before": 0.1}])
    assert path == tmp_path / CALIBRATION_FILE
    body = json.loads(path.read_text())
    assert body["temperatures"] == [1.25, 0.75] and body["rounds"] == 10
    assert Calibration.load(tmp_path) == calibration
    with pytest.raises(ValueError, match="does not exist"):
        calibration.save(tmp_path / "missing")
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a calibration file"):
        Calibration.load(tmp_path)


def test_calibration_data_from_rounds_and_validation():
    data = CalibrationData.from_rounds([(3, 1, [0.9, 0.5, 0.4]), (0, 0, []), (2, 2, [0.8, 0.7, 0.6])])
    assert data.confidences.shape == (2, 3)  # the γ = 0 round is dropped
    assert torch.isnan(data.confidences[1, 2])  # only 2 slots verified: the third confidence is not a pair
    assert data.survived.tolist() == [[True, False, False], [True, True, False]]
    assert torch.allclose(data.prefix_survival()[0], torch.tensor([0.9, 0.45, 0.18], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_accepted <= num_verified"):
        CalibrationData(torch.full((1, 2), 0.5, dtype=torch.float64), torch.tensor([2]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CalibrationData(torch.tensor([[1.5]], dtype=torch.float64), torch.tensor([0]), torch.tensor([1]))


def test_threshold_sweep_by_hand():
    # a_k: round 1 = .9, .45, .18 (accepted 1 of 3); round 2 = .8, .56 (accepted 2 of 2)
    data = CalibrationData.from_rounds([(3, 1, [0.9, 0.5, 0.4]), (2, 2, [0.8, 0.7])])
    full, mid, high = threshold_sweep(data, [0.0, 0.5, 0.95])
    # t = 0 is fixed-length verification: commits (1+1) + (2+1), verifies (3+1) + (2+1)
    assert (full.accepted_per_step, full.rejected_per_step, full.acceptance_rate) == pytest.approx((2.5, 1.0, 5 / 7))
    # t = .5 keeps ℓ = 1 and 2: commits 2 + 3, verifies 2 + 3, nothing rejected
    assert (mid.accepted_per_step, mid.rejected_per_step, mid.acceptance_rate) == pytest.approx((2.5, 0.0, 1.0))
    # t = .95 keeps nothing: every round is a plain step
    assert (high.accepted_per_step, high.verified_per_step) == pytest.approx((1.0, 1.0))


def test_reliability_curve_by_hand():
    curve = reliability_curve(torch.tensor([0.1, 0.2, 0.9, 1.0]), torch.tensor([0, 1, 1, 1]), bins=2)
    assert curve.counts == (2, 2)
    assert curve.mean_pred == pytest.approx((0.15, 0.95))
    assert curve.observed == pytest.approx((0.5, 1.0))
