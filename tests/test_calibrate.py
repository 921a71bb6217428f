import dataclasses
import json

import numpy as np
import pytest
from scipy.stats import beta
from sklearn.isotonic import IsotonicRegression

from factory.evaluate.calibrate import (
    ISOTONIC_MIN_EXAMPLES,
    Calibration,
    Certification,
    OperatingPoint,
    apply_map,
    betting_lower_bound,
    binomial_lower_bound,
    calibrate,
    action_groups,
    certify_per_action,
    certify_threshold,
    coverage_curve,
    examples_to_certify,
    served,
    evaluate_threshold,
    expected_calibration_error,
    fit_calibration_map,
    reliability_bins,
)


def test_picks_largest_coverage_reaching_target():
    conf = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    scores = [1, 1, 1, 0, 1, 0]
    # kept quality by coverage: 1, 1, 1, .75, .8, .667
    cal = calibrate(conf, scores, target=0.8)
    assert cal.threshold == 0.5
    assert cal.coverage == pytest.approx(5 / 6)
    assert cal.quality == pytest.approx(0.8)
    assert cal.target == 0.8
    # the non-monotone dip at 0.6 does not stop the search
    assert calibrate(conf, scores, target=0.9).threshold == 0.7


def test_curve_points_descend_in_threshold():
    cal = calibrate([0.2, 0.9, 0.5], [0, 1, 1], target=0.5)
    expected = [(0.9, 1 / 3, 1.0), (0.5, 2 / 3, 1.0), (0.2, 1.0, 2 / 3)]
    assert np.allclose(cal.curve, expected)
    assert isinstance(cal.curve, tuple)
    assert cal.threshold == 0.2 and cal.coverage == 1.0


def test_nothing_reaches_target():
    cal = calibrate([0.9, 0.1], [0.5, 0.2], target=0.9)
    assert cal.threshold is None
    assert cal.coverage == 0.0
    assert cal.quality is None
    assert len(cal.curve) == 2
    json.dumps(dataclasses.asdict(cal), allow_nan=False)


def test_ties_are_kept_or_escalated_together():
    conf = [0.9, 0.7, 0.7, 0.7, 0.1]
    scores = [1, 1, 0, 1, 1]
    cal = calibrate(conf, scores, target=0.75)
    # 0.9 -> 1/1; 0.7 -> 3/4 (all three tied kept together); 0.1 -> 4/5
    assert [p[0] for p in cal.curve] == [0.9, 0.7, 0.1]
    assert cal.threshold == 0.1 and cal.coverage == 1.0
    cal = calibrate(conf, scores, target=0.9)
    assert cal.threshold == 0.9 and cal.coverage == pytest.approx(0.2)


def test_quality_exactly_at_target_counts_despite_rounding():
    scores = [0.1] * 10
    cal = calibrate(np.linspace(1, 0, 10), scores, target=0.1)
    assert cal.coverage == 1.0


def test_chosen_point_matches_brute_force():
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 20, 300) / 20  # many ties
    scores = (rng.random(300) < conf).astype(float)
    cal = calibrate(conf, scores, target=0.7)
    best = max(
        (t for t in set(conf) if scores[conf >= t].mean() >= 0.7),
        key=lambda t: (conf >= t).mean(),
    )
    assert cal.threshold == best
    assert cal.coverage == pytest.approx((conf >= best).mean())
    assert cal.quality == pytest.approx(scores[conf >= best].mean())


def test_frozen():
    cal = calibrate([0.5], [1.0], target=1.0)
    assert isinstance(cal, Calibration)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cal.threshold = 0.0


@pytest.mark.parametrize(
    "conf, scores",
    [([], []), ([0.5, 0.6], [1.0]), ([float("nan")], [1.0]), ([[0.5]], [[1.0]])],
)
def test_bad_input_raises(conf, scores):
    with pytest.raises(ValueError):
        calibrate(conf, scores, target=0.5)


# --- synthetic task: confidence c ~ U(0, 1), score ~ Bernoulli(c) (or a [0, 1] score with mean c) ----------
# Kept quality at threshold t is E[c | c >= t] = (1 + t) / 2, so target 0.8 is met exactly from t = 0.6 up
# (true coverage 0.4).

TARGET, DELTA, TRUE_THRESHOLD = 0.8, 0.1, 0.6


def draw(rng, n, fractional=False):
    conf = rng.random(n)
    if fractional:  # Beta with mean c: scores strictly inside (0, 1), like ROUGE-L
        return conf, rng.beta(4 * conf + 1e-9, 4 * (1 - conf) + 1e-9)
    return conf, (rng.random(n) < conf).astype(float)


def guarantee_run(seeds, n_val, n_test, fractional):
    """Certify on validation, judge on a large test draw; the violation rates and mean test coverage."""
    below_true = below_test = none = 0
    coverage = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        val, test = draw(rng, n_val, fractional), draw(rng, n_test, fractional)
        cert = certify_threshold(*val, TARGET, DELTA, binary_scores=not fractional)
        point = evaluate_threshold(cert.threshold, *test)
        coverage.append(point.coverage)
        if cert.threshold is None:
            none += 1
            continue
        assert cert.lower_bound >= TARGET and cert.quality >= cert.lower_bound
        below_true += (1 + cert.threshold) / 2 < TARGET
        below_test += point.quality < TARGET
    return below_true / seeds, below_test / seeds, none / seeds, float(np.mean(coverage))


def test_certified_threshold_holds_on_new_traffic_binary():
    below_true, below_test, none, coverage = guarantee_run(300, 500, 20_000, fractional=False)
    # measured: 0.083 (true quality), 0.087 (test draw), 4.7% uncertified, test coverage 0.28 of the possible 0.40
    assert below_true <= DELTA + 0.05
    assert below_test <= DELTA + 0.05
    assert none <= 0.1
    assert 0.2 <= coverage <= 0.4 + 0.02


def test_certified_threshold_holds_on_new_traffic_fractional_scores():
    below_true, below_test, none, coverage = guarantee_run(200, 500, 20_000, fractional=True)
    # the betting bound: measured 2.5% violations, none uncertified, coverage 0.34 of the possible 0.40
    # (Hoeffding-Bentkus, before it: 0 violations, 1.5% uncertified, coverage 0.24)
    assert below_true <= DELTA + 0.05
    assert below_test <= DELTA + 0.05
    assert none <= 0.1
    assert 0.3 <= coverage <= 0.4 + 0.02


def test_in_sample_threshold_misses_target_often():
    """The check above can fail: the in-sample choice breaks the target in about half of the seeds."""
    below = 0
    for seed in range(200):
        conf, scores = draw(np.random.default_rng(seed), 500)
        threshold = calibrate(conf, scores, TARGET).threshold
        below += threshold is not None and (1 + threshold) / 2 < TARGET
    assert below / 200 > 3 * DELTA


def test_tiny_or_hopeless_validation_certifies_nothing():
    # five perfect, confident answers: 0.1 ** (1 / 5) = 0.63 < 0.8, and 11 would be needed
    cert = certify_threshold([0.99, 0.98, 0.97, 0.96, 0.95], [1, 1, 1, 1, 1], TARGET, binary_scores=True)
    assert cert.threshold is None and cert.coverage == 0.0 and cert.quality is None and cert.lower_bound is None
    assert cert.min_kept == 11 and cert.n == 5 and len(cert.curve) == 5
    json.dumps(dataclasses.asdict(cert), allow_nan=False)
    conf, scores = draw(np.random.default_rng(0), 2000)
    assert certify_threshold(conf, scores, 1.0).threshold is None  # no finite sample certifies a target of 1
    assert certify_threshold(conf, scores * 0.7, TARGET).threshold is None  # quality too low everywhere


def test_eleven_perfect_answers_are_just_enough():
    cert = certify_threshold(np.linspace(1, 0.5, 11), [1] * 11, TARGET, binary_scores=True)
    assert cert.threshold == 0.5 and cert.coverage == 1.0
    assert cert.lower_bound == pytest.approx(DELTA ** (1 / 11))


def test_fixed_sequence_stops_at_first_failure():
    # 30 right, 20 wrong, then 200 right: the bound dips below target after the wrong run and would
    # pass again far below, but the sequence stops at the dip
    scores = np.array([1] * 30 + [0] * 20 + [1] * 200, dtype=float)
    conf = np.linspace(1, 0, scores.size)
    cert = certify_threshold(conf, scores, TARGET, binary_scores=True, start_coverage=0.0)
    lower = np.array([p[3] for p in cert.curve])
    assert lower[-1] >= TARGET  # all 250 would pass on their own
    first_fail = np.flatnonzero((np.arange(1, 251) >= cert.min_kept) & (lower < TARGET))[0]
    assert cert.threshold == conf[first_fail - 1]
    assert cert.threshold > conf[49]
    kept = first_fail  # the last certified point keeps the first_fail most confident answers
    wins = int(scores[:kept].sum())
    assert cert.lower_bound == pytest.approx(beta.ppf(DELTA, wins, kept - wins + 1))


def test_start_coverage_moves_the_first_test():
    # two early misses among the 15 most confident answers end a search that starts there
    scores = np.ones(400)
    scores[[3, 7]] = 0
    conf = np.linspace(1, 0, 400)
    early = certify_threshold(conf, scores, 0.85, binary_scores=True, start_coverage=0.0)
    later = certify_threshold(conf, scores, 0.85, binary_scores=True, start_coverage=0.1)
    assert early.min_kept == 15 and early.threshold is None
    assert later.min_kept == 40 and later.threshold == 0.0 and later.coverage == 1.0


def test_certification_ties_and_curve():
    conf = [0.9] * 30 + [0.5] * 30
    cert = certify_threshold(conf, [1.0] * 60, TARGET, binary_scores=True)
    assert [p[:3] for p in cert.curve] == [(0.9, 0.5, 1.0), (0.5, 1.0, 1.0)]
    assert cert.threshold == 0.5 and isinstance(cert, Certification)


# --- lower confidence bound -----------------------------------------------------------------------------------


def test_clopper_pearson_values():
    assert binomial_lower_bound(100, 90, DELTA) == pytest.approx(beta.ppf(DELTA, 90, 11))
    assert binomial_lower_bound(7, 0, DELTA) == 0.0
    assert binomial_lower_bound(10, 10, DELTA) == pytest.approx(DELTA ** 0.1)
    with pytest.raises(ValueError, match="whole numbers"):
        binomial_lower_bound(10, 8.5, DELTA)


def test_betting_bound_adapts_to_the_spread_of_the_scores():
    # a perfect sample: (1 + R) ** 10 = 1 / delta
    assert betting_lower_bound(np.ones(10), DELTA) == pytest.approx(1 - (DELTA ** -0.1 - 1), abs=1e-7)  # errs low by < 2**-24
    rng = np.random.default_rng(0)
    tight = np.clip(rng.normal(0.95, 0.04, 100), 0, 1)
    hoeffding = tight.mean() - np.sqrt(np.log(1 / DELTA) / (2 * tight.size))
    assert hoeffding + 0.02 < betting_lower_bound(tight, DELTA) < tight.mean()
    spread = rng.choice([0.0, 1.0], 100, p=[0.1, 0.9])
    assert betting_lower_bound(spread, DELTA) < binomial_lower_bound(100, spread.sum(), DELTA)
    # rows that keep different subsets of one sequence equal the subsets bounded alone, in order
    keep = rng.random((3, 100)) < [[0.2], [0.6], [1.0]]
    rows = betting_lower_bound(np.broadcast_to(tight, keep.shape), DELTA, keep=keep)
    assert rows == pytest.approx([betting_lower_bound(tight[k], DELTA) for k in keep])
    assert betting_lower_bound(tight, DELTA, keep=np.zeros(100, dtype=bool)) == 0.0


@pytest.mark.parametrize("binary", [True, False])
def test_lower_bound_covers_the_true_mean(binary):
    rng = np.random.default_rng(1)
    mean, n, trials = 0.85, 40, 4000
    if binary:
        totals = rng.binomial(n, mean, trials).astype(float)
        bounds = binomial_lower_bound(np.full(trials, n), totals, DELTA)
    else:
        bounds = betting_lower_bound(rng.beta(8.5, 1.5, (trials, n)), DELTA)  # mean 0.85
    assert (bounds > mean).mean() <= DELTA + 0.015


# --- calibration map and ECE -------------------------------------------------------------------------------


def overconfident(rng, n):
    conf = rng.random(n)
    return conf, (rng.random(n) < conf**3).astype(float)


def test_ece_of_calibrated_and_overconfident_sets():
    rng = np.random.default_rng(2)
    assert expected_calibration_error(*draw(rng, 20_000)) < 0.02
    assert expected_calibration_error(*overconfident(rng, 20_000)) > 0.2  # exact value 0.25 with 10 bins
    # two bins: [0, .5) holds 0.2 (outcome 0), [.5, 1] holds 0.6 and 1.0 (outcomes 1, 0)
    assert expected_calibration_error([0.2, 0.6, 1.0], [0, 1, 0], bins=2) == pytest.approx((0.2 + 0.6) / 3)


@pytest.mark.parametrize("method, n_val", [("platt", 300), ("isotonic", 3000), ("auto", 300), ("auto", 3000)])
def test_map_reduces_ece_on_held_out_data(method, n_val):
    rng = np.random.default_rng(3)
    mapping = fit_calibration_map(*overconfident(rng, n_val), method=method)
    test_conf, test_scores = overconfident(rng, 20_000)
    before = expected_calibration_error(test_conf, test_scores)
    after = expected_calibration_error(apply_map(mapping, test_conf), test_scores)
    assert after < before / 3
    assert mapping["method"] == (method if method != "auto" else "platt" if n_val < ISOTONIC_MIN_EXAMPLES
                                 else "isotonic")


def test_platt_on_calibrated_confidences_is_near_identity():
    mapping = fit_calibration_map(*draw(np.random.default_rng(4), 5000), method="platt")
    assert mapping["a"] == pytest.approx(1.0, abs=0.15) and mapping["b"] == pytest.approx(0.0, abs=0.15)


def test_fractional_scores_are_soft_targets():
    rng = np.random.default_rng(5)
    conf = rng.random(4000)
    scores = np.clip(conf + rng.normal(0, 0.05, conf.size), 0, 1)  # expected score ~ confidence
    mapping = fit_calibration_map(conf, scores, method="isotonic")
    assert np.abs(apply_map(mapping, [0.2, 0.5, 0.8]) - [0.2, 0.5, 0.8]).max() < 0.05


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_map_round_trips_through_json(method):
    mapping = fit_calibration_map(*overconfident(np.random.default_rng(6), 500), method=method)
    restored = json.loads(json.dumps(mapping, allow_nan=False))
    grid = np.linspace(-0.5, 1.5, 401)
    assert np.array_equal(apply_map(restored, grid), apply_map(mapping, grid))
    assert apply_map(restored, 0.5).shape == ()


def test_isotonic_map_matches_sklearn():
    conf, scores = overconfident(np.random.default_rng(7), 800)
    mapping = fit_calibration_map(conf, scores, method="isotonic")
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(conf, scores)
    grid = np.linspace(-0.2, 1.2, 301)
    assert np.allclose(apply_map(mapping, grid), iso.predict(grid))


@pytest.mark.parametrize("method", ["platt", "isotonic"])
@pytest.mark.parametrize("informative", [True, False])
def test_map_is_monotone_and_a_probability(method, informative):
    rng = np.random.default_rng(8)
    conf = rng.random(600)
    right = rng.random(600) < (conf if informative else 1 - conf)  # an anti-informative confidence too
    mapping = fit_calibration_map(conf, right.astype(float), method=method)
    mapped = apply_map(mapping, np.linspace(0, 1, 1001))
    assert (np.diff(mapped) >= 0).all()
    assert ((mapped >= 0) & (mapped <= 1)).all()
    if not informative and method == "platt":
        assert mapping["a"] == 0.0  # clamped: a decreasing map is not allowed, the base rate remains


# --- held-out evaluation -------------------------------------------------------------------------------------


def test_evaluate_threshold_on_held_out_set():
    point = evaluate_threshold(0.5, [0.9, 0.5, 0.4, 0.7], [1, 0, 1, 1])
    assert point == OperatingPoint(threshold=0.5, n=4, kept=3, coverage=0.75, quality=pytest.approx(2 / 3))
    assert evaluate_threshold(None, [0.9], [1]) == OperatingPoint(None, 1, 0, 0.0, None)
    assert evaluate_threshold(0.95, [0.9], [1]).quality is None
    json.dumps(dataclasses.asdict(point), allow_nan=False)


@pytest.mark.parametrize(
    "call",
    [
        lambda: certify_threshold([0.5], [1.5], 0.8),
        lambda: certify_threshold([0.5], [0.5], 0.8, binary_scores=True),
        lambda: certify_threshold([0.5], [1.0], 1.5),
        lambda: certify_threshold([0.5], [1.0], 0.8, delta=0.0),
        lambda: certify_threshold([0.5], [1.0], 0.8, start_coverage=2.0),
        lambda: certify_threshold([], [], 0.8),
        lambda: fit_calibration_map([1.5], [1.0]),
        lambda: fit_calibration_map([0.5], [1.0], method="beta"),
        lambda: apply_map({"method": "beta"}, [0.5]),
        lambda: apply_map({"method": "isotonic", "x": [0.5, 0.2], "y": [0.1, 0.2]}, [0.5]),
        lambda: apply_map({"method": "platt", "a": 1.0, "b": 0.0}, [float("nan")]),
        lambda: expected_calibration_error([0.5], [1.0], bins=0),
        lambda: expected_calibration_error([1.5], [1.0]),
        lambda: evaluate_threshold(float("nan"), [0.5], [1.0]),
        lambda: evaluate_threshold(0.5, [0.5, 0.6], [1.0]),
        lambda: binomial_lower_bound(0, 0, DELTA),
        lambda: binomial_lower_bound(5, 6, DELTA),
        lambda: binomial_lower_bound(5, 2.5, DELTA),
        lambda: betting_lower_bound([0.5, 1.2], DELTA),
        lambda: betting_lower_bound([0.5, 1.0], 1.0),
        lambda: betting_lower_bound([0.5, 1.0], DELTA, keep=[True]),
    ],
)
def test_new_functions_reject_bad_input(call):
    with pytest.raises(ValueError):
        call()


# --- the evaluation's calibration: chosen on validation, measured on test ---------------------------------


def test_evaluation_result_on_the_synthetic_task():
    """held_out_calibration on the synthetic task: the right threshold is 0.6 (kept quality (1 + t) / 2 = 0.8)."""
    from factory.evaluate.run import held_out_calibration

    thresholds, test_quality, coverage = [], [], []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        val, test = draw(rng, 500), draw(rng, 5000)
        cal = held_out_calibration(*val, *test, val_target=TARGET, test_target=TARGET, delta=DELTA, binary=True)
        if cal["threshold"] is None:
            continue
        point = evaluate_threshold(cal["threshold"], *test)
        assert (cal["coverage"], cal["quality"], cal["kept"], cal["n"]) == (point.coverage, point.quality,
                                                                           point.kept, 5000)
        thresholds.append(cal["threshold"])
        test_quality.append(cal["quality"])
        coverage.append(cal["coverage"])
    # measured: 95 of 100 certified, 6.3% below 0.6 (lowest 0.524), 3.2% with test quality under 0.79,
    # mean test coverage 0.30 of the possible 0.40
    assert len(thresholds) >= 90
    # certified thresholds sit at or above the true 0.6 in about 1 - delta of the seeds, never far below
    assert np.mean(np.array(thresholds) < TRUE_THRESHOLD) <= DELTA + 0.05
    assert min(thresholds) > TRUE_THRESHOLD - 0.1
    assert np.mean(np.array(test_quality) < TARGET - 0.01) <= DELTA + 0.05  # 0.01: the test draw's own noise
    assert 0.2 <= np.mean(coverage) <= 0.4 + 0.02


def test_evaluation_result_names_its_splits_and_fixes_overconfidence():
    from factory.evaluate.run import held_out_calibration

    rng = np.random.default_rng(9)
    val, test = overconfident(rng, 600), overconfident(rng, 3000)
    cal = held_out_calibration(*val, *test, val_target=0.7, test_target=0.72, delta=0.05, binary=True)
    json.dumps(cal, allow_nan=False)
    assert cal["split"] == "test" and cal["target"] == 0.72 and cal["delta"] == 0.05
    assert cal["validation"]["n"] == 600 and cal["validation"]["target"] == 0.7
    assert cal["validation"]["lower_bound"] >= 0.7
    cert = certify_threshold(*val, 0.7, 0.05, binary_scores=True)
    assert cal["threshold"] == cert.threshold and [tuple(p) for p in cal["curve"]] == list(cert.curve)
    assert cal["map"] == fit_calibration_map(*val)
    assert cal["ece"]["raw"] == pytest.approx(expected_calibration_error(*test))
    assert cal["ece"]["calibrated"] < cal["ece"]["raw"] / 3
    assert sum(b[2] for b in cal["reliability"]["raw"]) == 3000
    assert cal["test_curve"][-1][1] == 1.0  # the lowest threshold keeps every test answer


def test_too_little_validation_escalates_everything():
    from factory.evaluate.run import held_out_calibration

    test = draw(np.random.default_rng(10), 200)
    few = held_out_calibration([0.99, 0.98, 0.97, 0.96, 0.95], [1.0] * 5, *test, val_target=TARGET,
                               test_target=TARGET, delta=DELTA, binary=True)
    assert few["threshold"] is None and few["coverage"] == 0.0 and few["kept"] == 0 and few["quality"] is None
    assert few["validation"]["min_kept"] == 11 and few["map"]["method"] == "platt"
    none = held_out_calibration([], [], *test, val_target=None, test_target=TARGET, delta=DELTA, binary=True)
    assert none["threshold"] is None and none["map"] is None and none["curve"] == []
    assert none["ece"]["calibrated"] is None and none["reliability"]["calibrated"] is None
    assert none["validation"] == {"n": 0, "coverage": 0.0, "quality": None, "lower_bound": None, "target": None,
                                  "min_kept": None}
    json.dumps(none, allow_nan=False)


def test_reliability_bins_and_coverage_curve():
    bins = reliability_bins([0.05, 0.15, 0.12, 0.95, 1.0], [0, 1, 0, 1, 1], bins=10)
    assert bins == [(0.05, 0.0, 1), (pytest.approx(0.135), 0.5, 2), (pytest.approx(0.975), 1.0, 2)]
    assert expected_calibration_error([0.05, 0.15, 0.12, 0.95, 1.0], [0, 1, 0, 1, 1]) == pytest.approx(
        (0.05 + 2 * 0.365 + 2 * 0.025) / 5)
    curve = coverage_curve([0.2, 0.9, 0.5, 0.5], [0, 1, 1, 0])
    assert curve == ((0.9, 0.25, 1.0), (0.5, 0.75, pytest.approx(2 / 3)), (0.2, 1.0, 0.5))
    with pytest.raises(ValueError):
        reliability_bins([1.5], [1.0])


def test_bench_resampling_separates_certified_from_in_sample():
    """bench/calibration.py's draws on synthetic tasks: the certified threshold keeps its promise far more often."""
    from bench.calibration import Scored, resample

    rng = np.random.default_rng(11)
    tasks = [Scored(f"t{i}", *draw(rng, n), n_validation=n // 2, target=TARGET, binary=True) for i, n in
             enumerate((400, 600))]
    figures = resample(tasks, seeds=20, delta=DELTA)
    assert figures["calibration_draws"] == 40 and figures["calibration_draws_served"] >= 30
    assert figures["calibration_guarantee_holds_share"] >= 0.8
    assert figures["calibration_guarantee_holds_share_in_sample"] <= 0.7
    assert 0.1 <= figures["served_share_out_of_sample"] < figures["served_share_in_sample"] <= 0.5
    assert figures["ece_raw"] < 0.1 and figures["ece_calibrated"] < 0.1  # confidences calibrated already


def _turns(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Agent turns: lookups right 99% of the time at high confidence, replies (ROUGE-like scores) mediocre
    at any confidence, rare refunds right 90% of the time."""
    actions = rng.choice(["call:lookup", "reply", "call:refund"], size=n, p=[0.6, 0.35, 0.05]).tolist()
    conf, score = np.empty(n), np.empty(n)
    for i, action in enumerate(actions):
        conf[i] = rng.uniform(0.85, 1.0) if action == "call:lookup" else rng.uniform(0.3, 1.0)
        if action == "reply":
            score[i] = rng.beta(2, 3)
        else:
            score[i] = float(rng.random() < (0.99 if action == "call:lookup" else 0.9))
    return conf, score, actions


def _binary(action: str) -> bool:
    return action != "reply"


def test_rare_tools_pool_into_one_call_group_from_counts_alone():
    actions = ["call:lookup"] * 200 + ["call:refund"] * 5 + ["call:cancel"] * 3 + ["reply"] * 50
    groups = action_groups(actions, target=0.9, delta=0.1, binary=_binary)
    assert groups == {"call:lookup": "call:lookup", "call:refund": "call", "call:cancel": "call", "reply": "reply"}


def test_per_action_thresholds_serve_the_reliable_action_and_keep_the_guarantee():
    """On validation of 400 turns the lookups certify and the replies do not; on fresh traffic the served
    answers, all groups together, reach the target in >= 1 - delta of 100 seeds; one threshold for the
    whole task serves less (its bound mixes the replies' low scores in)."""
    target, delta, violations, per_action, single = 0.9, 0.1, 0, [], []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        conf, score, actions = _turns(rng, 400)
        cert = certify_per_action(conf, score, actions, target, delta, _binary)
        assert cert.thresholds["reply"] is None and cert.delta_each == pytest.approx(delta / len(cert.each))
        new_conf, new_score, new_actions = _turns(rng, 4000)
        keep = served(new_conf, new_actions, cert.thresholds, cert.groups)
        per_action.append(keep.mean())
        violations += bool(keep.any() and new_score[keep].mean() < target)
        one = certify_threshold(conf, score, target, delta)
        single.append(0.0 if one.threshold is None else float((new_conf >= one.threshold).mean()))
    assert violations <= delta * 100
    assert np.mean(per_action) > 0.25 > 0.1 > np.mean(single)


def test_a_per_action_certification_names_its_inputs():
    with pytest.raises(ValueError, match="2 actions for 3 confidences"):
        certify_per_action([0.9, 0.8, 0.7], [1, 1, 0], ["reply", "reply"], 0.9, 0.1, _binary)


def test_examples_to_certify_grows_as_quality_nears_the_target():
    assert examples_to_certify(1.0, 0.95, 0.1, True) == 45  # a perfect set: delta ** (1 / n) >= 0.95
    needed = [examples_to_certify(q, 0.95, 0.1, True) for q in (0.99, 0.98, 0.97)]
    assert needed == sorted(needed) and needed[0] > 45
    n = needed[1]
    assert binomial_lower_bound(n, int(0.98 * n), 0.1)[()] >= 0.95 > binomial_lower_bound(n - 20, int(0.98 * (n - 20)), 0.1)[()]
    assert examples_to_certify(0.95, 0.95, 0.1, True) is None and examples_to_certify(0.9, 0.95, 0.1, True) is None


def test_calls_to_certify_reads_the_cheapest_operating_point():
    """A task whose most confident half is perfect needs 45 / 0.5 = 90 validation answers: at a 15%
    validation share, 600 calls, so 500 more than its 100; below the target at every point, none helps."""
    from factory.evaluate.run import calls_to_certify

    curve = [[0.9, 0.5, 1.0, 0.8], [0.5, 1.0, 0.9, 0.85]]
    need = calls_to_certify(curve, 15, 0.15, 100, target=0.95, delta=0.1, binary=True)
    assert need == {"validation_answers": 90, "more_calls": 500}
    assert calls_to_certify([[0.9, 0.5, 0.9, 0.8]], 15, 0.15, 100, 0.95, 0.1, True) == \
        {"validation_answers": None, "more_calls": None}
    assert calls_to_certify(curve, 0, 0.15, 100, 0.95, 0.1, True) is None
