"""The ways the single-pass engine finds a layer's scale at its first call in a pass.

On the device (`unit_scale`, closed form, read back when the pass ends), on the call in closed form on the host
(the pre-activation is affine in the kernel's scale: `s·z + (1 - s)·B`), centered in closed form (`center=True`),
or by evaluating the layer again at each scale tried (a `call` of its own, float16/bfloat16). Each one sets the
layer's record (or its values on the device), appends the moments of the first call at the new scale to
`LayerState.measured` (what `multi_call` needs if later calls come), and returns the layer's output at that scale
for the pass to go on with. A layer with a `LayerState.prediction` is rescaled for the prediction of every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lsuv.centering import channel_groups, find_centered_scale, with_means
from keras_lsuv.engines.forward import EngineBase, layer_output
from keras_lsuv.engines.state import LayerState, Pass, Status, as_lsuv_error
from keras_lsuv.experts import find_expert_scales
from keras_lsuv.processes import measurements_are_global
from keras_lsuv.rescale import (
    ScaleLimit,
    find_scale,
    scaled_preactivation,
    unit_scale,
    variable_dtype,
    write_bias,
    write_kernel,
)
from keras_lsuv.statistics import Moments, moments, on_accelerator, variance_on_device


class LayerScaling(EngineBase):
    """Finds a layer's scale at its first call in a pass (`rescale_on_call`)."""

    def rescale_on_call(
        self,
        state: LayerState,
        this_pass: Pass,
        original_call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Rescales the layer at its first call in the pass; sets its record (or its values on the device) and
        returns its output at the new scale. A layer whose output cannot be measured (`Target.unmeasurable`) gets
        back the kernels it had before step 1, becomes `Status.UNMEASURABLE` and returns its output at them."""
        target = state.target
        layer = target.layer
        if target.is_recurrent:
            return self._rescale_input_kernel(state, original_call, args, kwargs)
        with target.activation_removed() as activation:
            preactivation = original_call(*args, **kwargs)
        if reason := target.unmeasurable(preactivation):  # left alone, with the kernels it had before step 1
            state.status, state.reason = Status.UNMEASURABLE, reason
            target.restore_weights()
            return original_call(*args, **kwargs)
        if self._scales_on_device(state, preactivation):
            return self._rescale_on_device(
                state, preactivation, target.measured(preactivation, args, kwargs), activation
            )
        with as_lsuv_error():
            self._read_back(this_pass)  # this layer reads its statistics back anyway: the earlier layers' come too
        if not target.is_linear_in_kernel or not computes_in_full_precision(layer):
            return self._rescale_by_reevaluation(state, original_call, args, kwargs, activation, preactivation)

        # Pre-activation z = L + B, with L linear in the kernel and B the bias: scaling the kernel by s gives
        # s·L + B = s·z + (1 - s)·B, so no re-evaluation is needed. Only in float32/float64: in float16 or
        # bfloat16, z - B loses L in the rounding of z when the bias dominates, and s multiplies that error.
        z = ops.cast(preactivation, "float32")  # a no-op for float32
        if self.center:
            return self._center_on_call(state, z, activation, preactivation.dtype, args, kwargs)
        bias = target.bias_term(z)

        def at_scale(scale: float) -> Any:
            return scaled_preactivation(z, scale, bias)

        floor = None  # the least variance of the pre-activation over all scales: the bias may keep it above target
        if self.measure.is_affine_in_kernel:
            offsets = None if bias is None else target.host_bias
            stats = moments(target.measured(z, args, kwargs), None if offsets is None else tuple(bias.shape))

            def first_at(scale: float) -> float:
                return stats.variance(scale, offsets)

            def first_moments(scale: float) -> Moments:
                return stats.scaled(scale, offsets).pooled()

            floor = None if offsets is None else _lowest_variance(_predicted(state, first_at))
        else:
            latest: list[Moments] = []

            def first_at(scale: float) -> float:
                latest[:] = [moments(target.measured(activation(at_scale(scale)), args, kwargs))]
                return latest[0].variance()

            def first_moments(scale: float) -> Moments:
                return latest[0]  # measured at the scale tried last, the record's

        kernel, original = target.scaled_kernel, state.kernel_original()
        limit = ScaleLimit.of(kernel, original, layer, output_peak(layer, z))
        with as_lsuv_error():
            record = state.record = find_scale(
                target, _predicted(state, first_at), self.criterion, limit, floor, exponent=_exponent(state)
            )
        state.measured.append(first_moments(record.scale))
        if record.scale == 1.0:
            return activation(preactivation)
        write_kernel(kernel, original, record.scale)
        return activation(ops.cast(at_scale(record.scale), preactivation.dtype))

    def _rescale_input_kernel(
        self, state: LayerState, original_call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A recurrent layer: its input kernel scaled in closed form so that the input projection of every step
        (`Target.input_projection`, linear in the kernel) has the target variance; returns the layer's output at
        that scale. With `center=True` it is not centered (its bias also sets the gates' offsets): the record
        says so, as for a layer without bias."""
        target = state.target
        kernel, original = target.scaled_kernel, state.kernel_original()
        stats = moments(target.input_projection(args, kwargs))
        limit = ScaleLimit.of(kernel, original, target.layer, 0.0)
        with as_lsuv_error():
            record = find_scale(
                target, _predicted(state, stats.variance), self.criterion, limit, exponent=_exponent(state)
            )
        after = stats.scaled(record.scale)
        state.measured.append(after)
        state.record = with_means(target, record, stats, after, self.criterion) if self.center else record
        write_kernel(kernel, original, record.scale)
        return original_call(*args, **kwargs)

    def _scales_on_device(self, state: LayerState, preactivation: Any) -> bool:
        """Whether `unit_scale` rescales the layer: on an accelerator (or as `LSUVOptions.scale_on_device` says),
        pre-activation `s·z` without bias, float32, and not known to be called several times per pass (its
        calls' moments are merged on the host).

        On a CPU the host loop is cheaper: reading the variance back costs nothing there, while the device's scale
        has to be applied to the whole output and the kernel even where it is 1.
        """
        target = state.target
        return (
            self.measure.is_affine_in_kernel
            and not self.center
            and not state.multi_call
            and (on_accelerator(preactivation) if self.scale_on_device is None else self.scale_on_device)
            and target.is_linear_in_kernel
            and not target.adds_bias()
            and variable_dtype(target.scaled_kernel) == "float32"
            and keras.backend.standardize_dtype(target.layer.compute_dtype) == "float32"
            and measurements_are_global()
        )

    def _rescale_on_device(
        self, state: LayerState, preactivation: Any, measured: Any, activation: Callable[[Any], Any]
    ) -> Any:
        """Rescales the kernel by `unit_scale`, found on the device; returns the layer's output at that scale.

        `var(s·z) = s²·var(z)`, so neither the layer nor the host is needed again: the pass goes on at once, and the
        record is completed when the pass reads every such layer's variance, scale and stop code back together.
        Its first call's moments are not known on the host (`None` in `LayerState.measured`).
        """
        value = variance_on_device(measured)
        scale, stop = unit_scale(value, self.criterion)
        write_kernel(state.target.scaled_kernel, state.kernel_original(), scale)
        state.on_device = (value, scale, stop)
        state.measured.append(None)
        return activation(ops.multiply(preactivation, scale))

    def _center_on_call(
        self,
        state: LayerState,
        z: Any,
        activation: Callable[[Any], Any],
        dtype: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """`center=True` in closed form: the bias set to `-s·mean_c(L)` and the kernel scaled by `s`, where `s` gives
        unit variance to the centered `s·(z - mean_c(z))` (`centering.py`); returns the layer's output at them.

        With a prediction, the means and spread are those predicted over every call (`Prediction.centering_bias`,
        `Prediction.variance`).
        """
        target = state.target
        layer, kernel, original = target.layer, target.scaled_kernel, state.kernel_original()
        groups = channel_groups(target, z)
        before = moments(target.measured(z, args, kwargs), groups)
        spread = before.centered() if groups is not None else before
        limit = ScaleLimit.of(kernel, original, layer, output_peak(layer, z))
        with as_lsuv_error():
            record = find_scale(
                target, _predicted(state, spread.variance), self.criterion, limit, exponent=_exponent(state)
            )
        write_kernel(kernel, original, record.scale)
        written = None
        if groups is None:
            output = ops.multiply(z, record.scale)
        else:
            # z = L + b: at scale s and bias b', the pre-activation is s·(z - b) + b'.
            bias = np.zeros(before.mean.shape) if target.host_bias is None else target.host_bias
            if state.prediction is None:
                written = -record.scale * (before.mean - bias)
            else:
                written = state.prediction.centering_bias(before.mean - bias, record.scale)
            write_bias(layer.bias, written)
            offset = ops.reshape(ops.convert_to_tensor((written - record.scale * bias).astype("float32")), groups)
            output = ops.add(ops.multiply(z, record.scale), offset)
        after = moments(target.measured(output, args, kwargs), groups)
        state.measured.append(after)
        predicted = after if state.prediction is None else state.prediction.moments(after, record.scale, written)
        state.record = with_means(target, record, before, predicted, self.criterion)
        return activation(ops.cast(output, dtype))

    def _rescale_by_reevaluation(
        self,
        state: LayerState,
        original_call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        activation: Callable[[Any], Any],
        preactivation: Any,
    ) -> Any:
        """Rescale the kernel and call the layer again, as the paper does; returns the output at the new scale.

        For layers with a `call` of their own, and for float16/bfloat16 layers (whose output the arithmetic
        shortcut cannot predict exactly).
        """
        target = state.target
        experts = target.experts(preactivation)
        one_call = state.prediction is None and not state.multi_call
        if experts and one_call and variable_dtype(target.scaled_kernel) == "float32":  # float32: no scale limit
            return self._rescale_experts(state, original_call, args, kwargs, preactivation, experts)
        layer, kernel = target.layer, target.scaled_kernel
        original = state.kernel_original()
        latest: dict[str, Any] = {"scale": 1.0, "preactivation": preactivation}
        limit = ScaleLimit.of(kernel, original, layer, output_peak(layer, preactivation))
        prediction = state.prediction

        def evaluated_at(scale: float, again: bool = False) -> Any:
            """The pre-activation at `scale`; evaluated again at the same scale if `again` (the bias moved)."""
            if again or scale != latest["scale"]:
                write_kernel(kernel, original, scale)
                with target.activation_removed():
                    latest.update(scale=scale, preactivation=original_call(*args, **kwargs))
            return latest["preactivation"]

        if self.center:

            def measure_at(scale: float) -> Moments:
                z = evaluated_at(scale, again="moments" in latest)  # the first measure is of `preactivation`
                latest["moments"] = moments(target.measured(z, args, kwargs), channel_groups(target, z))
                return latest["moments"] if prediction is None else prediction.moments(latest["moments"], scale)

            with as_lsuv_error():
                record = find_centered_scale(target, measure_at, self.criterion, limit, exponent=_exponent(state))
        else:

            def first_at(scale: float) -> float:
                z = evaluated_at(scale)
                latest["moments"] = moments(target.measured(self.measure.of(z, activation), args, kwargs))
                return float(latest["moments"].variance())

            with as_lsuv_error():
                record = find_scale(
                    target, _predicted(state, first_at), self.criterion, limit, exponent=_exponent(state)
                )
        state.record = record
        state.measured.append(latest["moments"])
        state.peak = output_peak(layer, latest["preactivation"]) if self.merges else 0.0
        return layer_output(target, original_call, args, kwargs, latest["preactivation"], activation)

    def _rescale_experts(
        self,
        state: LayerState,
        original_call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
        experts: int,
    ) -> Any:
        """A mixture-of-experts bank (`Target.experts`): each expert's slice of the scaled kernel multiplied so that
        its output (its row of the bank's output) has the target variance, evaluating the bank again at each step
        (`experts.find_expert_scales`); returns the bank's output at those scales."""
        target = state.target
        kernel, original = target.scaled_kernel, state.kernel_original()
        latest: dict[str, Any] = {"output": output}
        measured: list[Moments] = []

        def moments_at(scales: np.ndarray | None) -> Moments:
            if scales is not None:
                write_kernel(kernel, original, scales.reshape(-1, 1, 1).astype("float32"))
                latest["output"] = original_call(*args, **kwargs)
            rows = ops.moveaxis(ops.cast(latest["output"], "float32"), 0, -1)
            measured.append(moments(ops.reshape(rows, (-1, experts)), (experts,)))
            return measured[-1]

        with as_lsuv_error():
            record, final = find_expert_scales(target, moments_at, self.criterion)
        if self.center:  # no bias to center: its record says so
            record = with_means(target, record, measured[0].pooled(), final.pooled(), self.criterion)
        state.record, state.experts = record, True
        state.measured.append(final.pooled())
        return latest["output"]


def _predicted(state: LayerState, first_at: Callable[[float], float]) -> Callable[[float], float]:
    """`scale -> variance` over every call as predicted (`Prediction.variance`), the first call's without one."""
    return first_at if state.prediction is None else state.prediction.variance(first_at)


def _exponent(state: LayerState) -> float | None:
    """For a prediction of every call, the exponent of its variance in the scale (`Prediction.power`): the layer's
    loop then takes secant steps (`rescale.find_scale`); `None` otherwise (the paper's steps)."""
    return None if state.prediction is None else state.prediction.power


def _lowest_variance(variance_at: Callable[[float], float]) -> float:
    """The least variance any kernel scale s >= 0 gives: the pre-activation variance is a quadratic in s."""
    v0, v1, v2 = variance_at(0.0), variance_at(1.0), variance_at(2.0)
    a = (v2 - 2 * v1 + v0) / 2
    b = v1 - v0 - a
    return v0 - b * b / (4 * a) if a > 0 and b < 0 else v0


def computes_in_full_precision(layer: keras.layers.Layer) -> bool:
    return keras.backend.standardize_dtype(layer.compute_dtype) in ("float32", "float64")


def output_peak(layer: keras.layers.Layer, z: Any) -> float:
    """The largest |pre-activation|, where the compute dtype's range is narrower than float32's (float16)."""
    if keras.backend.standardize_dtype(layer.compute_dtype) != "float16":
        return 0.0
    return float(ops.convert_to_numpy(ops.max(ops.abs(z))))
