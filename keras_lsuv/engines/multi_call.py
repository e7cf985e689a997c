"""Layers called several times per pass: rescaled at their first call for every call, measured over every call.

The paper's statistic is one variance over a layer's whole output. A layer called several times per forward pass
(`TimeDistributed`, a tower shared by two inputs, a block shared along a chain as in ALBERT, a Perceiver's
cross-attention) has its output spread over its calls. The single-pass engine rescales such a layer once per pass, at
its first call, and leaves it at that scale for the pass's other calls, so the layers after it see its outputs as its
kernel ends the pass: the whole pass is then a plain forward pass of the model as it stands, and what it measures of
every call is the truth about the model.

The first call cannot see the others, so it is rescaled for a prediction of them all (`Prediction`), made from what
the previous pass measured of the same layer: how the variance over every call compares with the first call's, how
the channel means of every call differ from the first call's (`center=True`), and how that ratio moved with the
layer's own scale between the last two passes (`Prediction.exponent`: a layer feeding its own later calls, such as a
block shared along a chain, has a variance that is not quadratic in its scale). The pass measures every call; where
the variance over all of them (or a channel's mean) misses the target, the layer and everything after its first call
are done again in the next pass, with a new prediction (`SinglePass._end_pass`). So the number of passes follows the
iterations to converge, not the number of layers; in the first pass no layer has a prediction, and its first call
stands for all (frames of a `TimeDistributed` layer, or two inputs of a tower, that are alike converge there).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from keras_lsuv.rescale import Criterion, secant_exponent
from keras_lsuv.statistics import Moments

# A layer whose later calls depend on layers rescaled after its first call, and whose variance over every call is off
# by more than this factor (log), starts with half steps: all such layers rescaled at once overshoot where the later
# calls depend strongly on them (a residual block shared along a chain: 10x off, 0.13 after a full step), while a
# modest miss (a Perceiver's, ALBERT's: 1.5-2x) is reached in one full step.
COUPLED_MISS = math.log(2.5)
# The least gain of every call's channel means per unit of bias the centering assumes: near 0 the bias would blow up.
MIN_GAIN = 0.1


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The variance (and channel means) over every call of a layer, predicted from its first call's.

    Around the kernel scale `scale`, the variance over every call is `ratio` times the first call's, times
    `(s / scale) ** (exponent - 2)`: a first call's pre-activation variance goes with the square of the scale, and
    a layer whose later calls do not depend on it (`exponent` 2) keeps the ratio at every scale. Where the layers
    called several times feed each other's later calls (a block shared along a chain), each one's rescale moves the
    others' variance too, and rescaling them all at once overshoots: a layer whose variance over every call went
    past the target since the pass before takes half the step it took (`step`, as if the exponent were
    `exponent / step`), and a longer one again while it does not.

    Example:

    >>> prediction = Prediction(ratio=2.0, scale=1.0)
    >>> prediction.variance(lambda s: s * s)(0.5)  # the first call at 0.25, every call at twice that
    0.5

    Args:
        ratio: The variance over every call over the first call's, measured at `scale` (within each channel with
            `center=True`).
        scale: The layer's kernel scale when it was measured.
        exponent: `p` in `variance ∝ s**p` over every call, as measured between the last two passes (2 until
            measured, the paper's step), at least 2.
        shift: With `center=True`, each channel's mean over every call less the first call's, per unit of kernel
            scale (the bias cancels in it); `None` otherwise.
        miss: `log(variance / target)` over every call, as measured at `scale`.
        step: The fraction of the step to the target the layer takes (1 unless it overshot).
        bias: With `center=True`, the layer's bias when it was measured (flat); `None` otherwise.
        feedback: With `center=True`, how much more than the first call's the later calls' channel means move per
            unit of bias (`G - 1`, the later calls feeding on the layer's own output), as measured between the last
            two passes (a secant through their biases and shifts, fitted over the channels); 0 until measured.
    """

    ratio: float
    scale: float
    exponent: float = 2.0
    shift: np.ndarray | None = dataclasses.field(default=None, compare=False)
    miss: float = 0.0
    step: float = 1.0
    bias: np.ndarray | None = dataclasses.field(default=None, compare=False)
    feedback: float = 0.0

    @property
    def power(self) -> float:
        """The exponent the prediction gives the variance over every call: `exponent / step`."""
        return self.exponent / self.step

    def factor(self, scale: float) -> float:
        """What the first call's variance at `scale` is multiplied by."""
        if self.power == 2.0 or scale <= 0:
            return self.ratio
        return self.ratio * float((scale / self.scale) ** (self.power - 2.0))

    def variance(self, first: Callable[[float], float]) -> Callable[[float], float]:
        """`scale -> the predicted variance over every call`, from the first call's `scale -> variance`."""
        return lambda scale: self.factor(scale) * first(scale)

    def moments(self, first: Moments, scale: float, bias: np.ndarray | None = None) -> Moments:
        """The predicted per-channel moments over every call, from the first call's at kernel scale `scale` (and
        with the layer's bias `bias`, where the later calls feed on it: `feedback`)."""
        mean = first.mean if self.shift is None else first.mean + scale * self.shift
        if bias is not None and self.bias is not None:
            mean = mean + self.feedback * (bias - self.bias)
        return Moments(first.count, mean, first.m2 * self.factor(scale))

    def centering_bias(self, first_mean: np.ndarray, scale: float) -> np.ndarray:
        """The bias that gives every channel a predicted mean of 0 over every call, for the kernel scaled by
        `scale`: `first_mean` is each channel's mean of the first call's kernel term `L` at scale 1.

        The first call's mean is `s·mean(L) + b`; every call's adds `s·shift + feedback·(b - bias)`.
        """
        shift = 0.0 if self.shift is None else self.shift
        feedback = 0.0 if self.bias is None else self.feedback
        earlier = 0.0 if self.bias is None else self.bias
        return np.asarray((-scale * (first_mean + shift) + feedback * earlier) / (1.0 + feedback))


def predict(
    first: Moments,
    every: Moments,
    scale: float,
    earlier: Prediction | None,
    criterion: Criterion,
    coupled: bool = False,
    bias: np.ndarray | None = None,
) -> Prediction:
    """The prediction for the next pass, from the moments of a layer's first call and of every call (with the first)
    measured in this pass at kernel scale `scale`, and the prediction this pass used (`None` in the first pass).

    The exponent is the secant of `log(ratio)` against `log(scale)` through this pass and the one before, plus 2
    (`rescale.secant_exponent`), at least 2; where the scale hardly moved it stays as it was. The step halves where
    the variance went past the target since the pass before, and grows by half again (up to 1) where it did not;
    it starts at a half for a layer `coupled` to others (one rescaled between its first and its last call, whose
    scale may move its later calls) whose variance over every call missed by more than `COUPLED_MISS`. With
    `center=True` (a `bias`, the layer's as measured), the feedback is the secant through this pass's and the one
    before's biases and shifts, `G` at least `MIN_GAIN`.
    """
    center = bias is not None
    spread_first, spread_every = (first.centered(), every.centered()) if center else (first, every)
    ratio = _ratio(spread_every.variance(), spread_first.variance())
    shift = (every.mean - first.mean) / scale if center and scale > 0 else None
    miss = math.log(_ratio(spread_every.variance(), criterion.target_variance))
    if earlier is None:
        return Prediction(ratio, scale, 2.0, shift, miss, 0.5 if coupled and abs(miss) > COUPLED_MISS else 1.0, bias)
    # The first call's variance goes as scale², the ratio as scale**(p - 2).
    secant = secant_exponent((earlier.scale, earlier.ratio * earlier.scale**2), (scale, ratio * scale**2), 2.0)
    step = earlier.step / 2 if miss * earlier.miss < 0 else min(1.0, earlier.step * 1.5)
    feedback = earlier.feedback
    if bias is not None and earlier.bias is not None and earlier.shift is not None and shift is not None:
        moved, shifted = bias - earlier.bias, scale * shift - earlier.scale * earlier.shift
        size = float(np.sum(np.square(moved)))
        if size > 0 and np.all(np.isfinite(shifted)):
            feedback = max(float(np.sum(moved * shifted)) / size, MIN_GAIN - 1.0)
    return Prediction(ratio, scale, max(secant, 2.0), shift, miss, step, bias, feedback)


def every_call(measured: list[Moments]) -> Moments:
    """The moments of every call together."""
    total = measured[0]
    for more in measured[1:]:
        total = total.merge(more)
    return total


def reached(variance: float, criterion: Criterion) -> bool:
    """Whether a variance is within the criterion's tolerance of its target."""
    return abs(variance - criterion.target_variance) < criterion.tolerance


def _ratio(every: float, first: float) -> float:
    if not (math.isfinite(every) and math.isfinite(first)) or first <= 0 or every <= 0:
        return 1.0
    return every / first
