"""The frames of a `TimeDistributed` layer in one call, so that the layers inside it are measured once per pass.

Keras's `TimeDistributed.call` calls the layer it wraps once per frame (a Python loop where the number of frames is
known). Each target inside would be a layer called several times per pass (`multi_call`): rescaled at its first
frame for all, and, where the frames' statistics differ (as the channel means of `center=True` do), done again in a
second pass. The frames do not feed each other, so during LSUV's passes the wrapper runs the layer it wraps once on
every frame at once, as a batch of `batch x frames` samples: each target inside is then called once, its variance
(and channel means) measured over every frame, and solved in the pass. The values are those of the frame loop, for
layers that treat each sample alone, as every target does, and every other layer does in inference. A call with a
mask, or traced, runs the frame loop as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops, tree

from keras_lsuv.interception import is_traced


def frame_wrappers(model: keras.Model, layers: list[keras.layers.Layer]) -> list[keras.layers.Layer]:
    """The `TimeDistributed` layers of `model` that wrap (directly or in a nested model) one of `layers`."""
    inner = {id(layer) for layer in layers}
    return [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.TimeDistributed)
        and any(id(sub) in inner for sub in layer.layer._flatten_layers(include_self=True))
    ]


def all_frames_at_once(wrapper: keras.layers.TimeDistributed, call: Callable[..., Any]) -> Callable[..., Any]:
    """`wrapper`'s call, running the layer it wraps once on all the frames (`call`, the frame loop, with a mask)."""

    def merged(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs.get("mask") is not None or is_traced(inputs) or len(inputs.shape) < 3:
            return call(inputs, *args, **kwargs)
        batch, frames = int(inputs.shape[0]), int(inputs.shape[1])
        options = {"training": kwargs.get("training")} if wrapper.layer._call_has_training_arg else {}
        outputs = wrapper.layer.call(ops.reshape(inputs, (batch * frames, *inputs.shape[2:])), **options)
        return tree.map_structure(lambda output: ops.reshape(output, (batch, frames, *output.shape[1:])), outputs)

    return merged
