"""Router calibration: the confidence threshold above which the specialist answers.

The specialist keeps an answer when its confidence >= threshold and escalates
to the teacher otherwise. Coverage is the share of answers kept, quality the
mean example score of the kept answers. The chosen threshold is the one with
the largest coverage whose quality still reaches the target (usually the
teacher's quality), i.e. the cheapest routing that does not lose quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Kept quality is a running float sum; this absorbs its rounding so that a
# quality of exactly the target (e.g. 9 of 10 kept right, target 0.9) counts.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Calibration:
    """The chosen operating point and the full coverage-quality curve.

    threshold  keep answers with confidence >= threshold; None when no
               threshold reaches the target: the specialist never answers and
               every request goes to the teacher. None (JSON null) rather than
               inf (not valid JSON) or 1 + eps (wrong if confidences exceed 1),
               so a router must handle "never" explicitly instead of comparing.
    coverage   share of test answers kept at threshold (0.0 when None)
    quality    mean score of the kept answers (None when nothing is kept)
    target     the quality the threshold had to reach
    curve      (threshold, coverage, quality) for every distinct confidence,
               from the highest threshold (lowest coverage) down; a tuple so
               the frozen object stays immutable (JSON encodes it as a list)
    """

    threshold: float | None
    coverage: float
    quality: float | None
    target: float
    curve: tuple[tuple[float, float, float], ...]


def calibrate(confidences: Sequence[float], scores: Sequence[float], target: float) -> Calibration:
    """Pick the threshold with the largest coverage whose kept quality >= target.

    Every distinct confidence is a candidate threshold; equal confidences are
    kept or escalated together, so ties never split. Quality need not fall
    monotonically with coverage: the largest qualifying coverage wins even if
    some smaller one does not qualify. O(n log n) (one sort).

    Raises ValueError when the inputs are empty, of different lengths, not
    one-dimensional, or contain NaN.
    """
    conf = np.asarray(confidences, dtype=float)
    score = np.asarray(scores, dtype=float)
    if conf.ndim != 1 or conf.shape != score.shape:
        raise ValueError(f"confidences {conf.shape} and scores {score.shape} must be equal-length 1-D sequences")
    if conf.size == 0:
        raise ValueError("cannot calibrate on no examples")
    if np.isnan(conf).any() or np.isnan(score).any():
        raise ValueError("confidences and scores must not contain NaN")

    order = np.argsort(-conf, kind="stable")
    conf, score = conf[order], score[order]
    last_of_tie = np.flatnonzero(np.append(conf[1:] != conf[:-1], True))
    kept = last_of_tie + 1
    thresholds = conf[last_of_tie]
    coverage = kept / conf.size
    quality = np.cumsum(score)[last_of_tie] / kept
    curve = tuple(zip(thresholds.tolist(), coverage.tolist(), quality.tolist()))

    reaching = np.flatnonzero(quality >= target - _TOLERANCE)
    if reaching.size == 0:
        return Calibration(threshold=None, coverage=0.0, quality=None, target=float(target), curve=curve)
    best = reaching[-1]
    return Calibration(
        threshold=float(thresholds[best]),
        coverage=float(coverage[best]),
        quality=float(quality[best]),
        target=float(target),
        curve=curve,
    )
