"""The single-pass engine: one eager forward pass; each layer is rescaled on the input it actually receives.

Every target layer's `call` is intercepted for the duration of one `model(batch)` call. When the pass reaches
a target for the first time, the layer is evaluated once without its activation, its kernel is rescaled to unit
output variance, and the pass continues with the rescaled layer's output, so each layer is evaluated about once
whatever the depth (thinc's approach, not the O(L^2) prefix re-runs of the sub-model method).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lsuv.inference import inference_mode
from keras_lsuv.report import LayerRecord
from keras_lsuv.rescale import Criterion, find_scale, scale_kernel
from keras_lsuv.statistics import moments, variance
from keras_lsuv.targets import Target, without_activation


def run_single_pass(
    model: keras.Model,
    batch: Any,
    targets: list[Target],
    measure: str,
    criterion: Criterion,
    on_record: Callable[[LayerRecord], None],
) -> list[LayerRecord]:
    """Rescales every target in one forward pass of `batch`; returns the records in processing order."""
    records: list[LayerRecord] = []
    pending = {id(t.layer): t for t in targets}

    def first_call(target: Target, original_call: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if pending.pop(id(target.layer), None) is None:
                return original_call(*args, **kwargs)  # a shared layer's later calls run as they are
            if target.skip_reason:
                records.append(target.skipped_record())
                return original_call(*args, **kwargs)
            record, output = _rescale_on_call(target, original_call, args, kwargs, measure, criterion)
            records.append(record)
            on_record(record)
            return output

        return call

    with _intercepted_calls(targets, first_call), inference_mode():
        model(batch, training=False)
    records += [target.skipped_record() for target in pending.values()]
    return records


@contextlib.contextmanager
def _intercepted_calls(targets: list[Target], make_call: Callable[..., Callable[..., Any]]) -> Iterator[None]:
    # Keras has no forward-hook API. `Layer.__call__` looks `self.call` up at call time, so an instance
    # attribute intercepts the layer eagerly on every backend; deleting it restores the class's method.
    for target in targets:
        target.layer.call = make_call(target, target.layer.call)
    try:
        yield
    finally:
        for target in targets:
            del target.layer.call


def _rescale_on_call(
    target: Target,
    original_call: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    measure: str,
    criterion: Criterion,
) -> tuple[LayerRecord, Any]:
    layer = target.layer
    with without_activation(layer) as activation:
        preactivation = original_call(*args, **kwargs)
    if not target.is_linear_in_kernel:
        return _rescale_by_reevaluation(target, original_call, args, kwargs, measure, criterion, preactivation)

    # Pre-activation z = L + B, with L linear in the kernel and B the bias: scaling the kernel by s gives
    # s·L + B = s·z + (1 - s)·B, so no re-evaluation is needed.
    z = ops.cast(preactivation, "float32")  # a no-op for float32
    bias = target.bias_term(z)

    def at_scale(scale: float) -> Any:
        scaled = ops.multiply(z, scale)
        return scaled if bias is None else ops.add(scaled, ops.multiply(bias, 1.0 - scale))

    if measure == "preactivation":
        variance_at = _preactivation_variance(z, bias)
    else:

        def variance_at(scale: float) -> float:
            return variance(activation(at_scale(scale)))

    record = find_scale(target, variance_at, criterion)
    if record.scale == 1.0:
        return record, activation(preactivation)
    scale_kernel(target.scaled_kernel, target.scaled_kernel.value, record.scale)
    return record, activation(ops.cast(at_scale(record.scale), preactivation.dtype))


def _preactivation_variance(z: Any, bias: Any) -> Callable[[float], float]:
    """`scale -> var(s·(z - B) + B)` from one reduction of `z` to per-bias-group moments, then host arithmetic."""
    if bias is None:
        return moments(z).variance
    stats = moments(z, tuple(bias.shape))
    offsets = np.asarray(ops.convert_to_numpy(bias), dtype="float64").reshape(-1)
    return lambda scale: stats.variance(scale, offsets)


def _rescale_by_reevaluation(
    target: Target,
    original_call: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    measure: str,
    criterion: Criterion,
    preactivation: Any,
) -> tuple[LayerRecord, Any]:
    """For layers with a `call` of their own: rescale the kernel and call the layer again, as the paper does."""
    layer, kernel = target.layer, target.scaled_kernel
    original = ops.copy(kernel.value)
    activation = layer.activation
    latest = {"scale": 1.0, "preactivation": preactivation}

    def variance_at(scale: float) -> float:
        if scale != latest["scale"]:
            scale_kernel(kernel, original, scale)
            with without_activation(layer):
                latest.update(scale=scale, preactivation=original_call(*args, **kwargs))
        z = latest["preactivation"]
        return variance(z if measure == "preactivation" else activation(z))

    record = find_scale(target, variance_at, criterion)
    return record, activation(latest["preactivation"])
