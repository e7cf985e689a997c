"""The paper's rescaling loop for one layer, shared by every engine."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from keras_lsuv.report import LayerRecord
from keras_lsuv.targets import Target

# A rescale needs sqrt(target / variance); below this relative variance, or beyond this total scale, the
# output carries no usable signal and rescaling would only blow the kernel up.
MIN_RELATIVE_VARIANCE = 1e-12
MAX_SCALE = 1e6


@dataclasses.dataclass(frozen=True)
class Criterion:
    """When a layer is done: `|variance - target_variance| < tolerance`, or `max_iterations` rescales."""

    target_variance: float = 1.0
    tolerance: float = 0.1
    max_iterations: int = 10


def find_scale(target: Target, variance_at: Callable[[float], float], criterion: Criterion) -> LayerRecord:
    """Runs LSUV's loop: while `|var - target| >= tol` and fewer than `T_max` rescales, `scale *= sqrt(target / var)`.

    Args:
        target: The layer being processed (for the record and messages).
        variance_at: Returns the measured output variance when the kernel is
            multiplied by the given scale.
        criterion: Target variance, tolerance and iteration limit.

    Returns:
        The layer's record; `record.scale` is the factor to apply to the kernel.

    Raises:
        ValueError: If the layer's output is not finite.
    """
    layer = target.layer
    goal = criterion.target_variance
    scale, iterations, reason = 1.0, 0, None
    initial = current = variance_at(scale)
    while True:
        if not math.isfinite(current):
            raise ValueError(
                f"LSUV: layer '{layer.name}' ({type(layer).__name__}) produced non-finite values "
                f"(output variance {current}) at kernel scale {scale:.4g}. Check the batch and the layers before it."
            )
        if abs(current - goal) < criterion.tolerance or iterations >= criterion.max_iterations:
            break
        if current <= MIN_RELATIVE_VARIANCE * goal:
            reason = f"output variance {current:.3g} is too small to rescale safely"
            if current > MIN_RELATIVE_VARIANCE:  # a usable output: it is the target that cannot be reached
                reason = f"target variance {goal:g} is out of reach from output variance {current:.3g}"
            break
        step = math.sqrt(goal / current)
        if scale * step > MAX_SCALE:
            reason = f"reaching the target would need a kernel scale above {MAX_SCALE:g}"
            break
        scale *= step
        iterations += 1
        current = variance_at(scale)
    converged = abs(current - goal) < criterion.tolerance
    if not converged and reason is None:
        reason = f"|variance - target| = {abs(current - goal):.3g} after {iterations} rescales"
    return LayerRecord(
        name=layer.name,
        class_name=type(layer).__name__,
        initial_variance=initial,
        final_variance=current,
        iterations=iterations,
        converged=converged,
        scale=scale,
        reason=reason,
    )


def scale_kernel(kernel: keras.Variable, original: Any, scale: float) -> None:
    """Sets `kernel` to `original * scale` (from the unscaled values, so rescales do not accumulate error)."""
    kernel.assign(ops.multiply(original, scale))
