"""Which layers LSUV rescales and which kernel of each."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from keras_lsuv.report import LayerRecord

TARGET_CLASSES = (
    layers.Dense,
    layers.EinsumDense,
    layers.Conv1D,
    layers.Conv2D,
    layers.Conv3D,
    layers.Conv1DTranspose,
    layers.Conv2DTranspose,
    layers.Conv3DTranspose,
    layers.DepthwiseConv1D,
    layers.DepthwiseConv2D,
    layers.SeparableConv1D,
    layers.SeparableConv2D,
)
TRANSPOSED = (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
DEPTHWISE = (layers.DepthwiseConv1D, layers.DepthwiseConv2D)
SEPARABLE = (layers.SeparableConv1D, layers.SeparableConv2D)


@dataclasses.dataclass(eq=False)
class Target:
    """A layer LSUV works on.

    Args:
        layer: The Keras layer.
        skip_reason: Why it is left alone (frozen, kernel not a plain
            variable), else `None`.
    """

    layer: keras.layers.Layer
    skip_reason: str | None = None

    @property
    def scaled_kernel(self) -> keras.Variable:
        """The kernel whose scale sets the output variance (the pointwise one for separable convs)."""
        if isinstance(self.layer, SEPARABLE):
            return self.layer.pointwise_kernel
        return self.layer.kernel

    @property
    def kernels(self) -> list[keras.Variable]:
        """Every kernel of the layer (both for separable convs)."""
        if isinstance(self.layer, SEPARABLE):
            return [self.layer.depthwise_kernel, self.layer.pointwise_kernel]
        return [self.layer.kernel]

    @property
    def is_linear_in_kernel(self) -> bool:
        """True when the pre-activation output is `L(kernel) + bias` with `call` from Keras itself.

        Then scaling the kernel by `s` scales `L` by `s`, so the effect of a
        rescale is known without calling the layer again. A subclass with its
        own `call` may be anything, so it is re-evaluated instead.
        """
        return type(self.layer).call.__module__.startswith("keras.")

    def skipped_record(self) -> LayerRecord:
        """The record of a target LSUV left alone: its skip reason, or that the forward pass never reached it."""
        reason = self.skip_reason or "not reached by the forward pass"
        return LayerRecord(self.layer.name, type(self.layer).__name__, reason=reason)

    def bias_term(self, like: Any) -> Any:
        """The bias as it is added to the pre-activation output `like` (float32), or `None` if absent or all zero.

        A zero bias (the usual fresh initialization) lets the engine skip the bias arithmetic on the whole output.
        """
        bias = getattr(self.layer, "bias", None)
        if bias is None or not np.any(ops.convert_to_numpy(bias)):
            return None
        bias = ops.cast(bias, "float32")
        if getattr(self.layer, "data_format", "channels_last") == "channels_first":
            bias = ops.reshape(bias, (1, -1) + (1,) * (len(like.shape) - 2))
        return bias


def find_targets(model: keras.layers.Layer) -> list[Target]:
    """Every layer of a target class inside `model` (nested models and composite layers included), once."""
    targets, seen = [], set()
    for layer in _walk(model):
        if isinstance(layer, TARGET_CLASSES) and id(layer) not in seen:
            seen.add(id(layer))
            targets.append(Target(layer, _skip_reason(layer)))
    return targets


def _walk(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    # Keras has no public API listing the sub-layers of composite layers (e.g. MultiHeadAttention's
    # projections); `_flatten_layers` is what Keras itself uses for that. Non-recursive calls keep the
    # order in which the sub-layers were assigned, depth first.
    for child in layer._flatten_layers(include_self=False, recursive=False):
        yield child
        yield from _walk(child)


def _skip_reason(layer: keras.layers.Layer) -> str | None:
    if not layer.trainable:
        return "frozen (trainable=False)"
    if getattr(layer, "lora_enabled", False):
        return "LoRA enabled: the kernel is computed, not a plain variable"
    if getattr(layer, "quantization_mode", None):
        return f"quantized ({layer.quantization_mode}): the kernel is not a plain float variable"
    kernels = Target(layer).kernels
    if not all(isinstance(k, keras.Variable) for k in kernels):
        return "the kernel is not a plain variable"
    return None


@contextlib.contextmanager
def without_activation(layer: keras.layers.Layer) -> Iterator[Any]:
    """Temporarily replaces the layer's fused activation by the identity; yields the original."""
    activation = layer.activation
    layer.activation = keras.activations.linear
    try:
        yield activation
    finally:
        layer.activation = activation
