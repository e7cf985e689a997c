"""Mean centering (`center=True`): each target's bias set so that its pre-activation has zero mean per channel.

For a layer whose pre-activation is `z = L + b`, with `L` linear in the kernel (Keras's Dense and convolutions), the
channel means of `L` at kernel scale 1 give the bias for any scale `s`: `b = -s·mean_c(L)` makes every channel's
mean `s·mean_c(L) + b` zero, and the variance is then `s²` times the mean within-channel variance at scale 1. So the
engines find the scale from the same one reduction as plain LSUV (`Moments.centered`). A layer whose output is
evaluated again at each scale tried (a `call` of its own, float16, several calls per pass, the sub-model engine) gets
that bias written at each scale (`find_centered_scale`) and measured; where the means have not followed (a `call`
that is not affine in the bias, a shared layer feeding its own later calls) the bias is corrected by the measured
means, as fastai's LSUV does (`bias -= mean`), until every channel's mean is within `MEAN_TOLERANCE`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from keras import ops

from keras_lsuv.report import LayerRecord
from keras_lsuv.rescale import Criterion, ScaleLimit, find_scale, float32_copy, write_bias
from keras_lsuv.statistics import Moments
from keras_lsuv.targets import Target

NO_BIAS_REASON = "no bias: scaled only, not centered"
# A channel counts as centered when its mean is within this fraction of the target standard deviation.
MEAN_TOLERANCE = 1e-2


@dataclasses.dataclass(frozen=True)
class Centering:
    """The bias that keeps a target's pre-activation at zero mean per channel, at any kernel scale.

    Example:

    >>> centering = Centering.of(target, moments(z, target.channel_shape(z)), bias)
    >>> centering.write(scale)   # after the kernel is multiplied by `scale`

    Args:
        target: The target, which has a bias.
        offsets: `mean_c(L)`: each channel's mean of the pre-activation without its bias, at kernel scale 1 (flat).
    """

    target: Target
    offsets: np.ndarray

    @classmethod
    def of(cls, target: Target, stats: Moments, bias: np.ndarray) -> Centering:
        """From the per-channel moments of the pre-activation at kernel scale 1, measured with the bias `bias`."""
        return cls(target, stats.mean - bias)

    def write(self, scale: float) -> None:
        """Sets the bias for the kernel multiplied by `scale`: `-scale·mean_c(L)`."""
        write_bias(self.target.layer.bias, -scale * self.offsets)

    def corrected(self, measured: Moments, scale: float) -> Centering:
        """The centering that moves each channel's mean `measured` at `scale` (with this bias written) to zero.

        For an affine layer the mean is `scale·mean_c(L) + bias`, so the correction is `measured.mean / scale`.
        """
        return Centering(self.target, self.offsets + measured.mean / scale)


def is_centered(stats: Moments, criterion: Criterion) -> bool:
    """Whether every channel's mean is within `MEAN_TOLERANCE` of zero, relative to the target standard deviation."""
    return bool(np.max(np.abs(stats.mean)) <= MEAN_TOLERANCE * np.sqrt(criterion.target_variance))


def channel_groups(target: Target, z: Any) -> tuple[int, ...] | None:
    """The groups whose moments centering needs: one per channel with a bias, the whole tensor without one."""
    return target.channel_shape(z) if target.has_bias else None


def find_centered_scale(
    target: Target,
    measure_at: Callable[[float], Moments],
    criterion: Criterion,
    limit: ScaleLimit,
) -> LayerRecord:
    """The paper's loop with the bias following each kernel scale tried, for layers evaluated again at each scale.

    Args:
        target: The target.
        measure_at: Multiplies the kernel by the given scale, evaluates the layer with the bias as it is then, and
            returns the pre-activation's moments over `channel_groups`.
        criterion: Target variance, tolerance and iteration limit.
        limit: The largest scale the layer's dtypes can hold.

    Returns:
        The record, with the variance and mean before centering and the mean measured last. The kernel and the bias
        are left at the record's scale.
    """
    before = measure_at(1.0)
    centering = None
    if target.has_bias:
        bias = np.asarray(ops.convert_to_numpy(float32_copy(target.layer.bias)), dtype="float64").reshape(-1)
        centering = Centering.of(target, before, bias)
    after = before

    def variance_at(scale: float) -> float:
        nonlocal after, centering
        # At once for an affine layer; a few corrections where the bias acts otherwise (at most T_max + 1 measures).
        for _ in range(criterion.max_iterations + 1):
            if centering is not None:
                centering.write(scale)
            after = measure_at(scale)
            if centering is None or is_centered(after, criterion) or not np.all(np.isfinite(after.mean)):
                break
            centering = centering.corrected(after, scale)
        return after.variance()

    return with_means(target, find_scale(target, variance_at, criterion, limit), before, after)


def with_means(target: Target, record: LayerRecord, before: Moments, after: Moments) -> LayerRecord:
    """A centered layer's record: the variance and mean before centering (`before`), the mean after (`after`)."""
    reason = record.reason
    if not target.has_bias and record.converged:
        reason = NO_BIAS_REASON
    return dataclasses.replace(
        record,
        initial_variance=before.variance(),
        initial_mean=before.grand_mean,
        final_mean=after.grand_mean,
        reason=reason,
    )
