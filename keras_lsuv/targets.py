"""Which layers LSUV initializes (`default_targets`, or the user's `targets=`) and which weights of each."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from keras_lsuv.report import LayerRecord
from keras_lsuv.statistics import host_values, on_host

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
# Kinds LSUV initializes only when `targets=` chooses them: their output is scaled to unit variance through their
# matrix (keras-hub's `ReversibleEmbedding` is an `Embedding`), and step 1 leaves that matrix alone.
EMBEDDINGS = (layers.Embedding,)
TRANSPOSED = (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
DEPTHWISE = (layers.DepthwiseConv1D, layers.DepthwiseConv2D)
SEPARABLE = (layers.SeparableConv1D, layers.SeparableConv2D)
# The cells whose input kernel LSUV scales, in `keras.layers.RNN` layers (`SimpleRNN`, `LSTM`, `GRU`, `RNN(cell)`):
# each maps the step's input by `kernel` (`(in, gates·units)`, gates side by side) and its state by
# `recurrent_kernel` (`(units, gates·units)`).
RECURRENT_CELLS = (layers.SimpleRNNCell, layers.LSTMCell, layers.GRUCell)
# Recurrent layers whose cell applies its input kernel `(*kernel_size, in, 4·filters)` by a convolution.
CONV_RECURRENT = (layers.ConvLSTM1D, layers.ConvLSTM2D, layers.ConvLSTM3D)
# Names of weights that hold tables or added vectors, not a linear map of the layer's input: embeddings, class and
# mask tokens, positional tables, biases.
TABLE_OR_BIAS_NAME = re.compile(r"embed|token|table|bias|(^|_)pos(_|$|ition)", re.IGNORECASE)


@dataclasses.dataclass(eq=False)
class Target:
    """A layer LSUV works on.

    Args:
        layer: The Keras layer.
        skip_reason: Why it is left alone (frozen, kernel not a plain
            variable, a deliberate start), else `None`.
        before: The weights the run may change, each with its value before the run (`save_weights`).
        host_bias: The bias's values on the host, flat, float64 (`read_biases`); `None` until read or without bias.
    """

    layer: keras.layers.Layer
    skip_reason: str | None = None
    before: list[tuple[keras.Variable, Any]] = dataclasses.field(default_factory=list, repr=False)
    host_bias: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def save_weights(self, bias: bool) -> None:
        """Keeps a copy of the kernels as they are now, and of the bias if `bias` (`center=True` sets it), for
        `restore_weights`."""
        weights = self.kernels + ([self.layer.bias] if bias and self.has_bias else [])
        self.before = [(weight, _copy(weight.value)) for weight in weights]

    def restore_weights(self) -> None:
        """Puts back the weights saved by `save_weights` (a target LSUV does not measure keeps them)."""
        for weight, value in self.before:
            weight.assign(value)

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias variable (`use_bias=True`), zero or not; a kernel layer's `bias`, if any,
        is not known to be added to its output per channel, so it has none here."""
        return getattr(self.layer, "bias", None) is not None and not (self.is_kernel_layer or self.is_recurrent)

    @functools.cached_property
    def is_recurrent(self) -> bool:
        """Whether the layer is a recurrent layer (`is_recurrent`): its input kernel is measured on the input
        projection of every step (`input_projection`), in closed form."""
        return is_recurrent(self.layer)

    def input_projection(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A recurrent layer's input projection `x_t @ kernel` (a `ConvLSTM`'s input convolution) over every step of
        the call with `args`/`kwargs` (float32, without bias, the steps the call's mask leaves out left out), flat.

        It is what the cell computes of its input at each step, before the gates mix it with the state; it is linear
        in the kernel and the same in every step, so all steps are computed in one product, whatever the layer's
        `unroll`, direction or backend loop (JAX's `scan`).
        """
        sequences = ops.cast(args[0] if args else kwargs["sequences"], "float32")
        mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
        cell, kernel = self.layer.cell, ops.cast(self.scaled_kernel, "float32")
        if isinstance(self.layer, CONV_RECURRENT):  # every frame of every sequence through the input convolution
            frames = ops.reshape(sequences, (-1, *sequences.shape[2:]))
            z = cell.input_conv(frames, kernel, None, padding=cell.padding)
        else:
            z = ops.matmul(sequences, kernel)
        z = ops.reshape(z, (sequences.shape[0] * sequences.shape[1], -1))  # one row per step
        if mask is not None:
            z = ops.take(z, np.flatnonzero(np.asarray(ops.convert_to_numpy(mask)).reshape(-1)), axis=0)
        return ops.reshape(z, (-1,))

    @functools.cached_property
    def is_kernel_layer(self) -> bool:
        """Whether the layer is a kernel layer (`is_kernel_layer`): measured on its whole output, activation
        included, and rescaled by evaluating it again."""
        return is_kernel_layer(self.layer)

    @functools.cached_property
    def scaled_kernel(self) -> keras.Variable:
        """The kernel whose scale sets the output variance (the pointwise one for separable convs, the matrix of an
        embedding).

        Read once per target (a run makes its targets, and the engine asks at every step of a layer): a Keras
        layer's `kernel` is a property that checks the layer's quantization and LoRA state at each read.
        """
        if isinstance(self.layer, SEPARABLE):
            return self.layer.pointwise_kernel
        if self.is_embedding:
            return self.layer.embeddings
        if self.is_kernel_layer:
            return scaled_kernel_of(self.layer)
        if self.is_recurrent:
            return self.layer.cell.kernel
        return self.layer.kernel

    @functools.cached_property
    def kernels(self) -> list[keras.Variable]:
        """Every kernel of the layer (both for separable convs), read once per target as `scaled_kernel` is."""
        if isinstance(self.layer, SEPARABLE):
            return [self.layer.depthwise_kernel, self.layer.pointwise_kernel]
        if self.is_kernel_layer:
            return own_kernels(self.layer)
        if self.is_recurrent:
            return [self.layer.cell.kernel, self.layer.cell.recurrent_kernel]
        return [self.scaled_kernel]

    @property
    def is_embedding(self) -> bool:
        """Whether the layer is an `Embedding` (chosen through `targets=`): step 1 leaves its matrix alone."""
        return isinstance(self.layer, EMBEDDINGS)

    def measured(self, z: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The part of the pre-activation `z` of a call with `args`/`kwargs` that LSUV measures.

        All of it, but for a lookup of an `Embedding` with `mask_zero=True`: the positions of token 0 (padding) are
        left out, as the layers after it leave them out through the mask. The ids are read to the host to select
        the rest. A lookup is a call whose output is its first argument's shape plus the vector axis; a
        `ReversibleEmbedding`'s `reverse=True` call (hidden states to logits over the vocabulary) reads no ids, so
        its output is measured whole.
        """
        if not (self.is_embedding and getattr(self.layer, "mask_zero", False)):
            return z
        ids = args[0] if args else kwargs["inputs"]
        if tuple(ids.shape) != tuple(z.shape[:-1]):  # not a lookup: no ids, no mask
            return z
        keep = np.flatnonzero(np.asarray(ops.convert_to_numpy(ids)).reshape(-1) != 0)
        return ops.take(ops.reshape(z, (-1, z.shape[-1])), keep, axis=0)

    @property
    def is_linear_in_kernel(self) -> bool:
        """True when the pre-activation output is `L(kernel) + bias` with `call` from Keras itself.

        Then scaling the kernel by `s` scales `L` by `s`, so the effect of a
        rescale is known without calling the layer again. A subclass with its
        own `call` may be anything, so it is re-evaluated instead; so is a
        `ReversibleEmbedding` whose `reverse=True` call caps its logits
        (`logit_soft_cap`, a `tanh`) or computes them from a matrix of their
        own (`tie_weights=False`), which the embedding's scale does not reach.
        """
        if getattr(self.layer, "logit_soft_cap", None) is not None or getattr(self.layer, "tie_weights", True) is False:
            return False
        if self.is_kernel_layer or self.is_recurrent:
            return False
        return has_keras_call(self.layer)

    @contextlib.contextmanager
    def activation_removed(self) -> Iterator[Callable[[Any], Any]]:
        """The block runs the layer without its fused activation (`without_activation`); yields the activation.

        A kernel layer's `activation`, if it has one, may be applied anywhere in its `call` (keras-hub's
        experts gate with it): it is left in place, and the identity is yielded.
        """
        if self.is_kernel_layer:
            yield keras.activations.linear
            return
        with without_activation(self.layer) as activation:
            yield activation

    def experts(self, output: Any) -> int | None:
        """The number of experts of a bank whose output `output` stacks them on its first axis, or `None`.

        A bank is a kernel layer whose scaled kernel is an `(experts, in, out)` weight (`expert` in its name, as
        keras-hub's `MixtralMoeExperts` and `Qwen3MoeExperts` name theirs) and whose output has `experts` rows on
        its first axis: each expert is then scaled on its own (`keras_lsuv.experts`).
        """
        kernel = self.scaled_kernel if self.is_kernel_layer else None
        if kernel is None or len(kernel.shape) != 3 or "expert" not in kernel.name.lower() or len(output.shape) < 2:
            return None
        return int(kernel.shape[0]) if output.shape[0] == kernel.shape[0] else None

    def unmeasurable(self, output: Any) -> str | None:
        """Why the output of one of the layer's calls cannot be measured (not one floating tensor: a kernel layer
        may return anything), or `None`."""
        if not (hasattr(output, "shape") and hasattr(output, "dtype")):
            return f"its output is not one tensor ({type(output).__name__}): LSUV measures one output"
        if "float" not in keras.backend.standardize_dtype(output.dtype):
            return f"its output is not floating ({keras.backend.standardize_dtype(output.dtype)})"
        return None

    def skipped_record(self, reason: str | None = None) -> LayerRecord:
        """The record of a target LSUV left alone: `reason`, its skip reason, or that the pass never reached it."""
        reason = reason or self.skip_reason or "not reached by the forward pass"
        return LayerRecord(self.layer.name, type(self.layer).__name__, reason=reason, layer=self.layer)

    def adds_bias(self) -> bool:
        """True when the layer has a bias that is not all zero, as `host_bias` says (read here if not read yet)."""
        if not self.has_bias:
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
        return ops.reshape(ops.cast(self.layer.bias, "float32"), self.channel_shape(like))

    def channel_shape(self, like: Any) -> tuple[int, ...]:
        """The shape of the bias as it is added to the pre-activation output `like`: one value per output channel.

        The per-channel statistics (`statistics.moments`) and a centering bias use it; the layer must have a bias.
        """
        shape = tuple(int(size) for size in self.layer.bias.shape)
        if getattr(self.layer, "data_format", "channels_last") == "channels_first":
            return (1, math.prod(shape)) + (1,) * (len(like.shape) - 2)
        return shape


def default_targets(layer: keras.layers.Layer) -> bool:
    """Whether LSUV initializes `layer` unless told otherwise (`targets=None`): every `Dense`, `EinsumDense` and
    convolution (`ConvND`, `ConvNDTranspose`, `DepthwiseConvND`, `SeparableConvND`), subclasses included, every
    recurrent layer (`is_recurrent`: `SimpleRNN`, `LSTM`, `GRU`, `ConvLSTM`, by their input kernel), and every
    kernel layer (`is_kernel_layer`: a layer of its own with kernels of its own, such as a graph attention layer or
    keras-hub's mixture-of-experts bank), but a deliberate start (`is_deliberate_start`: a kernel its author
    initialized to zeros, as a PointNet T-net's or a ReZero-style branch's last layer).

    With `targets=None` a deliberate start gets a record, skipped with that reason, and keeps its weights
    bit-identical; a `targets=` that builds on this function (`default_targets(layer) and ...`) keeps it too, without
    a record, and one that returns `True` for it has it initialized as any other layer.

    Example:

    >>> # every default target but the classifier head
    >>> keras_lsuv.lsuv_init(model, x, targets=lambda layer: keras_lsuv.default_targets(layer)
    ...                      and layer.name != "logits")

    Args:
        layer: A Keras layer.

    Returns:
        `True` for a layer of those kinds that is not a deliberate start.
    """
    return (
        isinstance(layer, TARGET_CLASSES) or is_kernel_layer(layer) or is_recurrent(layer)
    ) and not is_deliberate_start(layer)


def is_kernel_layer(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a kernel layer: one LSUV initializes as a whole because it holds kernels of its own.

    That is a built layer, not a model, with a `call` written outside Keras (a user's layer, a keras-hub layer),
    holding trainable kernels of its own (`own_kernels`: weights of rank 2 or more that map more than one input,
    tables and biases left out by name), none of whose sub-layers is a target (a layer that holds `Dense` layers
    beside a kernel of its own is left out: its sub-layers are measured on their own; `report.uncovered` lists the
    kernel). Keras's own layers with kernels are targets of their own kind (`Dense`, the convolutions), tables
    (`Embedding`) or cells of an `RNN`.

    LSUV measures such a layer's whole output, as its `call` returns it (its activation included, wherever the
    `call` applies it), and rescales one kernel (`scaled_kernel_of`) by evaluating the layer again at each scale
    tried, the paper's loop, which does not assume the output is linear in the kernel. A layer whose output is
    not one floating tensor is left alone with that reason. Step 1 draws all its kernels orthonormal, each
    `(experts, inputs, outputs)` kernel (a name with `expert` in it) one matrix per expert.

    Example:

    >>> class GraphAttention(keras.layers.Layer):
    ...     def build(self, shape):
    ...         self.kernel = self.add_weight(shape=(shape[-1], 16))
    ...         self.kernel_attention = self.add_weight(shape=(32, 1))
    >>> keras_lsuv.is_kernel_layer(built_graph_attention)
    True

    Args:
        layer: A Keras layer.

    Returns:
        `True` for such a layer.
    """
    if has_keras_call(layer):  # Keras's own: a target kind, a table, a cell
        return False
    if isinstance(layer, (*TARGET_CLASSES, *EMBEDDINGS, keras.Model)) or not layer.built:
        return False
    return bool(own_kernels(layer)) and not holds_targets(layer)


def has_keras_call(layer: keras.layers.Layer) -> bool:
    """Whether the `call` `layer` runs is Keras's own (defined in a `keras` module), not a subclass's or a user's."""
    return str(getattr(type(layer).call, "__module__", "")).split(".")[0] == "keras"


def is_recurrent(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is a recurrent layer LSUV initializes: `ConvLSTM1D/2D/3D`, or a `keras.layers.RNN`
    (`SimpleRNN`, `LSTM`, `GRU`, or `RNN` with one of their cells; `Bidirectional`'s two directions each) whose cell
    is one of `RECURRENT_CELLS`.

    Step 1 draws its input and recurrent kernels orthonormal per gate (Keras's own `recurrent_initializer` is
    `"orthogonal"`, over all gates at once); step 2 scales the input kernel so that the input projection
    `x_t @ kernel` (a `ConvLSTM`'s input convolution) has unit variance over every step of every sequence
    (`Target.input_projection`: one scalar over the gates, as the paper's over a convolution's channels), and leaves
    the recurrent kernel orthonormal. Stacked cells are not recurrent layers here: `report.uncovered` lists their
    kernels.
    """
    if isinstance(layer, CONV_RECURRENT):
        return True
    return isinstance(layer, layers.RNN) and isinstance(getattr(layer, "cell", None), RECURRENT_CELLS)


def holds_targets(layer: keras.layers.Layer) -> bool:
    """Whether a sub-layer of `layer` is a target kind or holds kernels of its own."""
    return any(isinstance(sublayer, TARGET_CLASSES) or own_kernels(sublayer) for sublayer in _walk(layer))


def own_kernels(layer: keras.layers.Layer) -> list[keras.Variable]:
    """The trainable kernels `layer` holds itself (not through a sub-layer), in the order it created them.

    A kernel is a weight of rank 2 or more that maps more than one input (`prod(shape[:-1]) > 1`: a class token
    `(1, 1, dim)` is no map) and whose name does not say it is a table or an added vector (`TABLE_OR_BIAS_NAME`:
    `embed`, `token`, `table`, `bias`, `pos`).
    """
    inside = {id(weight) for sublayer in _walk(layer) for weight in sublayer.weights}
    return [weight for weight in layer.trainable_weights if id(weight) not in inside and is_kernel_weight(weight)]


def is_kernel_weight(weight: keras.Variable) -> bool:
    """Whether `weight` may be a linear map: rank 2 or more, more than one input (`prod(shape[:-1]) > 1`), and a
    name that does not say it is a table or an added vector (`TABLE_OR_BIAS_NAME`)."""
    shape = tuple(weight.shape)
    return len(shape) >= 2 and math.prod(shape[:-1]) > 1 and not TABLE_OR_BIAS_NAME.search(weight.name)


def scaled_kernel_of(layer: keras.layers.Layer) -> keras.Variable:
    """The kernel of a kernel layer that LSUV scales: the one held as the layer's `kernel` attribute, else the last
    one it created (the output projection of a feed-forward `x @ w1 @ w2`, or of keras-hub's experts)."""
    kernels = own_kernels(layer)
    attribute = getattr(layer, "kernel", None)
    return next((kernel for kernel in kernels if kernel is attribute), kernels[-1])


def is_deliberate_start(layer: keras.layers.Layer) -> bool:
    """Whether the author of `layer` started it from a zero kernel on purpose.

    That is: the initializer of the kernel that sets the layer's output scale (`kernel_initializer`,
    `depthwise_initializer` of depthwise convs, `pointwise_initializer` of separable convs) is zeros (`"zeros"`,
    `Zeros()`, `Constant(0)`) and, once the layer is built, that kernel still holds only zeros. Such a layer outputs
    its bias alone (a PointNet T-net starts at the identity transform, a ReZero or SkipInit branch at zero), which
    LSUV's rescaling would undo. Only a layer with a zeros initializer has its kernel read.

    A kernel layer (`is_kernel_layer`) is one when the kernel LSUV would scale holds only zeros.

    Args:
        layer: A Keras layer.

    Returns:
        `True` for such a layer of the kinds `default_targets` chooses from.
    """
    if is_kernel_layer(layer):
        return not np.any(ops.convert_to_numpy(scaled_kernel_of(layer)))
    if not isinstance(layer, TARGET_CLASSES):
        return False
    attribute = (
        "pointwise" if isinstance(layer, SEPARABLE) else "depthwise" if isinstance(layer, DEPTHWISE) else "kernel"
    )
    initializer = getattr(layer, f"{attribute}_initializer", None)
    zeros = isinstance(initializer, keras.initializers.Zeros) or (
        isinstance(initializer, keras.initializers.Constant) and not np.any(np.asarray(initializer.value))
    )
    if not zeros or not layer.built:
        return zeros
    kernel = Target(layer).scaled_kernel
    return not np.any(ops.convert_to_numpy(kernel))


def find_targets(model: keras.layers.Layer, select: Callable[[keras.layers.Layer], bool] | None = None) -> list[Target]:
    """Every layer inside `model` that `select` chooses (nested models and composite layers included), once.

    Args:
        model: The model.
        select: `layer -> bool`, called once on every layer but the `InputLayer`s. `None` chooses what
            `default_targets` chooses, and also the deliberate starts it leaves out, as targets skipped with
            `DELIBERATE_START_REASON` (so that the report says why they keep their weights).

    Raises:
        TypeError: If `select` returns anything but a bool (Python's or NumPy's) for a layer.
        ValueError: If `select` chooses a layer of a kind LSUV cannot initialize.
    """
    keep_deliberate_starts = select is None
    select = select or _of_target_kind
    targets, seen = [], set()
    for layer in _walk(model):
        if id(layer) in seen or isinstance(layer, layers.InputLayer):  # an input is no layer to choose
            continue
        seen.add(id(layer))
        chosen = select(layer)
        if not isinstance(chosen, (bool, np.bool_)):
            raise TypeError(
                f"targets must return a bool for each layer, but returned {chosen!r:.80} ({type(chosen).__name__}) "
                f"for layer '{layer.name}' ({type(layer).__name__}). Return True to choose the layer, e.g. "
                "`lambda layer: keras_lsuv.default_targets(layer) and layer.name != 'logits'`."
            )
        if not chosen:
            continue
        if not (isinstance(layer, TARGET_CLASSES + EMBEDDINGS) or is_kernel_layer(layer) or is_recurrent(layer)):
            kinds = ", ".join(cls.__name__ for cls in TARGET_CLASSES + EMBEDDINGS)
            raise ValueError(
                f"targets selects layer '{layer.name}' ({type(layer).__name__}), which LSUV cannot initialize: it "
                f"rescales the kernels of {kinds} (and their subclasses), of SimpleRNN, LSTM and GRU layers, and of "
                "kernel layers (layers of your own holding kernels of their own, see `keras_lsuv.is_kernel_layer`). "
                "Leave it out of targets, e.g. "
                "`lambda layer: keras_lsuv.default_targets(layer) and ...`."
            )
        targets.append(Target(layer, _skip_reason(layer, keep_deliberate_starts)))
    return targets


def targets_inside(layer: keras.layers.Layer, targets: list[Target]) -> list[Target]:
    """The targets among `targets` whose layer is inside `layer` (a sub-layer of a composite layer or nested model),
    found without calling `targets=` again."""
    inside = {id(sublayer) for sublayer in _walk(layer)}
    return [target for target in targets if id(target.layer) in inside]


def read_biases(targets: list[Target]) -> None:
    """Reads the biases of `targets` to the host (`Target.host_bias`) in one transfer.

    The engine reads them all once, before its pass, rather than once per layer in the middle of it, where each read
    would make an accelerator wait for the host. They stay the biases as the run found them (`center=True` writes
    new ones to the layers, not here).
    """
    with_bias = [t for t in targets if t.has_bias]
    if not with_bias:
        return
    if all(on_host(t.layer.bias.value) for t in with_bias):  # no op to compile: read each one
        values = np.concatenate([host_values(t.layer.bias.value).reshape(-1) for t in with_bias]).astype("float64")
    else:
        flat = [ops.reshape(ops.cast(t.layer.bias, "float32"), (-1,)) for t in with_bias]
        values = np.asarray(ops.convert_to_numpy(ops.concatenate(flat)), dtype="float64")
    start = 0
    for target in with_bias:
        end = start + math.prod(int(size) for size in target.layer.bias.shape)
        target.host_bias, start = values[start:end], end


def _copy(value: Any) -> Any:
    """A copy of a weight's value: in NumPy where `statistics.on_host` keeps it there, else on its device."""
    return np.array(ops.convert_to_numpy(value)) if on_host(value) else ops.copy(value)


def _walk(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    # Keras has no public API listing the sub-layers of composite layers (e.g. MultiHeadAttention's
    # projections); `_flatten_layers` is what Keras itself uses for that. Non-recursive calls keep the
    # order in which the sub-layers were assigned, depth first.
    for child in layer._flatten_layers(include_self=False, recursive=False):
        yield child
        yield from _walk(child)


NEVER_BUILT_REASON = "never built: not used by the model's forward pass"
DELIBERATE_START_REASON = (
    "a deliberate start: its kernel was initialized to zeros and holds only zeros (kept; choose it with targets= to "
    "initialize it)"
)


def _of_target_kind(layer: keras.layers.Layer) -> bool:
    """What `targets=None` chooses: `default_targets`'s layers and the deliberate starts it leaves out."""
    return isinstance(layer, TARGET_CLASSES) or is_kernel_layer(layer) or is_recurrent(layer)


def _skip_reason(layer: keras.layers.Layer, keep_deliberate_start: bool) -> str | None:
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
    if keep_deliberate_start and is_deliberate_start(layer):
        return DELIBERATE_START_REASON
    return None


@contextlib.contextmanager
def without_activation(layer: keras.layers.Layer) -> Iterator[Callable[[Any], Any]]:
    """Temporarily makes the layer's fused activation the identity; yields the original as a callable.

    `activation=None` (which Keras's layers accept) yields the identity. The attribute is written to the
    instance's `__dict__` directly: on torch a Keras layer used as an activation is a registered child module,
    which torch's `Module.__setattr__` refuses to replace by a function. The instance's own attribute, if any,
    is put back exactly as it was.
    """
    activation = getattr(layer, "activation", None)  # an `Embedding` has none
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
