"""Router calibration: when may the specialist answer instead of the teacher?

The specialist keeps an answer when its raw confidence (the geometric mean of the
chosen tokens' probabilities) is >= a threshold and escalates to the teacher
otherwise. Coverage is the share of answers kept, quality the mean example score
(in [0, 1]) of the kept answers.

The pieces, each fitted on one split and judged on another:

fit_calibration_map / apply_map   a monotone map from raw confidence to the
                                  expected score of the answer (the probability
                                  that it is right, for 0/1 scores); JSON-safe,
                                  applied with numpy alone.
expected_calibration_error        how far confidences are from observed scores;
reliability_bins                  the per-bin figures behind it (reliability diagram).
certify_threshold                 the threshold whose kept quality on new traffic
                                  reaches the target with probability >= 1 - delta
                                  (Learn-then-Test, fixed-sequence testing).
binomial_lower_bound              the finite-sample lower confidence bounds it uses:
betting_lower_bound               exact for 0/1 scores, by betting for scores in [0, 1].
evaluate_threshold                coverage and quality at a threshold on a held-out set.
coverage_curve                    coverage and kept quality at every threshold of a set.
calibrate                         the in-sample search, kept as the baseline (below).

`calibrate` picks the threshold on a split and reports coverage and quality on
that same split, so its figures are optimistic and nothing bounds the quality
served on new traffic; `bench/calibration.py` measures it beside the certified
threshold. The evaluation (`factory.evaluate.run`) runs the specialist on both
the validation and the test split, fits the map and certifies the threshold on
validation (per task), and reports on test the coverage and quality at the
certified threshold (`evaluate_threshold`) and the ECE of the raw and the mapped
confidences. The router keeps comparing the raw confidence with the threshold
(the threshold is certified on raw confidence, and a monotone map keeps the same
answers); the map adds a calibrated probability for reports and for callers that
want one.

Fitting imports scikit-learn and scipy inside the functions that fit, so a server
that only applies a map (`apply_map`) imports numpy alone.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Kept quality is a running float sum; this absorbs its rounding so that a
# quality of exactly the target (e.g. 9 of 10 kept right, target 0.9) counts.
_TOLERANCE = 1e-9
# "auto" fits isotonic regression from this many validation examples up, Platt below.
ISOTONIC_MIN_EXAMPLES = 1000
# Platt works on logit(confidence); confidences are clipped this far inside (0, 1)
# so that 0 (an unusable answer) and 1 have finite logits.
_LOGIT_EPS = 1e-9
# Halvings of the betting bound's bracket: it errs low by at most 2**-24 (6e-8), far below any
# score's resolution; each halving costs a pass over thresholds x validation examples.
_BISECTION_STEPS = 24
# Thresholds whose betting bounds are computed at once (rows x validation examples in memory).
_BOUND_ROWS = 256


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
    """Pick the threshold with the largest coverage whose kept quality >= target, in-sample.

    Every distinct confidence is a candidate threshold; equal confidences are
    kept or escalated together, so ties never split. Quality need not fall
    monotonically with coverage: the largest qualifying coverage wins even if
    some smaller one does not qualify. O(n log n) (one sort).

    The threshold is chosen and judged on the same examples, so the coverage and
    quality it reports are optimistic and the served quality may fall below the
    target about half the time; `certify_threshold` on validation plus
    `evaluate_threshold` on test replace it.

    Raises ValueError when the inputs are empty, of different lengths, not
    one-dimensional, or contain NaN.
    """
    conf, score = _check_pair(confidences, scores)
    thresholds, kept, sums = _kept_curve(conf, score)
    coverage = kept / conf.size
    quality = sums / kept
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


# --- calibration map --------------------------------------------------------------------------------------


def fit_calibration_map(confidences: Sequence[float], scores: Sequence[float],
                        method: str = "auto") -> dict[str, Any]:
    """Fit a non-decreasing map from raw confidence to the expected score, on validation.

    Target: the score itself, as a soft label. The map estimates E[score | confidence],
    which for 0/1 scores (classification, tool calls) is P(right | confidence) and for
    fractional scores (ROUGE-L, field F1) is the expected quality, the same quantity the
    router's target is stated in. Cutting fractional scores at some value would throw
    away information and add an arbitrary constant.

    Methods:
    "platt"     sigmoid(a * logit(c) + b) with a >= 0, fitted by soft-label cross-entropy
                on Platt's smoothed targets (label 1 -> (N+ + 1) / (N+ + 2), label 0 ->
                1 / (N- + 2), fractional scores in between linearly), which keeps a and b
                finite on separable data. Two parameters: smooth and stable on small
                sets, but it can only stretch and shift the logit, so a confidence whose
                miscalibration is not of that shape stays partly miscalibrated. logit(c)
                rather than c because raw confidences crowd near 1, and a = 1, b = 0 is
                the identity.
    "isotonic"  sklearn IsotonicRegression (increasing, out_of_bounds="clip", output
                clipped to [0, 1]), stored as its breakpoints and applied by linear
                interpolation. Non-parametric, so it fits any monotone shape, but it is a
                step function that chases noise on small sets (a top bin of three right
                answers maps to 1.0).
    "auto"      isotonic from ISOTONIC_MIN_EXAMPLES (1000) examples up, Platt below:
                Niculescu-Mizil & Caruana (2005) found isotonic overfitting and losing to
                Platt on calibration sets below roughly a thousand examples.

    Both maps are monotone non-decreasing, so they never reorder answers: thresholding
    the mapped value is thresholding the raw confidence. Assumes validation and new
    traffic are exchangeable (the map is a property of the score distribution).

    Returns a JSON-safe dict for `apply_map`: {"method": "platt", "a": float, "b": float}
    or {"method": "isotonic", "x": [float, ...], "y": [float, ...]}.

    Raises ValueError when the inputs are empty, of different lengths, not 1-D, contain
    NaN, hold a confidence or score outside [0, 1], or `method` is unknown; RuntimeError
    when the Platt optimiser does not converge.
    """
    conf, score = _check_pair(confidences, scores)
    _check_unit("confidences", conf)
    _check_unit("scores", score)
    if method == "auto":
        method = "isotonic" if conf.size >= ISOTONIC_MIN_EXAMPLES else "platt"
    if method == "platt":
        return _fit_platt(conf, score)
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(conf, score)
        return {"method": "isotonic", "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    raise ValueError(f"unknown calibration method {method!r}: use 'auto', 'platt' or 'isotonic'")


def apply_map(mapping: Mapping[str, Any], confidences: Sequence[float] | np.ndarray | float) -> np.ndarray:
    """Calibrated probabilities for raw confidences, with numpy alone (for serving).

    `mapping` is what `fit_calibration_map` returns, or its JSON round trip. Isotonic
    maps interpolate linearly between breakpoints and hold the end values outside them
    (as sklearn's predict with out_of_bounds="clip"); Platt maps clip the confidence to
    [1e-9, 1 - 1e-9] before the logit. The result has the shape of `confidences`.

    Raises ValueError for an unknown method, a malformed map (isotonic x and y of
    different or zero length, or x decreasing) or a NaN confidence.
    """
    conf = np.asarray(confidences, dtype=float)
    if np.isnan(conf).any():
        raise ValueError("confidences must not contain NaN")
    method = mapping.get("method")
    if method == "platt":
        z = float(mapping["a"]) * _logit(conf) + float(mapping["b"])
        return np.exp(-np.logaddexp(0.0, -z))  # sigmoid(z) without overflow
    if method == "isotonic":
        x = np.asarray(mapping["x"], dtype=float)
        y = np.asarray(mapping["y"], dtype=float)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0 or (np.diff(x) < 0).any():
            raise ValueError("an isotonic map needs equal-length, non-empty x and y with x non-decreasing")
        return np.asarray(np.interp(conf, x, y), dtype=float)
    raise ValueError(f"unknown calibration map method {method!r}")


def expected_calibration_error(probabilities: Sequence[float], outcomes: Sequence[float], bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (bin share) * |mean probability - mean outcome|.

    Bins are `bins` equal-width intervals of [0, 1] (the last one closed); empty bins
    count zero. Outcomes may be fractional (scores), which measures calibration to the
    expected score. The estimate is biased upward on small sets: even perfectly
    calibrated probabilities give about sqrt(p (1 - p) / n_bin) per bin from sampling
    noise, so compare values computed on sets of similar size. Equal-width bins are the
    usual convention; with confidences crowded near 1 most examples share the top bin,
    which then dominates the figure.

    Raises ValueError when the inputs are empty, of different lengths, not 1-D, contain
    NaN, a probability lies outside [0, 1], or bins < 1.
    """
    return sum(count * abs(prob - outcome) for prob, outcome, count in
               reliability_bins(probabilities, outcomes, bins)) / len(probabilities)


def reliability_bins(probabilities: Sequence[float], outcomes: Sequence[float],
                     bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean probability, mean outcome, count) of each non-empty bin, lowest bin first.

    The bins of `expected_calibration_error` (equal-width intervals of [0, 1], the last
    one closed): plotted, mean outcome against mean probability, they are the reliability
    diagram, on the diagonal when calibrated. A bin of a few examples is noisy; the count
    says how much to trust it. JSON-safe (plain floats and ints).

    Raises ValueError as `expected_calibration_error`.
    """
    prob, outcome = _check_pair(probabilities, outcomes)
    _check_unit("probabilities", prob)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    index = np.minimum((prob * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    probs = np.bincount(index, weights=prob, minlength=bins)
    outcomes_sum = np.bincount(index, weights=outcome, minlength=bins)
    return [(float(probs[b] / counts[b]), float(outcomes_sum[b] / counts[b]), int(counts[b]))
            for b in np.flatnonzero(counts)]


# --- certified threshold ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certification:
    """A threshold certified on validation, and the curve it was chosen from.

    threshold    keep answers with confidence >= threshold; None when none is
                 certified (too little validation data or quality too low): the
                 task escalates every request
    coverage     share of validation answers kept at threshold (0.0 when None)
    quality      mean validation score of those answers (None when threshold is None)
    lower_bound  the (1 - delta) lower confidence bound on kept quality at threshold
                 (None when threshold is None); >= target by construction
    target       the quality the kept answers must reach
    delta        the allowed probability that the certified quality is wrong
    min_kept     testing starts at the highest threshold keeping at least this many
                 validation answers; fewer could not be certified, or too noisily
    n            validation examples
    curve        (threshold, coverage, quality, lower_bound) for every distinct
                 confidence, highest threshold first (including the points above
                 the start, which are not tested)
    """

    threshold: float | None
    coverage: float
    quality: float | None
    lower_bound: float | None
    target: float
    delta: float
    min_kept: int
    n: int
    curve: tuple[tuple[float, float, float, float], ...]


def certify_threshold(confidences: Sequence[float], scores: Sequence[float], target: float, delta: float = 0.1,
                      binary_scores: bool = False, start_coverage: float = 0.1) -> Certification:
    """The lowest threshold whose kept quality on new traffic is >= target with probability >= 1 - delta.

    Method: Learn-then-Test (Angelopoulos et al., 2021) with fixed-sequence testing.
    Each distinct validation confidence t is a candidate; H0(t): "the mean score of
    answers with confidence >= t is below target". H0(t) is rejected when the
    (1 - delta) lower confidence bound on kept quality (`binomial_lower_bound` or
    `betting_lower_bound`, computed
    from the n(t) kept answers, which given n(t) are an i.i.d. sample of kept traffic)
    is >= target. Candidates are tested from the highest threshold down, each at level
    delta, stopping at the first one not rejected; the answer is the last rejected
    (largest coverage). Fixed-sequence testing controls the family-wise error at delta
    with no Bonferroni penalty, however many thresholds there are, because a false
    certification needs the first true null in the sequence to be rejected. The price:
    once the bound dips below target the search stops, even if a lower threshold would
    pass again.

    Testing starts at the highest threshold that keeps at least `min_kept` = max(the fewest
    perfect answers the bound can certify (ceil(log(delta) / log(target)) for 0/1 scores),
    ceil(start_coverage * n)) answers. With fewer
    than the first term not even a perfect kept set can be certified, so a start at a
    higher threshold would always stop at once; the second keeps a few early mistakes
    among the most confident answers from ending the search (and a kept share below
    start_coverage saves little). The trade-off: a specialist that is good only on its
    most confident start_coverage share of traffic is not certified.

    Assumptions: validation examples and new traffic are exchangeable (i.i.d. from one
    distribution; examples from one session are correlated, which this ignores), and,
    because the starting threshold depends on the data, that kept quality does not rise
    when the threshold is lowered (E[score | confidence >= t] non-decreasing in t, i.e.
    the confidence is informative); with a fixed starting threshold the second
    assumption would not be needed. See docs/calibration.md.

    binary_scores  True for 0/1 scores (classification, tool calls): the exact binomial
                   (Clopper-Pearson) bound; False: the betting bound, valid for any
                   scores in [0, 1] taken in the order given (validation's order, which
                   does not depend on the scores).

    Raises ValueError when the inputs are empty, of different lengths, not 1-D, contain
    NaN, a score is outside [0, 1] (or not 0/1 with binary_scores), target is outside
    [0, 1], delta outside (0, 1) or start_coverage outside [0, 1].
    """
    conf, score = _check_pair(confidences, scores)
    _check_unit("scores", score)
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be in [0, 1], got {target}")
    _check_delta(delta)
    if not 0.0 <= start_coverage <= 1.0:
        raise ValueError(f"start_coverage must be in [0, 1], got {start_coverage}")
    thresholds, kept, sums = _kept_curve(conf, score)
    if binary_scores:
        lower = binomial_lower_bound(kept, sums, delta)
    else:  # each threshold's kept answers in the order given, which does not depend on their scores
        lower = np.concatenate([betting_lower_bound(np.broadcast_to(score, (rows.size, score.size)), delta,
                                                    keep=conf[None, :] >= rows[:, None])
                                for rows in np.array_split(thresholds, max(1, math.ceil(thresholds.size / _BOUND_ROWS)))])
    coverage = kept / conf.size
    quality = sums / kept
    curve = tuple(zip(thresholds.tolist(), coverage.tolist(), quality.tolist(), lower.tolist()))

    min_kept = max(_smallest_certifiable(target, delta, conf.size, binary_scores), math.ceil(start_coverage * conf.size - _TOLERANCE))
    tested = np.flatnonzero(kept >= min_kept)
    failed = tested[lower[tested] < target]
    last = (failed[0] if failed.size else kept.size) - 1
    common = {"target": float(target), "delta": float(delta), "min_kept": min_kept, "n": int(conf.size), "curve": curve}
    if not tested.size or last < tested[0]:
        return Certification(threshold=None, coverage=0.0, quality=None, lower_bound=None, **common)
    return Certification(threshold=float(thresholds[last]), coverage=float(coverage[last]),
                         quality=float(quality[last]), lower_bound=float(lower[last]), **common)


@dataclass(frozen=True)
class ActionCertification:
    """Thresholds certified per predicted action group (`certify_per_action`).

    groups       action -> its group: a tool called often enough on validation to be certified
                 alone is its own group (`call:<tool>`), the other calls pool into `call`,
                 replies are `reply`, and a kind with one action has one group
    thresholds   group -> certified threshold (None: that group always escalates)
    each         the per-group certifications, at `delta_each`
    delta_each   delta / (number of groups): Bonferroni over the groups
    """

    groups: dict[str, str]
    thresholds: dict[str, float | None]
    each: dict[str, Certification]
    delta_each: float


def action_groups(actions: Sequence[str], target: float, delta: float, binary: Callable[[str], bool]) -> dict[str, str]:
    """Each validation action's group, from the counts alone (never the scores, so the tests after
    stay valid): a call action with at least the fewest answers a perfect group could certify at
    delta / (every distinct action + 1) is alone, the other calls pool into `call`.

    Trade-off: a rarely called tool cannot be certified alone, and pooling lets its answers
    ride on the pool's threshold; fewer groups also split delta less.
    """
    counts = Counter(actions)
    parts = len(counts) + 1
    groups = {}
    for action, n in counts.items():
        alone = not action.startswith("call:") or n >= _smallest_certifiable(target, delta / parts, n, binary(action))
        groups[action] = action if alone else "call"
    return groups


def group_of(action: str, groups: Mapping[str, str]) -> str:
    """The group of an answer's action: its own, else the pooled `call` for a call, else the action."""
    return groups.get(action) or ("call" if action.startswith("call:") else action)


def action_threshold(threshold: float | None, thresholds: Mapping[str, float | None] | None,
                     groups: Mapping[str, str] | None, action: str) -> float | None:
    """The threshold an answer taking `action` must reach: its group's when per-action `thresholds`
    exist (None: its group escalates), else the task's `threshold`."""
    if thresholds is None:
        return threshold
    return thresholds.get(group_of(action, groups or {}))


def certify_per_action(confidences: Sequence[float], scores: Sequence[float], actions: Sequence[str],
                       target: float, delta: float, binary: Callable[[str], bool],
                       start_coverage: float = 0.1) -> ActionCertification:
    """A threshold per predicted action group, each certified by `certify_threshold` at delta / groups.

    Each group's kept quality is >= target with probability >= 1 - delta / groups, so all of them
    at once with probability >= 1 - delta (Bonferroni); then the answers served together, a mixture
    of the groups' kept answers, also reach the target. Testing the groups jointly (one sequence
    over a product of thresholds) could spend delta better but searches a space exponential in the
    groups; Bonferroni over the few groups `action_groups` forms is simple and exact per group.
    A group's scores take the binomial bound when `binary(action)` holds for its actions.

    Raises ValueError as `certify_threshold` does, or when `actions` has another length.
    """
    conf, score = _check_pair(confidences, scores)
    if len(actions) != conf.size:
        raise ValueError(f"{len(actions)} actions for {conf.size} confidences")
    groups = action_groups(actions, target, delta, binary)
    members: dict[str, list[int]] = {}
    for i, action in enumerate(actions):
        members.setdefault(groups[action], []).append(i)
    each_delta = delta / len(members)
    each = {g: certify_threshold(conf[idx], score[idx], target, each_delta,
                                 binary_scores=all(binary(actions[i]) for i in idx), start_coverage=start_coverage)
            for g, idx in sorted(members.items())}
    return ActionCertification(groups=groups, thresholds={g: c.threshold for g, c in each.items()}, each=each,
                               delta_each=each_delta)


def served(confidences: Sequence[float], actions: Sequence[str], thresholds: Mapping[str, float | None],
           groups: Mapping[str, str]) -> np.ndarray:
    """Which answers the per-action thresholds keep (an action whose group has no threshold escalates)."""
    keep = []
    for conf, action in zip(confidences, actions):
        threshold = thresholds.get(group_of(action, groups))
        keep.append(threshold is not None and conf >= threshold)
    return np.asarray(keep, dtype=bool)


def examples_to_certify(quality: float, target: float, delta: float, binary: bool, limit: int = 100_000) -> int | None:
    """The fewest validation answers of mean score `quality` whose lower bound reaches `target`: how
    many a group needs at its current error rate. An estimate: it treats the observed mean as the
    true one and, for fractional scores, uses the binomial bound at that mean (the betting bound
    of such scores is near it when they cluster at 0 and 1, wider when they spread). None when
    `quality` <= target (no amount of data certifies it: the specialist must get better) or it
    would take more than `limit`.
    """
    if quality <= target:
        return None
    low, high = 1, 1
    while binomial_lower_bound(high, math.floor(quality * high), delta)[()] < target:
        low, high = high, high * 2
        if high > limit:
            return None
    while low < high:  # the bound grows with n at a fixed rate, up to the floor's rounding: bisect
        mid = (low + high) // 2
        low, high = (mid + 1, high) if binomial_lower_bound(mid, math.floor(quality * mid), delta)[()] < target \
            else (low, mid)
    return low


def binomial_lower_bound(n: Sequence[int] | np.ndarray | int, wins: Sequence[float] | np.ndarray | float,
                         delta: float) -> np.ndarray:
    """One-sided (1 - delta) lower confidence bounds on a success rate from `wins` of `n` 0/1 scores.

    The one-sided Clopper-Pearson bound, the delta quantile of Beta(wins, n - wins + 1) (0
    when wins = 0): it inverts the exact binomial tail, so it is valid and as tight as a
    bound for Bernoulli scores gets; for fractional scores it is not valid (use
    `betting_lower_bound`). For a perfect sample it is delta ** (1 / n). Vectorised: n and
    wins broadcast.

    Raises ValueError when n < 1 or not whole, wins is outside [0, n] or not whole, or
    delta is outside (0, 1).
    """
    from scipy.stats import beta

    count, wins = np.broadcast_arrays(np.asarray(n, dtype=float), np.asarray(wins, dtype=float))
    _check_delta(delta)
    if (count < 1).any() or (count != np.round(count)).any():
        raise ValueError("n must be whole numbers >= 1")
    if np.isnan(wins).any() or (wins < -_TOLERANCE).any() or (wins > count + _TOLERANCE).any():
        raise ValueError("wins must lie in [0, n]")
    rounded = np.round(wins)
    if (np.abs(wins - rounded) > 1e-6).any():
        raise ValueError("binary scores must sum to whole numbers")
    bound = np.zeros_like(rounded)
    won = rounded > 0
    bound[won] = beta.ppf(delta, rounded[won], count[won] - rounded[won] + 1)
    return bound


def betting_lower_bound(scores: Sequence[float] | np.ndarray, delta: float,
                        keep: np.ndarray | None = None) -> float | np.ndarray:
    """One-sided (1 - delta) lower confidence bound on the mean of scores in [0, 1], by betting.

    The Waudby-Smith & Ramdas (2020) hedged-capital bound, in the form Bates et al. (2021,
    "Distribution-free, risk-controlling prediction sets") use for risk control: for a
    candidate mean loss R, a gambler bets against "mean loss >= R" on each loss 1 - score
    in turn, with a bet size set by the variance seen so far; R is rejected once the
    wealth exceeds 1 / delta, and the bound is 1 - the smallest R not rejected (found by
    bisection, erring low). Valid for any distribution on [0, 1] with the scores taken in
    an order that does not depend on their values (the order given). It adapts to the
    variance: 100 answers scoring 0.95 +- 0.04 certify a mean of 0.92, where Hoeffding-Bentkus
    (which it replaced) certified 0.88; on the synthetic task of
    tests/test_calibrate.py it raised the certified coverage from 0.24 to 0.34 (of a
    possible 0.40) at 2.5% violations (delta 0.1). Its price: a perfect sample of m
    certifies 1 - (delta ** (-1 / m) - 1), a little below the binomial bound's
    delta ** (1 / m), so 0/1 scores keep `binomial_lower_bound`.

    `scores` is 1-D (returns a float), or 2-D for one bound per row (an array); `keep` (a boolean array of the same
    shape) marks the scores each row counts, in order, so rows may hold different
    subsets of one sequence. A row with nothing kept has bound 0.

    Raises ValueError when a score is outside [0, 1] or NaN, delta is outside (0, 1), or
    `keep` has another shape.
    """
    values = np.asarray(scores, dtype=float)
    flat = values.ndim == 1
    values = np.atleast_2d(values)
    mask = np.ones_like(values, dtype=bool) if keep is None else np.atleast_2d(np.asarray(keep, dtype=bool))
    if mask.shape != values.shape:
        raise ValueError(f"keep {mask.shape} must have the shape of scores {values.shape}")
    if np.isnan(values).any() or (values < 0).any() or (values > 1).any():
        raise ValueError("scores must lie in [0, 1]")
    _check_delta(delta)
    loss = np.where(mask, 1.0 - values, 0.0)
    seen = np.cumsum(mask, axis=1)
    mean = (0.5 + np.cumsum(loss, axis=1)) / (1.0 + seen)
    squares = np.where(mask, (loss - mean) ** 2, 0.0)
    variance_before = (0.25 + np.cumsum(squares, axis=1) - squares) / (1.0 + seen - mask)
    n = np.maximum(seen[:, -1:], 1)
    bet = np.where(mask, np.minimum(1.0, np.sqrt(2.0 * math.log(1.0 / delta) / (n * variance_before))), 0.0)
    lo, hi = np.zeros((values.shape[0], 1)), np.ones((values.shape[0], 1))  # the mean loss's upper bound
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        wealth = np.cumsum(np.log(np.maximum(1.0 - bet * (loss - mid), 1e-300)), axis=1).max(axis=1, keepdims=True)
        rejected = wealth > math.log(1.0 / delta)
        lo, hi = np.where(rejected, lo, mid), np.where(rejected, mid, hi)
    bound = np.where(seen[:, -1:] > 0, 1.0 - hi, 0.0)[:, 0]
    return float(bound[0]) if flat else bound


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _smallest_certifiable(target: float, delta: float, n: int, binary: bool) -> int:
    """Fewest kept answers whose bound can reach target when all are perfect: delta ** (1 / m)
    >= target for the binomial bound, (2 - target) ** m >= 1 / delta for the betting bound.

    No finite sample certifies a target of 1; n + 1 then says no threshold is tested.
    """
    if target >= 1.0:
        return n + 1
    if target <= 0.0:
        return 1
    per_answer = -math.log(target) if binary else math.log(2.0 - target)
    return max(1, math.ceil(math.log(1.0 / delta) / per_answer - _TOLERANCE))


# --- held-out evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatingPoint:
    """What a threshold does on a held-out set.

    threshold  the threshold judged (None: nothing is kept)
    n          examples in the set
    kept       examples with confidence >= threshold
    coverage   kept / n
    quality    mean score of the kept examples (None when none is kept)
    """

    threshold: float | None
    n: int
    kept: int
    coverage: float
    quality: float | None


def evaluate_threshold(threshold: float | None, confidences: Sequence[float], scores: Sequence[float]) -> OperatingPoint:
    """Coverage and kept quality at `threshold` on a set it was not chosen on (the test split).

    These are the out-of-sample figures to report: unbiased estimates of what the
    threshold does on new traffic (given exchangeability), unlike the validation figures
    it was certified on. None keeps nothing. No bound is attached: the held-out quality
    is an estimate with sampling noise of about sqrt(q (1 - q) / kept).

    Raises ValueError when the inputs are empty, of different lengths, not 1-D, contain
    NaN, or the threshold is NaN.
    """
    conf, score = _check_pair(confidences, scores)
    if threshold is None:
        return OperatingPoint(threshold=None, n=int(conf.size), kept=0, coverage=0.0, quality=None)
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    keep = conf >= threshold
    kept = int(keep.sum())
    return OperatingPoint(threshold=float(threshold), n=int(conf.size), kept=kept, coverage=kept / conf.size,
                          quality=float(score[keep].mean()) if kept else None)


def coverage_curve(confidences: Sequence[float], scores: Sequence[float]) -> tuple[tuple[float, float, float], ...]:
    """(threshold, coverage, kept quality) at every distinct confidence, highest threshold first.

    On the test split it shows what each threshold would have done there, beside the
    certified one; reading a threshold off it would be the in-sample choice of `calibrate`.
    Ties are kept or escalated together, as the router does.

    Raises ValueError when the inputs are empty, of different lengths, not 1-D or contain NaN.
    """
    conf, score = _check_pair(confidences, scores)
    thresholds, kept, sums = _kept_curve(conf, score)
    return tuple(zip(thresholds.tolist(), (kept / conf.size).tolist(), (sums / kept).tolist()))


# --- helpers ---------------------------------------------------------------------------------------------


def _check_pair(first: Sequence[float], second: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(first, dtype=float)
    b = np.asarray(second, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"inputs {a.shape} and {b.shape} must be equal-length 1-D sequences")
    if a.size == 0:
        raise ValueError("cannot calibrate on no examples")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("inputs must not contain NaN")
    return a, b


def _check_unit(name: str, values: np.ndarray) -> None:
    if (values < 0).any() or (values > 1).any():
        raise ValueError(f"{name} must lie in [0, 1]")


def _kept_curve(conf: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct confidence, highest first: the threshold, how many are kept, their score sum."""
    order = np.argsort(-conf, kind="stable")
    conf, score = conf[order], score[order]
    last_of_tie = np.flatnonzero(np.append(conf[1:] != conf[:-1], True))
    return conf[last_of_tie], last_of_tie + 1, np.cumsum(score)[last_of_tie]


def _logit(conf: np.ndarray) -> np.ndarray:
    clipped = np.clip(conf, _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    return np.log(clipped) - np.log1p(-clipped)


def _fit_platt(conf: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    from scipy.optimize import minimize
    from scipy.special import expit

    x = _logit(conf)
    positives = float(score.sum())
    negatives = conf.size - positives
    high, low = (positives + 1) / (positives + 2), 1 / (negatives + 2)
    y = low + score * (high - low)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        z = params[0] * x + params[1]
        residual = expit(z) - y
        return float(np.mean(np.logaddexp(0.0, z) - y * z)), np.array([np.mean(residual * x), np.mean(residual)])

    fit = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)])
    if not fit.success:
        raise RuntimeError(f"Platt scaling did not converge: {fit.message}")
    return {"method": "platt", "a": float(fit.x[0]), "b": float(fit.x[1])}
