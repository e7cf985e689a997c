"""The single-pass engine: one eager forward pass; each layer is rescaled on the input it actually receives.

Every target layer's `call` is intercepted for the duration of one `model(batch)` call. When the pass reaches a
target, the layer is evaluated once without its activation, its kernel is rescaled to unit output variance, and the
pass continues with the rescaled layer's output, so each layer is evaluated about once whatever the depth (thinc's
approach, not the O(L^2) prefix re-runs of the sub-model method). On an accelerator, where a layer's scale follows
from one variance (float32, no bias: `rescale.unit_scale`), it is found on the device and read back with the others
when the pass ends, so that the accelerator does not wait for the host at every layer. The biases are read once,
before the pass.

A layer called several times in one pass (`TimeDistributed`, a cell of an `RNN`, a shared layer) is measured over
all its calls, as the paper's statistic is over the whole output. Its first call cannot tell, so the pass notes the
second call, undoes what it did from that layer's first call on, and rescales that layer by re-evaluation: one
forward pass per iteration, its statistics merged over every call. Then a new pass goes on from there. A target
called with symbolic values (inside JAX's `scan`/`vmap`/`map`, or a traced function) cannot be measured and is
skipped with that reason; so is one called inside torch's `vmap` (`keras.ops.vectorized_map` on torch).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lsuv.inference import inference_mode
from keras_lsuv.interception import intercepted_calls, is_traced
from keras_lsuv.processes import measurements_are_global
from keras_lsuv.report import LayerRecord
from keras_lsuv.rescale import (
    Criterion,
    ScaleLimit,
    find_scale,
    float32_copy,
    unit_scale,
    unit_scale_record,
    variable_dtype,
    write_kernel,
)
from keras_lsuv.statistics import Moments, fetch, moments, on_accelerator, variance, variance_on_device
from keras_lsuv.targets import Target, read_biases, without_activation

TRACED_REASON = (
    "called inside JAX control flow, torch's vmap or a traced function (scan, vmap, map, vectorized_map): it cannot "
    "be measured eagerly"
)


def run_single_pass(
    model: keras.Model,
    batch: Any,
    targets: list[Target],
    measure: str,
    criterion: Criterion,
    on_record: Callable[[LayerRecord], None],
) -> dict[Target, LayerRecord]:
    """Rescales every target in one forward pass of `batch` (more for layers called several times per pass).

    Returns:
        Each target's record: the targets in the order the pass first reached them, then the ones it never reached.
    """
    return _SinglePass(model, batch, targets, measure, criterion, on_record).run()


class _Abort(BaseException):
    """Carries LSUV's own error out of a layer's call: Keras re-wraps an `Exception` raised there."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _as_lsuv_error() -> Iterator[None]:
    try:
        yield
    except ValueError as error:
        raise _Abort(error) from None


class _SinglePass:
    def __init__(
        self,
        model: keras.Model,
        batch: Any,
        targets: list[Target],
        measure: str,
        criterion: Criterion,
        on_record: Callable[[LayerRecord], None],
    ) -> None:
        self.model, self.batch, self.targets = model, batch, targets
        self.measure, self.criterion, self.on_record = measure, criterion, on_record
        self.active = {id(t.layer) for t in targets if not t.skip_reason}
        # The kernels as step 1 left them, in float32, read outside any autocast scope when a layer is first
        # processed and dropped once it is final, so at most the kernels of one pass's tentative layers are copied.
        self.originals: dict[int, Any] = {}
        self.final: dict[int, LayerRecord] = {}
        self.reached: dict[int, Target] = {}
        self.multi_call: set[int] = set()
        self.traced: set[int] = set()
        # Layers rescaled on the device whose variance, scale and stop code are not read back yet.
        self.unread: list[tuple[Target, Any, Any, Any]] = []
        self.tentative: dict[int, tuple[Target, LayerRecord | None]] = {}  # this pass's, in processing order
        read_biases([t for t in targets if not t.skip_reason])

    def run(self) -> dict[Target, LayerRecord]:
        while (halted := self._inline_pass()) is not None:
            if id(halted.layer) in self.multi_call and id(halted.layer) not in self.traced:
                self._finish(halted, self._rescale_by_passes(halted))
        records = {}
        for key, target in self.reached.items():
            if key in self.final:
                records[target] = self.final[key]
            else:
                records[target] = target.skipped_record(TRACED_REASON if key in self.traced else None)
        return records | {t: t.skipped_record() for t in self.targets if id(t.layer) not in self.reached}

    def _pending(self, key: int) -> bool:
        return key in self.active and key not in self.final and key not in self.traced

    def _original(self, target: Target) -> Any:
        key = id(target.layer)
        if key not in self.originals:
            self.originals[key] = float32_copy(target.scaled_kernel)
        return self.originals[key]

    def _inline_pass(self) -> Target | None:
        """One pass rescaling each target on its first call; returns the target it halted at, if it did."""
        calls: collections.Counter[int] = collections.Counter()
        tentative = self.tentative = {}  # the record is None until `_read_back`
        halt: list[tuple[int, Target]] = []  # (index in `tentative` from which nothing holds, cause)

        def stop_at(target: Target) -> None:
            keys = list(tentative)
            index = keys.index(id(target.layer)) if id(target.layer) in tentative else len(keys)
            if not halt or index < halt[0][0]:
                halt[:] = [(index, target)]

        def make_call(layer: keras.layers.Layer, original_call: Callable[..., Any]) -> Callable[..., Any]:
            key = id(layer)
            target = by_layer[key]

            def call(*args: Any, **kwargs: Any) -> Any:
                calls[key] += 1
                self.reached.setdefault(key, target)
                if not self._pending(key):
                    return original_call(*args, **kwargs)
                if is_traced((args, kwargs)):
                    self.traced.add(key)
                    stop_at(target)
                    return original_call(*args, **kwargs)
                if calls[key] > 1:
                    self.multi_call.add(key)
                    stop_at(target)
                    return original_call(*args, **kwargs)
                if halt:
                    return original_call(*args, **kwargs)  # after a halt nothing is final: leave it to the next pass
                if key in self.multi_call:
                    stop_at(target)
                    return original_call(*args, **kwargs)
                record, output = self._rescale_on_call(target, original_call, args, kwargs)
                tentative[key] = (target, record)
                return output

            return call

        by_layer = {id(t.layer): t for t in self.targets}
        traced_before = set(self.traced)
        self._forward([t.layer for t in self.targets], make_call)
        self._read_back()  # after it, every record of the pass is complete
        items = [(target, record) for target, record in tentative.values() if record is not None]
        index, cause = halt[0] if halt else (len(items), None)
        for target, record in items[:index]:
            self._finish(target, record)
        for target, _ in items[index:]:
            write_kernel(target.scaled_kernel, self._original(target), 1.0)  # undo: it is redone later
        for key in self.traced - traced_before:
            by_layer[key].restore_kernels()  # not measured: it keeps its kernel, and the layers after see that one
        return cause

    def _read_back(self) -> None:
        """Completes the records of this pass's layers rescaled on the device, in one transfer.

        Raises:
            ValueError: For the first layer, in processing order, whose output was not finite.
        """
        if self.unread:
            values = fetch([value for _, *measured in self.unread for value in measured])
            for (target, *_), (variance, scale, stop) in zip(self.unread, values.reshape(-1, 3), strict=True):
                record = unit_scale_record(target, float(variance), float(scale), float(stop), self.criterion)
                self.tentative[id(target.layer)] = (target, record)
            self.unread.clear()

    def _finish(self, target: Target, record: LayerRecord) -> None:
        self.final[id(target.layer)] = record
        self.originals.pop(id(target.layer), None)
        self.on_record(record)

    def _forward(self, layers: list[keras.layers.Layer], make_call: Callable[..., Callable[..., Any]]) -> None:
        try:
            with intercepted_calls(layers, make_call), inference_mode():
                self.model(self.batch, training=False)
        except _Abort as abort:
            raise abort.error from None

    def _scales_on_device(self, target: Target, preactivation: Any) -> bool:
        """Whether `unit_scale` rescales the layer: on an accelerator, pre-activation `s·z` without bias, float32, and
        nothing to merge.

        On a CPU the host loop is cheaper: reading the variance back costs nothing there, while the device's scale
        has to be applied to the whole output and the kernel even where it is 1.
        """
        return (
            self.measure == "preactivation"
            and on_accelerator(preactivation)
            and target.is_linear_in_kernel
            and not target.adds_bias()
            and variable_dtype(target.scaled_kernel) == "float32"
            and keras.backend.standardize_dtype(target.layer.compute_dtype) == "float32"
            and measurements_are_global()
        )

    def _rescale_on_device(self, target: Target, preactivation: Any, activation: Callable[[Any], Any]) -> Any:
        """Rescales the kernel by `unit_scale`, found on the device; returns the layer's output at that scale.

        `var(s·z) = s²·var(z)`, so neither the layer nor the host is needed again: the pass goes on at once, and the
        record is completed when the pass reads every such layer's variance, scale and stop code back together.
        """
        measured = variance_on_device(preactivation)
        scale, stop = unit_scale(measured, self.criterion)
        write_kernel(target.scaled_kernel, self._original(target), scale)
        self.unread.append((target, measured, scale, stop))
        return activation(ops.multiply(preactivation, scale))

    def _rescale_on_call(
        self, target: Target, original_call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[LayerRecord | None, Any]:
        layer = target.layer
        with without_activation(layer) as activation:
            preactivation = original_call(*args, **kwargs)
        if self._scales_on_device(target, preactivation):
            return None, self._rescale_on_device(target, preactivation, activation)
        with _as_lsuv_error():
            self._read_back()  # this layer reads its statistics back anyway: the earlier layers' come with them
        if not target.is_linear_in_kernel or not _computes_in_full_precision(layer):
            return self._rescale_by_reevaluation(target, original_call, args, kwargs, activation, preactivation)

        # Pre-activation z = L + B, with L linear in the kernel and B the bias: scaling the kernel by s gives
        # s·L + B = s·z + (1 - s)·B, so no re-evaluation is needed. Only in float32/float64: in float16 or
        # bfloat16, z - B loses L in the rounding of z when the bias dominates, and s multiplies that error.
        z = ops.cast(preactivation, "float32")  # a no-op for float32
        bias = target.bias_term(z)

        def at_scale(scale: float) -> Any:
            scaled = ops.multiply(z, scale)
            return scaled if bias is None else ops.add(scaled, ops.multiply(bias, 1.0 - scale))

        floor = None  # the least variance of the pre-activation over all scales: the bias may keep it above target
        if self.measure == "preactivation":
            variance_at = _preactivation_variance(z, bias, target.host_bias)
            floor = None if bias is None else _lowest_variance(variance_at)
        else:

            def variance_at(scale: float) -> float:
                return variance(activation(at_scale(scale)))

        kernel, original = target.scaled_kernel, self._original(target)
        limit = ScaleLimit.of(kernel, original, layer, _output_peak(layer, z))
        with _as_lsuv_error():
            record = find_scale(target, variance_at, self.criterion, limit, floor)
        if record.scale == 1.0:
            return record, activation(preactivation)
        write_kernel(kernel, original, record.scale)
        return record, activation(ops.cast(at_scale(record.scale), preactivation.dtype))

    def _rescale_by_reevaluation(
        self,
        target: Target,
        original_call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        activation: Callable[[Any], Any],
        preactivation: Any,
    ) -> tuple[LayerRecord, Any]:
        """Rescale the kernel and call the layer again, as the paper does.

        For layers with a `call` of their own, and for float16/bfloat16 layers (whose output the arithmetic
        shortcut cannot predict exactly).
        """
        layer, kernel = target.layer, target.scaled_kernel
        original = self._original(target)
        latest = {"scale": 1.0, "preactivation": preactivation}

        def variance_at(scale: float) -> float:
            if scale != latest["scale"]:
                write_kernel(kernel, original, scale)
                with without_activation(layer):
                    latest.update(scale=scale, preactivation=original_call(*args, **kwargs))
            z = latest["preactivation"]
            return variance(z if self.measure == "preactivation" else activation(z))

        limit = ScaleLimit.of(kernel, original, layer, _output_peak(layer, preactivation))
        with _as_lsuv_error():
            record = find_scale(target, variance_at, self.criterion, limit)
        return record, activation(latest["preactivation"])

    def _rescale_by_passes(self, target: Target) -> LayerRecord:
        """For a layer called several times per pass: one forward pass per iteration, measured over every call."""
        layer, kernel = target.layer, target.scaled_kernel
        original = self._original(target)

        def make_call(layer: keras.layers.Layer, original_call: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                with without_activation(layer) as activation:
                    z = original_call(*args, **kwargs)
                output = activation(z)
                measured.append(moments(z if self.measure == "preactivation" else output))
                return output

            return call

        def variance_at(scale: float) -> float:
            write_kernel(kernel, original, scale)
            measured.clear()
            self._forward([layer], make_call)
            total: Moments = measured[0]
            for stats in measured[1:]:
                total = total.merge(stats)
            return total.variance()

        measured: list[Moments] = []
        record = find_scale(target, variance_at, self.criterion, ScaleLimit.of(kernel, original, layer, 0.0))
        write_kernel(kernel, original, record.scale)
        return record


def _preactivation_variance(z: Any, bias: Any, offsets: np.ndarray | None) -> Callable[[float], float]:
    """`scale -> var(s·(z - B) + B)` from one reduction of `z` to per-bias-group moments, then host arithmetic.

    `bias` is B as added to `z` (`Target.bias_term`), `offsets` its values on the host (`Target.host_bias`).
    """
    if bias is None or offsets is None:
        measured = variance(z)
        return lambda scale: scale * scale * measured
    stats = moments(z, tuple(bias.shape))
    return lambda scale: stats.variance(scale, offsets)


def _lowest_variance(variance_at: Callable[[float], float]) -> float:
    """The least variance any kernel scale s >= 0 gives: the pre-activation variance is a quadratic in s."""
    v0, v1, v2 = variance_at(0.0), variance_at(1.0), variance_at(2.0)
    a = (v2 - 2 * v1 + v0) / 2
    b = v1 - v0 - a
    return v0 - b * b / (4 * a) if a > 0 and b < 0 else v0


def _computes_in_full_precision(layer: keras.layers.Layer) -> bool:
    return keras.backend.standardize_dtype(layer.compute_dtype) in ("float32", "float64")


def _output_peak(layer: keras.layers.Layer, z: Any) -> float:
    """The largest |pre-activation|, where the compute dtype's range is narrower than float32's (float16)."""
    if keras.backend.standardize_dtype(layer.compute_dtype) != "float16":
        return 0.0
    return float(ops.convert_to_numpy(ops.max(ops.abs(z))))
