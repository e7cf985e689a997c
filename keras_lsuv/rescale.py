"""The paper's rescaling loop for one layer (and its closed form on the device), shared by the engines, and the safe
write of a rescaled kernel."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NoReturn

import keras
import numpy as np
from keras import ops
from keras.src.backend import AutocastScope  # private: see `_no_autocast`

from keras_lsuv.report import LayerRecord
from keras_lsuv.statistics import host_values, on_host
from keras_lsuv.targets import Target

# A rescale needs sqrt(target / variance); below this relative variance the output carries no usable signal and
# rescaling would only blow the kernel up.
MIN_RELATIVE_VARIANCE = 1e-12
# The largest scale accepted is this fraction of the one that reaches the largest finite value of the kernel's (or
# the layer's compute) dtype: a margin for the bias, for rounding and for the spread of values between samples.
DTYPE_MARGIN = 0.25
# The secant step (`secant_exponent`) estimates the exponent of the variance in the scale within these bounds: a
# secant through two noisy measurements can be far off, and an exponent near 0 would make the step diverge. Within
# one layer's loop the variance is a deterministic function of the scale, and a damped prediction of every call of
# a layer (`engines.multi_call.Prediction`) can be steep: its own bounds are wider.
EXPONENTS = (0.5, 8.0)
LOOP_EXPONENTS = (0.5, 64.0)
# Below this relative change of the scale between two measurements, a secant measures noise, not the exponent.
MIN_SCALE_CHANGE = 1e-3


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


class Stop(enum.IntEnum):
    """Why the paper's loop stops at a layer (`next_scale`), or `RESCALE` when it rescales once more."""

    RESCALE = 0
    DONE = 1  # within tolerance, or `max_iterations` rescales made
    BIAS_FLOOR = 2  # the bias alone keeps the variance above the target
    TOO_SMALL = 3  # the output carries no usable signal
    BEYOND_DTYPE = 4  # the next scale would not fit the layer's dtypes
    NOT_FINITE = 5  # the output is not finite, or its variance overflowed


def next_scale(
    variance: Any,
    scale: Any,
    iterations: int,
    criterion: Criterion,
    limit: float = math.inf,
    floor: float = -math.inf,
    xp: Any = np,
    exponent: float = 2.0,
) -> tuple[Any, Any]:
    """The paper's stopping rule, once: given the variance measured at kernel scale `scale`, stop or rescale.

    A pure function of numbers, the same on the host and on the device: `xp` is `numpy` or `SCALARS` for host
    floats (the loop of `find_scale` uses the latter) or `keras.ops` for a device scalar (`unit_scale`, where
    nothing may be read back), and only `where` selects, never a branch.

    Example:

    >>> stop, proposed = next_scale(4.0, 1.0, 0, Criterion())
    >>> Stop(int(stop)), float(proposed)
    (<Stop.RESCALE: 0>, 0.5)

    Args:
        variance: The output variance measured at `scale`.
        scale: The kernel's total scale so far.
        iterations: The rescales made so far.
        criterion: Target variance, tolerance and iteration limit.
        limit: The largest total scale the layer's dtypes hold (`ScaleLimit.scale`).
        floor: The least variance any kernel scale gives (the bias alone), where known.
        xp: `numpy`, `SCALARS` or `keras.ops`.
        exponent: `p` where the variance goes as `scale**p` (`secant_exponent`): 2, the paper's, by default.

    Returns:
        `(stop, proposed)`: a `Stop` code, and `scale·(target / variance)**(1/exponent)` (the paper's
        `scale·sqrt(target / variance)` for exponent 2), the scale to measure next when the code is `Stop.RESCALE`.
    """
    goal, tolerance = criterion.target_variance, criterion.tolerance
    ratio = xp.divide(goal, xp.maximum(variance, MIN_RELATIVE_VARIANCE * goal))
    step = xp.sqrt(ratio) if exponent == 2.0 else xp.power(ratio, 1.0 / exponent)
    proposed = xp.multiply(scale, step)
    # The first rule that holds stops the loop, in this order; a NaN fails every comparison but the first.
    rules = [
        (xp.logical_not(xp.isfinite(variance)), Stop.NOT_FINITE),
        (
            xp.logical_or(
                xp.less(xp.abs(xp.subtract(variance, goal)), tolerance), iterations >= criterion.max_iterations
            ),
            Stop.DONE,
        ),
        (xp.logical_and(floor >= goal + tolerance, xp.greater(variance, goal)), Stop.BIAS_FLOOR),
        (xp.less_equal(variance, MIN_RELATIVE_VARIANCE * goal), Stop.TOO_SMALL),
        (xp.greater(proposed, limit), Stop.BEYOND_DTYPE),
    ]
    stop: Any = int(Stop.RESCALE)
    for holds, code in reversed(rules):
        stop = xp.where(holds, int(code), stop)
    return stop, proposed


class _Scalars:
    """The functions `next_scale` uses, on Python floats (`SCALARS`): the same IEEE arithmetic as NumPy's on float64
    scalars, without a ufunc call per operation (about 30 µs per decision with `numpy`, 3 µs with these).

    NaN compares false as in NumPy, and `maximum` keeps a NaN first argument (the only one that can be NaN).
    """

    multiply = staticmethod(operator.mul)
    divide = staticmethod(operator.truediv)
    subtract = staticmethod(operator.sub)
    less = staticmethod(operator.lt)
    less_equal = staticmethod(operator.le)
    greater = staticmethod(operator.gt)
    abs = staticmethod(abs)
    sqrt = staticmethod(math.sqrt)
    power = staticmethod(operator.pow)
    isfinite = staticmethod(math.isfinite)
    logical_not = staticmethod(operator.not_)

    @staticmethod
    def maximum(a: float, b: float) -> float:
        return b if a < b else a

    @staticmethod
    def logical_or(a: bool, b: bool) -> bool:
        return a or b

    @staticmethod
    def logical_and(a: bool, b: bool) -> bool:
        return a and b

    @staticmethod
    def where(condition: bool, x: int, y: int) -> int:
        return x if condition else y


SCALARS = _Scalars()


def find_scale(
    target: Target,
    variance_at: Callable[[float], float],
    criterion: Criterion,
    limit: ScaleLimit = ScaleLimit(),
    floor: float | None = None,
    exponent: float | None = None,
) -> LayerRecord:
    """Runs LSUV's loop: while `|var - target| >= tol` and fewer than `T_max` rescales, `scale *= sqrt(target / var)`.

    Each step is `next_scale`'s decision, on host floats (`SCALARS`). With an `exponent`, for a variance that need
    not go with the square of the scale (a layer feeding its own later calls), each step is
    `scale *= (target / var)**(1/p)`, `p` the `exponent` at first, then the secant of the log-variance against the
    log-scale through the last two measurements (`secant_exponent`): where the variance does go with the square, `p`
    is 2 and the steps are the paper's.

    Args:
        target: The layer being processed (for the record and messages).
        variance_at: Returns the measured output variance when the kernel is
            multiplied by the given scale.
        criterion: Target variance, tolerance and iteration limit.
        limit: The largest scale the layer's dtypes can hold; a layer that
            would need more stops there, not converged.
        floor: The least variance any kernel scale gives (the bias alone),
            when known: if it is above the target, no scale can reach the
            target and the kernel is left as it is instead of being shrunk
            towards 0.
        exponent: The exponent of the variance in the scale, as far as known, for secant steps; `None` for the
            paper's steps.

    Returns:
        The layer's record; `record.scale` is the factor to apply to the kernel.

    Raises:
        ValueError: If the layer's output is not finite.
    """
    scale, iterations, power = 1.0, 0, 2.0 if exponent is None else exponent
    initial = current = variance_at(scale)
    while True:
        code, proposed = next_scale(current, scale, iterations, criterion, limit.scale, _floor(floor), SCALARS, power)
        stop = Stop(int(code))
        if stop != Stop.RESCALE:
            break
        earlier = (scale, current)
        scale, iterations = float(proposed), iterations + 1
        current = variance_at(scale)
        if exponent is not None:
            power = secant_exponent(earlier, (scale, current), power, LOOP_EXPONENTS)
    reason = _stop_reason(target, stop, current, scale, criterion, float(proposed), limit, floor)
    return _record(target, initial, current, iterations, scale, criterion, reason)


def secant_exponent(
    earlier: tuple[float, float],
    latest: tuple[float, float],
    default: float = 2.0,
    bounds: tuple[float, float] = EXPONENTS,
) -> float:
    """`p` in `variance ∝ scale**p` through two `(scale, variance)` measurements: the slope of the log-variance
    against the log-scale, within `bounds`; `default` where the scale hardly moved or a measurement is not positive
    and finite.

    Example:

    >>> secant_exponent((1.0, 4.0), (0.5, 1.0))  # the variance went with the square of the scale
    2.0
    """
    (s0, v0), (s1, v1) = earlier, latest
    values = (s0, v0, s1, v1)
    if not all(math.isfinite(value) and value > 0 for value in values) or abs(math.log(s1 / s0)) < MIN_SCALE_CHANGE:
        return default
    return min(max(math.log(v1 / v0) / math.log(s1 / s0), bounds[0]), bounds[1])


def unit_scale(variance: Any, criterion: Criterion) -> tuple[Any, Any]:
    """LSUV's loop in closed form, on the device, for a pre-activation `s·z` linear in the kernel with no bias.

    `var(s·z) = s²·var(z)`, so `find_scale` would stop after at most one rescale, by `sqrt(target / var)`. This
    takes `next_scale`'s decision at scale 1 on `variance` (a float32 scalar from `statistics.variance_on_device`)
    without reading it back, so the pass goes on without waiting for the host: for accelerators, where a read-back
    makes the device wait. The kernel's dtypes cannot limit the scale: it is for float32 kernels computed in
    float32 only, where a scale is at most `MIN_RELATIVE_VARIANCE ** -0.5`.

    Args:
        variance: The output variance at scale 1, a float32 scalar tensor.
        criterion: Target variance, tolerance and iteration limit.

    Returns:
        `(scale, stop)`: the scale (1 unless the code is `Stop.RESCALE`) and `next_scale`'s code, float32 scalar
        tensors on the device of `variance`; `unit_scale_record` reports them.
    """
    stop, proposed = next_scale(variance, 1.0, 0, criterion, xp=ops)
    scale = ops.where(ops.equal(stop, int(Stop.RESCALE)), proposed, ops.ones((), dtype="float32"))
    return ops.cast(scale, "float32"), ops.cast(stop, "float32")


def unit_scale_record(target: Target, variance: float, scale: float, stop: float, criterion: Criterion) -> LayerRecord:
    """The record of a layer rescaled by `unit_scale`, from its variance, scale and code read back after the pass.

    The final variance is computed from the scale as applied (float32), as `find_scale` computes it from moments.

    Raises:
        ValueError: If the layer's output is not finite.
    """
    code = Stop(int(stop))
    if code == Stop.RESCALE:  # the one rescale `find_scale` would make; at the new scale it is within tolerance
        current, iterations, code = scale * scale * variance, 1, Stop.DONE
    else:
        current, iterations = variance, 0
    reason = _stop_reason(target, code, variance, 1.0, criterion, scale, ScaleLimit(), None)
    return _record(target, variance, current, iterations, scale, criterion, reason)


def _floor(floor: float | None) -> float:
    return -math.inf if floor is None else floor


def _stop_reason(
    target: Target,
    stop: Stop,
    variance: float,
    scale: float,
    criterion: Criterion,
    proposed: float,
    limit: ScaleLimit,
    floor: float | None,
) -> str | None:
    """The record's reason for `next_scale`'s code (`None` for `Stop.DONE`: `_record` says why if not converged).

    Raises:
        ValueError: For `Stop.NOT_FINITE`.
    """
    goal = criterion.target_variance
    if stop == Stop.NOT_FINITE:
        _raise_not_finite(target, variance, scale)
    if stop == Stop.BIAS_FLOOR:
        return f"the bias alone gives a variance of {floor:.3g}, above the target: no kernel scale can reach it"
    if stop == Stop.TOO_SMALL:
        return _too_small_reason(variance, goal)
    if stop == Stop.BEYOND_DTYPE:
        return (
            f"reaching the target would need a kernel scale of {proposed:.3g}, beyond what {limit.dtype} "
            f"can hold (at most {limit.scale:.3g})"
        )
    return None


def _raise_not_finite(target: Target, variance: float, scale: float) -> NoReturn:
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
    """The kernel's own values in float32, read outside any autocast scope (never a float16 copy); a NumPy array
    where `statistics.on_host` keeps the kernel there."""
    with _no_autocast():
        value = kernel.value
    if on_host(value):
        return np.array(host_values(value))
    return ops.cast(ops.copy(value), "float32")


def scaled_preactivation(z: Any, scale: float, bias: Any = None) -> Any:
    """`s·(z - B) + B = s·z + (1 - s)·B`: the pre-activation `z = L + B` (float32) after the kernel is multiplied
    by `scale`, `B` being the bias as added to `z` (`Target.bias_term`) or `None`. In NumPy where
    `statistics.on_host(z)` (then returned as a backend tensor, for the pass to go on with)."""
    if on_host(z):
        values = host_values(z) * np.float32(scale)
        if bias is not None:
            values += host_values(bias) * np.float32(1.0 - scale)
        return ops.convert_to_tensor(values)
    scaled = ops.multiply(z, scale)
    return scaled if bias is None else ops.add(scaled, ops.multiply(bias, 1.0 - scale))


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
    dtype = variable_dtype(kernel)
    if isinstance(original, np.ndarray) and isinstance(scale, (float, int)) and dtype == "float32":
        value = original * np.float32(scale)  # `float32_copy` kept it on the host
    else:
        value = ops.cast(ops.multiply(original, scale), dtype)
    with _no_autocast():
        kernel.assign(value)


def write_bias(bias: keras.Variable, values: np.ndarray) -> None:
    """Sets `bias` to `values` (host, any float dtype; reshaped to the bias), written to the variable itself."""
    value = ops.cast(np.reshape(np.asarray(values, dtype="float32"), tuple(bias.shape)), variable_dtype(bias))
    with _no_autocast():
        bias.assign(value)


def variable_dtype(kernel: keras.Variable) -> str:
    """The variable's own dtype (inside an autocast scope `kernel.dtype` is the scope's dtype)."""
    with _no_autocast():
        return _dtype_name(kernel.value.dtype)


def _no_autocast() -> Any:
    # Inside a mixed-precision layer's call, Keras's autocast scope makes `variable.value` a float16/bfloat16 copy,
    # and torch's `assign` copies into `variable.value`: a write there is lost. Keras has no public way to leave
    # the scope; `AutocastScope(None)` is what `Layer.__call__` itself uses to switch autocasting off.
    return AutocastScope(None)


def _largest(dtype: Any) -> float:
    return _largest_of(_dtype_name(dtype))


@functools.cache
def _largest_of(name: str) -> float:
    # `np.finfo` costs microseconds a call, and `ScaleLimit.of` asks for every target.
    return float(np.finfo(name).max) if name != "bfloat16" else 3.39e38


@functools.cache
def _dtype_name(dtype: Any) -> str:
    # Cached: `standardize_dtype` costs 2 µs for a backend's dtype object, asked several times per target.
    return str(keras.backend.standardize_dtype(dtype))
