"""Mean centering (`center=True`): each target's bias set so that its pre-activation has zero mean per channel.

For a layer whose pre-activation is `z = L + b`, with `L` linear in the kernel (Keras's Dense and convolutions), the
channel means of `L` at kernel scale 1 give the bias for any scale `s`: `b = -s·mean_c(L)` makes every channel's
mean `s·mean_c(L) + b` zero, and the variance is then `s²` times the mean within-channel variance at scale 1. So the
engines find the scale from the same one reduction as plain LSUV (`Moments.centered`). A layer whose output is
evaluated again at each scale tried (a `call` of its own, float16, several calls per pass, the sub-model engine) gets
that bias written at each scale (`find_centered_scale`) and measured; where the means have not followed (a `call`
that adds the bias with a gain other than 1 or not affinely, a shared layer feeding its own later calls) the bias
of each channel still off is corrected by its measured mean over the gain, `d mean / d bias`: 1 at first (fastai's
`bias -= mean`), measured again (the secant through the last two biases and means, one for the layer) wherever a
correction does not at least halve the largest mean (`center_at`). A record is
converged only if every channel's mean measured last is within `mean_tolerance` of its layer's compute dtype
(`with_means`); otherwise it says "not centered" and why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lsuv.report import LayerRecord
from keras_lsuv.rescale import Criterion, ScaleLimit, find_scale, float32_copy, write_bias
from keras_lsuv.statistics import Moments
from keras_lsuv.targets import Target

NO_BIAS_REASON = "no bias: scaled only, not centered"
RECURRENT_REASON = "recurrent: its input projection scaled only, not centered (its bias sets the gates' offsets)"
# A channel counts as centered when its mean is within this fraction of the target standard deviation, by the
# compute dtype of its layer. The bias is added in that dtype, so the channel means cannot be set more finely than
# its rounding of the bias, |b|·2^-(p+1) for p bits of mantissa: bfloat16's 7 bits miss 1% once |b| passes 2.5
# standard deviations (a channel whose mean before centering is 2.5 times its spread).
MEAN_TOLERANCES = {"bfloat16": 5e-2}
MEAN_TOLERANCE = 1e-2  # every other dtype: float16, float32, float64
# Below this |d mean / d bias|, the bias is taken not to move the means (it is not corrected further).
MIN_GAIN = 1e-3
# The gain is measured again where a correction left the largest channel mean above this fraction of what it was.
SLOW_CORRECTION = 0.5


def mean_tolerance(layer: keras.layers.Layer) -> float:
    """The largest |channel mean| of `layer`'s pre-activation that counts as centered, as a fraction of the target
    standard deviation, for its compute dtype (`MEAN_TOLERANCES`)."""
    return MEAN_TOLERANCES.get(keras.backend.standardize_dtype(layer.compute_dtype), MEAN_TOLERANCE)


@dataclasses.dataclass(frozen=True)
class Centering:
    """The bias that keeps a target's pre-activation at zero mean per channel, at any kernel scale.

    Example:

    >>> centering = Centering.of(target, moments(z, target.channel_shape(z)), bias)
    >>> centering.write(scale)   # after the kernel is multiplied by `scale`

    Args:
        target: The target, which has a bias.
        offsets: The bias per unit of kernel scale, negated (flat): `mean_c(L)` for a bias added as it is.
        gain: `d mean / d bias` as last measured (`measured_gain`): 1 until measured.
    """

    target: Target
    offsets: np.ndarray
    gain: float = 1.0

    @classmethod
    def of(cls, target: Target, stats: Moments, bias: np.ndarray) -> Centering:
        """From the per-channel moments of the pre-activation at kernel scale 1, measured with the bias `bias`."""
        return cls(target, stats.mean - bias)

    @classmethod
    def of_layer(cls, target: Target, stats: Moments) -> Centering:
        """`of`, for moments measured with the layer's bias as it is now (read here)."""
        return cls.of(target, stats, bias_now(target))

    def bias(self, scale: float) -> np.ndarray:
        """The bias for the kernel multiplied by `scale`: `-scale·offsets`."""
        return -scale * self.offsets

    def write(self, scale: float) -> None:
        """Sets the layer's bias to `bias(scale)`."""
        write_bias(self.target.layer.bias, self.bias(scale))

    @property
    def moves_means(self) -> bool:
        """Whether the bias moves the means, as far as measured: `|gain| >= MIN_GAIN`."""
        return abs(self.gain) >= MIN_GAIN

    def corrected(self, measured: Moments, scale: float, off: np.ndarray) -> Centering:
        """The centering that moves each channel of `off` (a mask) from its mean `measured` at `scale` (with this
        bias written) to zero, by the gain: `bias -= mean / gain`. Nothing moves where the bias does not move the
        means (`moves_means`)."""
        if not self.moves_means:
            return self
        step = np.where(off, measured.mean / self.gain, 0.0)
        return dataclasses.replace(self, offsets=self.offsets + step / scale)

    def measured_gain(self, scale: float, earlier: Centering, earlier_mean: np.ndarray, mean: np.ndarray) -> Centering:
        """This centering with the gain measured from `earlier` (whose bias at `scale` gave the means
        `earlier_mean`) to this one (`mean`): the secant through both, fitted over the channels by least squares.

        One gain for the layer, not one per channel: where the channels' means depend on each other's biases (a
        shared layer feeding its own later calls), a secant per channel measures the others' steps as its own.
        """
        step, change = self.bias(scale) - earlier.bias(scale), mean - earlier_mean
        moved = np.isfinite(change)
        size = float(np.sum(np.square(step[moved])))
        if size == 0:
            return self
        return dataclasses.replace(self, gain=float(np.sum(step[moved] * change[moved])) / size)


def bias_now(target: Target) -> np.ndarray:
    """The layer's bias as it is now, flat, float64 on the host (`Target.host_bias` is the one read before the run)."""
    return np.asarray(ops.convert_to_numpy(float32_copy(target.layer.bias)), dtype="float64").reshape(-1)


def off_center(target: Target, stats: Moments, criterion: Criterion) -> np.ndarray:
    """Which channels' means are beyond `mean_tolerance(target.layer)` of zero, relative to the target standard
    deviation (a mask; NaN means count as off)."""
    bound = mean_tolerance(target.layer) * np.sqrt(criterion.target_variance)
    return np.asarray(~(np.abs(stats.mean) <= bound))


def is_centered(target: Target, stats: Moments, criterion: Criterion) -> bool:
    """Whether every channel's mean is within `mean_tolerance(target.layer)` of zero (`off_center`)."""
    return not np.any(off_center(target, stats, criterion))


def channel_groups(target: Target, z: Any) -> tuple[int, ...] | None:
    """The groups whose moments centering needs: one per channel with a bias, the whole tensor without one."""
    return target.channel_shape(z) if target.has_bias else None


def center_at(
    centering: Centering, scale: float, measure_at: Callable[[float], Moments], criterion: Criterion
) -> tuple[Centering, Moments]:
    """Writes the centering's bias for `scale`, measures, and corrects the channels still off until every one is
    centered, none can move, or `max_iterations + 1` measures; returns the centering written last and its moments.

    The gain is measured again (`Centering.measured_gain`) only where a correction left the largest mean above
    `SLOW_CORRECTION` of what it was: where the channels' means depend on each other's biases (a block shared along
    a chain), the measured gain varies from step to step, and `bias -= mean` does better while it works.
    """
    target, earlier = centering.target, None
    for _ in range(criterion.max_iterations + 1):
        centering.write(scale)
        measured = measure_at(scale)
        off = off_center(target, measured, criterion)
        if not np.any(off) or not np.all(np.isfinite(measured.mean)):
            break
        if earlier is not None and _largest(measured.mean) > SLOW_CORRECTION * _largest(earlier[1]):
            centering = centering.measured_gain(scale, *earlier, measured.mean)
        if not centering.moves_means:
            break
        earlier, centering = (centering, measured.mean), centering.corrected(measured, scale, off)
    return centering, measured


def _largest(means: np.ndarray) -> float:
    return float(np.max(np.abs(means)))


def find_centered_scale(
    target: Target,
    measure_at: Callable[[float], Moments],
    criterion: Criterion,
    limit: ScaleLimit,
    exponent: float | None = None,
) -> LayerRecord:
    """The paper's loop with the bias following each kernel scale tried, for layers evaluated again at each scale.

    Args:
        target: The target.
        measure_at: Multiplies the kernel by the given scale, evaluates the layer with the bias as it is then, and
            returns the pre-activation's moments over `channel_groups`.
        criterion: Target variance, tolerance and iteration limit.
        limit: The largest scale the layer's dtypes can hold.
        exponent: For secant steps, the exponent of the variance in the scale as far as known
            (`rescale.find_scale`).

    Returns:
        The record, with the variance and mean before centering and the mean measured last; not converged where a
        channel's mean is still off (`with_means`). The kernel and the bias are left at the record's scale.
    """
    before = measure_at(1.0)
    centering = None
    if target.has_bias:
        centering = Centering.of_layer(target, before)
    after = before

    def variance_at(scale: float) -> float:
        nonlocal after, centering
        if centering is None:
            after = measure_at(scale)
        else:  # at once for an affine layer; a few corrections where the bias acts otherwise
            centering, after = center_at(centering, scale, measure_at, criterion)
        return after.variance()

    record = find_scale(target, variance_at, criterion, limit, exponent=exponent)
    return with_means(target, record, before, after, criterion, centering)


def with_means(
    target: Target,
    record: LayerRecord,
    before: Moments,
    after: Moments,
    criterion: Criterion,
    centering: Centering | None = None,
) -> LayerRecord:
    """A centered layer's record: the variance and mean before centering (`before`), the mean after (`after`, per
    channel), and not converged where a channel's mean in `after` is beyond `mean_tolerance`.

    Args:
        centering: The centering written last, if the bias was corrected by measure: its gain tells whether the
            bias moves the means at all.
    """
    reason, converged = record.reason, record.converged
    if not target.has_bias and converged:
        reason = uncentered_reason(target)
    elif target.has_bias and converged and not is_centered(target, after, criterion):
        converged, reason = False, not_centered_reason(target, after, criterion, centering)
    return dataclasses.replace(
        record,
        initial_variance=before.variance(),
        initial_mean=before.grand_mean,
        final_mean=after.grand_mean,
        converged=converged,
        reason=reason,
    )


def uncentered_reason(target: Target) -> str:
    """Why `target`, which `center=True` does not center, converged scaled only: it has no bias, or it is a
    recurrent layer."""
    return RECURRENT_REASON if target.is_recurrent else NO_BIAS_REASON


def not_centered_reason(target: Target, after: Moments, criterion: Criterion, centering: Centering | None) -> str:
    """Why a layer with channel means `after` is not centered: how far off, and what `centering` could not do."""
    off = off_center(target, after, criterion)
    deviations = float(np.max(np.abs(after.mean))) / np.sqrt(criterion.target_variance)
    dtype = keras.backend.standardize_dtype(target.layer.compute_dtype)
    reason = (
        f"not centered: channel means up to {deviations:.3g} of the target standard deviation in "
        f"{int(np.sum(off))} of {off.size} channels ({mean_tolerance(target.layer):g} is the tolerance in {dtype})"
    )
    if centering is not None and not centering.moves_means:
        reason += (
            f"; changing its bias leaves its means as they were (a bias that does not enter the output, or changes "
            f"that {dtype} rounds away)"
        )
    return reason
