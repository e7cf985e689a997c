"""Which layers LSUV rescales and which kernel of each."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
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
        before: The kernels as they were before the run (`save_kernels`).
        host_bias: The bias's values on the host, flat, float64 (`read_biases`); `None` until read or without bias.
    """

    layer: keras.layers.Layer
    skip_reason: str | None = None
    before: list[Any] | None = dataclasses.field(default=None, repr=False)
    host_bias: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def save_kernels(self) -> None:
        """Keeps a copy of the kernels as they are now, for `restore_kernels`."""
        self.before = [ops.copy(kernel.value) for kernel in self.kernels]

    def restore_kernels(self) -> None:
        """Puts back the kernels saved by `save_kernels` (a target LSUV does not measure keeps them)."""
        for kernel, value in zip(self.kernels, self.before or [], strict=False):
            kernel.assign(value)

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
        return bool(type(self.layer).call.__module__.startswith("keras."))

    def skipped_record(self, reason: str | None = None) -> LayerRecord:
        """The record of a target LSUV left alone: `reason`, its skip reason, or that the pass never reached it."""
        reason = reason or self.skip_reason or "not reached by the forward pass"
        return LayerRecord(self.layer.name, type(self.layer).__name__, reason=reason, layer=self.layer)

    def adds_bias(self) -> bool:
        """True when the layer has a bias that is not all zero, as `host_bias` says (read here if not read yet)."""
        if getattr(self.layer, "bias", None) is None:
            return False
        if self.host_bias is None:
            read_biases([self])
        return bool(np.any(self.host_bias))

    def bias_term(self, like: Any) -> Any:
        """The bias as it is added to the pre-activation output `like` (float32), or `None` if absent or all zero.

        A zero bias (the usual fresh initialization) lets the engine skip the bias arithmetic on the whole output.
        """
        if not self.adds_bias():
            return None
        bias = ops.cast(self.layer.bias, "float32")
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


def read_biases(targets: list[Target]) -> None:
    """Reads the biases of `targets` to the host (`Target.host_bias`) in one transfer.

    LSUV never changes a bias, so the engine reads them all once, before its pass, rather than once per layer in the
    middle of it, where each read would make an accelerator wait for the host.
    """
    with_bias = [t for t in targets if getattr(t.layer, "bias", None) is not None]
    if not with_bias:
        return
    flat = [ops.reshape(ops.cast(t.layer.bias, "float32"), (-1,)) for t in with_bias]
    values = np.asarray(ops.convert_to_numpy(ops.concatenate(flat)), dtype="float64")
    ends = np.cumsum([int(np.prod(t.layer.bias.shape)) for t in with_bias])
    for target, host_bias in zip(with_bias, np.split(values, ends[:-1]), strict=True):
        target.host_bias = host_bias


def _walk(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    # Keras has no public API listing the sub-layers of composite layers (e.g. MultiHeadAttention's
    # projections); `_flatten_layers` is what Keras itself uses for that. Non-recursive calls keep the
    # order in which the sub-layers were assigned, depth first.
    for child in layer._flatten_layers(include_self=False, recursive=False):
        yield child
        yield from _walk(child)


NEVER_BUILT_REASON = "never built: not used by the model's forward pass"


def _skip_reason(layer: keras.layers.Layer) -> str | None:
    if not layer.built:  # a layer the model holds but never calls (an auxiliary head) has no kernel to read
        return NEVER_BUILT_REASON
    if not layer.trainable:
        return "frozen (trainable=False)"
    if getattr(layer, "lora_enabled", False):
        return "LoRA enabled: the kernel is computed, not a plain variable"
    if getattr(layer, "quantization_mode", None):
        return f"quantized ({layer.quantization_mode}): the kernel is not a plain float variable"
    # A plain kernel is one of the layer's own weights. (`isinstance(k, keras.Variable)` would be the direct test,
    # but before Keras 3.7 `keras.Variable` is a subclass of the backend's variable class, not its base.)
    weights = {id(w) for w in layer.weights}
    if not all(id(k) in weights for k in Target(layer).kernels):
        return "the kernel is not a plain variable"
    return None


@contextlib.contextmanager
def without_activation(layer: keras.layers.Layer) -> Iterator[Callable[[Any], Any]]:
    """Temporarily makes the layer's fused activation the identity; yields the original as a callable.

    `activation=None` (which Keras's layers accept) yields the identity. The attribute is written to the
    instance's `__dict__` directly: on torch a Keras layer used as an activation is a registered child module,
    which torch's `Module.__setattr__` refuses to replace by a function. The instance's own attribute, if any,
    is put back exactly as it was.
    """
    activation = layer.activation
    state = vars(layer)
    had_own, own = "activation" in state, state.get("activation")
    state["activation"] = keras.activations.linear
    try:
        yield keras.activations.linear if activation is None else activation
    finally:
        if had_own:
            state["activation"] = own
        else:
            del state["activation"]
