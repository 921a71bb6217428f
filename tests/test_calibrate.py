import dataclasses
import json

import numpy as np
import pytest

from factory.evaluate.calibrate import Calibration, calibrate


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
