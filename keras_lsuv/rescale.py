"""The paper's rescaling loop for one layer (and its closed form on the device), shared by the engines, and the safe
write of a rescaled kernel."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lsuv.report import LayerRecord
from keras_lsuv.targets import Target

# A rescale needs sqrt(target / variance); below this relative variance the output carries no usable signal and
# rescaling would only blow the kernel up.
MIN_RELATIVE_VARIANCE = 1e-12
# The largest scale accepted is this fraction of the one that reaches the largest finite value of the kernel's (or
# the layer's compute) dtype: a margin for the bias, for rounding and for the spread of values between samples.
DTYPE_MARGIN = 0.25


@dataclasses.dataclass(frozen=True)
class Criterion:
    """When a layer is done: `|variance - target_variance| < tolerance`, or `max_iterations` rescales."""

    target_variance: float = 1.0
    tolerance: float = 0.1
    max_iterations: int = 10


@dataclasses.dataclass(frozen=True)
class ScaleLimit:
    """The largest kernel scale the layer's dtypes can hold, and which dtype sets it.

    Args:
        scale: The largest accepted total scale of the kernel.
        dtype: The dtype that sets it (the kernel's, or the layer's compute dtype).
    """

    scale: float = math.inf
    dtype: str = "float32"

    @classmethod
    def of(cls, kernel: keras.Variable, original: Any, layer: keras.layers.Layer, output_peak: float) -> ScaleLimit:
        """The limit for scaling `original` (float32) into `kernel`, and outputs peaking at `output_peak` at scale 1.

        Args:
            kernel: The kernel variable (its dtype bounds the kernel values).
            original: The unscaled kernel values, float32.
            layer: The layer (its compute dtype bounds the outputs).
            output_peak: The largest absolute pre-activation value at scale 1 (0 if not measured).
        """
        limits = [cls()]
        # The kernel is stored in its own dtype and cast to the compute dtype in the forward pass. Only float16's
        # range is narrower than float32's; for the others no realistic scale overflows (and a non-finite output
        # stops the run with every weight restored), so the kernel's peak is not computed for them.
        narrow = [d for d in (variable_dtype(kernel), _dtype_name(layer.compute_dtype)) if _largest(d) < 1e38]
        kernel_peak = float(ops.convert_to_numpy(ops.max(ops.abs(original)))) if narrow else 0.0
        if kernel_peak > 0:
            for dtype in narrow:
                limits.append(cls(DTYPE_MARGIN * _largest(dtype) / kernel_peak, dtype))
        if output_peak > 0:
            limits.append(cls(DTYPE_MARGIN * _largest(layer.compute_dtype) / output_peak, layer.compute_dtype))
        return min(limits, key=lambda limit: limit.scale)


def find_scale(
    target: Target,
    variance_at: Callable[[float], float],
    criterion: Criterion,
    limit: ScaleLimit = ScaleLimit(),
    floor: float | None = None,
) -> LayerRecord:
    """Runs LSUV's loop: while `|var - target| >= tol` and fewer than `T_max` rescales, `scale *= sqrt(target / var)`.

    Args:
        target: The layer being processed (for the record and messages).
        variance_at: Returns the measured output variance when the kernel is
            multiplied by the given scale.
        criterion: Target variance, tolerance and iteration limit.
        limit: The largest scale the layer's dtypes can hold; a layer that
            would need more stops there, not converged.
        floor: The variance at kernel scale 0 (the bias alone), when known:
            if it is above the target, no scale can reach the target and
            the kernel is left as it is instead of being shrunk towards 0.

    Returns:
        The layer's record; `record.scale` is the factor to apply to the kernel.

    Raises:
        ValueError: If the layer's output is not finite.
    """
    goal = criterion.target_variance
    scale, iterations, reason = 1.0, 0, None
    initial = current = variance_at(scale)
    while True:
        _check_finite(target, current, scale)
        if abs(current - goal) < criterion.tolerance or iterations >= criterion.max_iterations:
            break
        if floor is not None and floor >= goal + criterion.tolerance and current > goal:
            reason = f"the bias alone gives a variance of {floor:.3g}, above the target: no kernel scale can reach it"
            break
        if current <= MIN_RELATIVE_VARIANCE * goal:
            reason = _too_small_reason(current, goal)
            break
        step = math.sqrt(goal / current)
        if scale * step > limit.scale:
            reason = (
                f"reaching the target would need a kernel scale of {scale * step:.3g}, beyond what {limit.dtype} "
                f"can hold (at most {limit.scale:.3g})"
            )
            break
        scale *= step
        iterations += 1
        current = variance_at(scale)
    return _record(target, initial, current, iterations, scale, criterion, reason)


def unit_scale(variance: Any, criterion: Criterion) -> Any:
    """LSUV's loop in closed form, on the device, for a pre-activation `s·z` linear in the kernel with no bias.

    `var(s·z) = s²·var(z)`, so `find_scale` would stop after at most one rescale, by `sqrt(target / var)`, and
    make none where `var` is within tolerance already, too small to rescale safely, not finite, or where
    `max_iterations` is 0. This makes the same choice from `variance` (a float32 scalar from
    `statistics.variance_on_device`) without reading it back, so the pass goes on without waiting for the host:
    for accelerators, where a read-back makes the device wait.
    The kernel's dtypes cannot limit the scale: it is for float32 kernels computed in float32 only, where a scale is
    at most `MIN_RELATIVE_VARIANCE ** -0.5`.

    Args:
        variance: The output variance at scale 1, a float32 scalar tensor.
        criterion: Target variance, tolerance and iteration limit.

    Returns:
        The scale, a float32 scalar tensor on the device of `variance`; `unit_scale_record` reports it.
    """
    goal = criterion.target_variance
    if criterion.max_iterations < 1:
        return ops.ones((), dtype="float32")
    # A NaN fails every comparison; an infinite variance fails the last one: neither is rescaled.
    rescale = ops.logical_and(
        ops.greater_equal(ops.abs(ops.subtract(variance, goal)), criterion.tolerance),
        ops.logical_and(ops.greater(variance, MIN_RELATIVE_VARIANCE * goal), ops.less(variance, math.inf)),
    )
    return ops.where(rescale, ops.sqrt(ops.divide(goal, variance)), ops.ones((), dtype="float32"))


def unit_scale_record(target: Target, variance: float, scale: float, criterion: Criterion) -> LayerRecord:
    """The record of a layer rescaled by `unit_scale`, from its variance and scale read back after the pass.

    The final variance is computed from the scale as applied (float32), as `find_scale` computes it from moments.

    Raises:
        ValueError: If the layer's output is not finite.
    """
    _check_finite(target, variance, 1.0)
    current = scale * scale * variance
    iterations = int(scale != 1.0)
    goal = criterion.target_variance
    # Where `find_scale` would stop for a variance too small to rescale (the record's reason, as it gives it).
    too_small = criterion.max_iterations >= 1 and criterion.tolerance <= abs(variance - goal)
    reason = _too_small_reason(variance, goal) if too_small and variance <= MIN_RELATIVE_VARIANCE * goal else None
    return _record(target, variance, current, iterations, scale, criterion, reason)


def _check_finite(target: Target, variance: float, scale: float) -> None:
    layer = target.layer
    if math.isinf(variance):
        # A NaN or Inf output makes its variance NaN (Inf - Inf); an infinite variance comes from finite outputs
        # whose squared deviations (or whose sum, for the mean) overflow the float32 statistics.
        raise ValueError(
            f"LSUV: the output variance of layer '{layer.name}' ({type(layer).__name__}) overflowed float32 (inf) "
            f"at kernel scale {scale:.4g}, although the outputs are finite: their values are too large to measure "
            "(beyond about 1.8e19, the square root of float32's largest value). Scale the inputs down (e.g. "
            "standardize them) or check the layers before it."
        )
    if not math.isfinite(variance):
        raise ValueError(
            f"LSUV: layer '{layer.name}' ({type(layer).__name__}) produced non-finite values "
            f"(output variance {variance}) at kernel scale {scale:.4g}. Check the batch and the layers before it."
        )


def _too_small_reason(variance: float, goal: float) -> str:
    if variance > MIN_RELATIVE_VARIANCE:  # a usable output: it is the target that cannot be reached
        return f"target variance {goal:g} is out of reach from output variance {variance:.3g}"
    return f"output variance {variance:.3g} is too small to rescale safely"


def _record(
    target: Target,
    initial: float,
    current: float,
    iterations: int,
    scale: float,
    criterion: Criterion,
    reason: str | None,
) -> LayerRecord:
    goal = criterion.target_variance
    converged = abs(current - goal) < criterion.tolerance
    if not converged and reason is None:
        reason = f"|variance - target| = {abs(current - goal):.3g} after {iterations} rescales"
    return LayerRecord(
        name=target.layer.name,
        class_name=type(target.layer).__name__,
        initial_variance=initial,
        final_variance=current,
        iterations=iterations,
        converged=converged,
        scale=scale,
        reason=reason,
        layer=target.layer,
    )


def float32_copy(kernel: keras.Variable) -> Any:
    """The kernel's own values in float32, read outside any autocast scope (never a float16 copy)."""
    with _no_autocast():
        return ops.cast(ops.copy(kernel.value), "float32")


def write_kernel(kernel: keras.Variable, original: Any, scale: float | Any) -> None:
    """Sets `kernel` to `original * scale`, computed in float32 and written to the variable itself.

    `original` is the unscaled kernel in float32 (from `float32_copy`), so rescales neither accumulate error nor
    start from a float16 cast of a float32 kernel. `scale` must be within the layer's `ScaleLimit`, which keeps
    the result finite in the variable's dtype and in the compute dtype.

    Args:
        kernel: The kernel variable.
        original: Its unscaled values, float32.
        scale: The factor: a float, or a float32 scalar tensor (from `unit_scale`).
    """
    value = ops.cast(ops.multiply(original, scale), variable_dtype(kernel))
    with _no_autocast():
        kernel.assign(value)


def variable_dtype(kernel: keras.Variable) -> str:
    """The variable's own dtype (inside an autocast scope `kernel.dtype` is the scope's dtype)."""
    with _no_autocast():
        return _dtype_name(kernel.value.dtype)


def _no_autocast() -> Any:
    # Inside a mixed-precision layer's call, Keras's autocast scope makes `variable.value` a float16/bfloat16 copy,
    # and torch's `assign` copies into `variable.value`: a write there is lost. Keras has no public way to leave
    # the scope; `AutocastScope(None)` is what `Layer.__call__` itself uses to switch autocasting off.
    from keras.src.backend import AutocastScope

    return AutocastScope(None)


def _largest(dtype: Any) -> float:
    return float(np.finfo(_dtype_name(dtype)).max) if _dtype_name(dtype) != "bfloat16" else 3.39e38


def _dtype_name(dtype: Any) -> str:
    return str(keras.backend.standardize_dtype(dtype))
