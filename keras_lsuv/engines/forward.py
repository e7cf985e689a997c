"""The single-pass engine's base: the run's settings, and a forward pass with some layers' calls intercepted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from keras_lsuv.centering import channel_groups
from keras_lsuv.engines.state import Abort, LayerState, MergeState, Pass
from keras_lsuv.inference import inference_mode
from keras_lsuv.interception import intercepted_calls, is_traced
from keras_lsuv.options import LSUVOptions
from keras_lsuv.rescale import unit_scale_record
from keras_lsuv.statistics import Moments, fetch, moments
from keras_lsuv.targets import Target


class EngineBase:
    """What every part of the single-pass engine shares: the model, the batch, the options, the layers' states.

    Args:
        model: The model.
        batch: The LSUV batch.
        options: The run's options.
        states: Every target's state.
        merges: Every merge's state to solve (`residual="stream"`).
    """

    def __init__(
        self,
        model: keras.Model,
        batch: Any,
        options: LSUVOptions,
        states: list[LayerState],
        merges: list[MergeState],
    ) -> None:
        self.model, self.batch = model, batch
        self.measure, self.criterion, self.scale_on_device = options.measure, options.criterion, options.scale_on_device
        self.center = options.center
        self.states, self.merges = states, merges
        self.state_of = {state.target: state for state in states}

    def _forward(self, layers: list[keras.layers.Layer], make_call: Callable[..., Callable[..., Any]]) -> None:
        """One forward pass of the batch in inference, each of `layers` called through `make_call(layer, call)`.

        Raises:
            ValueError: LSUV's own error, raised inside a layer's call.
        """
        try:
            with intercepted_calls(layers, make_call), inference_mode():
                self.model(self.batch, training=False)
        except Abort as abort:
            raise abort.error from None

    def measure_call(
        self,
        target: Target,
        original_call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        record: Callable[[Moments], None],
    ) -> Any:
        """One call of `target` at its kernel as it is: gives `record` the moments of what the run measures of its
        pre-activation (per channel with `center=True`; a recurrent layer's input projection), unless the call is
        traced; returns the layer's output."""
        if target.is_recurrent:
            if not is_traced((args, kwargs)):
                record(moments(target.input_projection(args, kwargs)))
            return original_call(*args, **kwargs)
        with target.activation_removed() as activation:
            z = original_call(*args, **kwargs)
        if not is_traced((args, kwargs)):
            groups = channel_groups(target, z) if self.center else None
            record(moments(target.measured(self.measure.of(z, activation), args, kwargs), groups))
        return layer_output(target, original_call, args, kwargs, z, activation)

    def _read_back(self, this_pass: Pass) -> None:
        """Completes the records of the pass's layers rescaled on the device, in one transfer.

        Raises:
            ValueError: For the first layer, in processing order, whose output was not finite.
        """
        unread = [state for state in this_pass.tentative if state.on_device is not None]
        if unread:
            values = fetch([value for state in unread for value in state.on_device or ()])
            for state, (variance, scale, stop) in zip(unread, values.reshape(-1, 3), strict=True):
                state.record = unit_scale_record(
                    state.target, float(variance), float(scale), float(stop), self.criterion
                )
                state.on_device = None


def layer_output(
    target: Target,
    original_call: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    preactivation: Any,
    activation: Callable[[Any], Any],
) -> Any:
    """The layer's output, given its pre-activation, for the pass to go on with.

    Keras's own `call` applies the activation last, so the output is `activation(preactivation)`. A `call` of the
    layer's own may do more after the activation (`Dense.call(x) + ...`): it is called again, as it is. A kernel
    layer's output is what was measured (`Target.activation_removed` leaves its activation in place).
    """
    if target.is_linear_in_kernel or target.is_kernel_layer:
        return activation(preactivation)
    return original_call(*args, **kwargs)
