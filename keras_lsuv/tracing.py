"""Subclassed layers' calls traced into graphs, so that the additions inside them are merges (`residual="stream"`).

A residual block written as a layer of its own (`x = x + self.attention(self.norm(x))` in a `call`: keras-hub's
`TransformerEncoder`/`TransformerDecoder`, every keras-hub backbone's blocks, a user's `TransformerBlock`) adds its
residuals eagerly: `x + y` is a plain backend addition, which no graph records and nothing can intercept. So each
such layer is traced: at its call in one forward pass of the batch, its `call` runs again on Keras tensors of that
call's shapes and dtypes (every other argument as it was), which records its sub-layers' calls and its operations
(`x + y` among them) as a graph (`keras.Function`). Where that graph reproduces the call's output on the batch, the
engine runs the layer through it during its passes (`TracedCall.call_through`), so that its additions are operations
it intercepts like a Functional graph's, and `residual.find_merges` finds them there; outside LSUV's passes the layer
runs its own `call`, as ever. Tracing leaves nothing behind on the model: the nodes it records on the sub-layers are
taken off again (`_traceable`).

A layer is traced where its `call` is not Keras's own, it is not a model (a subclassed model's graph is not a
layer's), it holds a target, and it is not one itself; it must be called once per forward pass, eagerly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
from keras import ops, tree

from keras_lsuv.inference import inference_mode
from keras_lsuv.interception import intercepted_calls, is_traced
from keras_lsuv.targets import Target, has_keras_call


@dataclasses.dataclass(eq=False)
class TracedCall:
    """A layer's call traced into a graph.

    Args:
        layer: The layer.
        function: Its `call` as a graph of the tensors among its arguments.
        arguments: The call's positional argument count and keyword names.
        constants: The call's arguments that are not tensors, in `keras.tree.flatten` order.
        specs: The shape and dtype of each tensor argument, in the same order.
        output: The traced call's output: the graph's outputs are its Keras tensors, in `keras.tree.flatten` order;
            its other leaves (a `None` in `(x, None)`) are constants of the call.
    """

    layer: keras.layers.Layer
    function: keras.Function
    arguments: tuple[int, tuple[str, ...]]
    constants: list[Any]
    specs: list[tuple[tuple[int, ...], str]]
    output: Any

    def tensors_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any] | None:
        """The tensors among a call's arguments, where the call is like the traced one (same tensor shapes and
        dtypes, same other arguments); else `None`."""
        if (len(args), tuple(sorted(kwargs))) != self.arguments:
            return None
        leaves = tree.flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if _is_tensor(leaf)]
        constants = [leaf for leaf in leaves if not _is_tensor(leaf)]
        if [_spec(t) for t in tensors] != self.specs or len(constants) != len(self.constants):
            return None
        if not all(_same(a, b) for a, b in zip(constants, self.constants, strict=True)):
            return None
        return tensors

    def call_through(self, original_call: Callable[..., Any]) -> Callable[..., Any]:
        """The layer's `call` run through its graph; a call unlike the traced one runs `original_call`."""

        def call(*args: Any, **kwargs: Any) -> Any:
            tensors = None if is_traced((args, kwargs)) else self.tensors_of(args, kwargs)
            if tensors is None:
                return original_call(*args, **kwargs)
            return self.outputs_of(tensors)

        return call

    def outputs_of(self, tensors: list[Any]) -> Any:
        """The call's output, through the graph, for the tensors among its arguments."""
        values = iter(self.function(tensors))
        leaves = tree.flatten(self.output)
        return tree.pack_sequence_as(
            self.output, [next(values) if isinstance(leaf, keras.KerasTensor) else leaf for leaf in leaves]
        )


@dataclasses.dataclass
class Tracing:
    """What tracing found: the layers traced, and why each other candidate was not."""

    traced: list[TracedCall]
    untraced: dict[keras.layers.Layer, str]


def candidates(model: keras.Model, targets: list[Target]) -> list[keras.layers.Layer]:
    """The layers of `model` whose calls are to be traced: a `call` not Keras's own, not a model, holding a target
    (one without a `skip_reason`) and not one itself."""
    active = {id(t.layer) for t in targets if not t.skip_reason}
    found = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.Model) or id(layer) in active or has_keras_call(layer):
            continue
        if any(id(inner) in active for inner in layer._flatten_layers(include_self=False)):
            found.append(layer)
    return found


def trace_calls(model: keras.Model, batch: Any, layers: list[keras.layers.Layer]) -> Tracing:
    """Traces each of `layers` at its call in one forward pass of `batch` (in inference), where it is called once.

    Each layer's graph is checked on the call: it must give the call's output exactly, else the layer is not traced.

    Returns:
        The traced calls, and a reason for each layer not traced.
    """
    traces: dict[keras.layers.Layer, TracedCall | str] = {}
    calls: dict[keras.layers.Layer, int] = {}

    tracing: list[keras.layers.Layer] = []  # the layer being traced: calls made by its trace are not the pass's

    def make_call(layer: keras.layers.Layer, call: Callable[..., Any]) -> Callable[..., Any]:
        def traced_call(*args: Any, **kwargs: Any) -> Any:
            output = call(*args, **kwargs)
            if tracing:
                return output
            calls[layer] = calls.get(layer, 0) + 1
            if calls[layer] == 1:
                tracing.append(layer)
                try:
                    traces[layer] = _trace(layer, call, args, kwargs, output)
                finally:
                    tracing.pop()
            return output

        return traced_call

    with intercepted_calls(layers, make_call), inference_mode():
        model(batch, training=False)
    traced, untraced = [], {}
    for layer in layers:
        trace = traces.get(layer, "not called by the forward pass")
        if calls.get(layer, 0) > 1:
            trace = f"called {calls[layer]} times per forward pass: a merge is solved at one call"
        if isinstance(trace, TracedCall):
            traced.append(trace)
        else:
            untraced[layer] = trace
    return Tracing(traced, untraced)


def _trace(
    layer: keras.layers.Layer, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> TracedCall | str:
    """`layer`'s call on `args` and `kwargs` (which gave `output`) as a graph, or why it cannot be one."""
    if is_traced((args, kwargs)):
        return "called with symbolic values (inside a traced function)"
    leaves = tree.flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if _is_tensor(leaf)]
    if not tensors:
        return "called with no tensor"
    inputs = [keras.Input(batch_shape=shape, dtype=dtype) for shape, dtype in map(_spec, tensors)]
    symbolic = iter(inputs)
    symbolic_args, symbolic_kwargs = tree.pack_sequence_as(
        (args, kwargs), [next(symbolic) if _is_tensor(leaf) else leaf for leaf in leaves]
    )
    try:
        with _traceable(layer):
            symbolic_output = call(*symbolic_args, **symbolic_kwargs)
            outputs = [leaf for leaf in tree.flatten(symbolic_output) if isinstance(leaf, keras.KerasTensor)]
            function = keras.Function(inputs, outputs)
    except Exception as error:  # noqa: BLE001 - any failure of a user's `call` on Keras tensors: not traced, and why
        return f"its call cannot be traced on Keras tensors ({type(error).__name__}: {_first_line(error)})"
    arguments = (len(args), tuple(sorted(kwargs)))
    constants = [leaf for leaf in leaves if not _is_tensor(leaf)]
    traced = TracedCall(layer, function, arguments, constants, [_spec(t) for t in tensors], symbolic_output)
    try:
        with inference_mode():
            replayed = traced.outputs_of(tensors)
        reproduced = _equal(replayed, output)
    except Exception as error:  # noqa: BLE001 - a graph that fails where the call ran is not the call's
        return f"its call traced on Keras tensors fails on the batch ({type(error).__name__}: {_first_line(error)})"
    if not reproduced:
        return "its call traced on Keras tensors does not reproduce its output on the batch"
    for operation in function.operations:
        if not isinstance(operation, keras.layers.Layer):  # an operation of its own: named after the layer
            operation.name = f"{layer.name}/{operation.name}"
    return traced


@contextlib.contextmanager
def _traceable(layer: keras.layers.Layer) -> Iterator[None]:
    """A block in which `layer`'s `call` can be traced on Keras tensors, after which the model is as it was.

    A sub-layer whose `call` overrides its class's `compute_output_spec` (keras-hub's `CachedMultiHeadAttention`
    takes a `cache` that `MultiHeadAttention.compute_output_spec` does not) has its output spec computed from its
    `call` in the block, as Keras computes a layer's by default (`keras.Operation.compute_output_spec`). At the
    end, the nodes of `layer` and its sub-layers (the calls a symbolic trace records on them) are put back.
    """
    inner = list(layer._flatten_layers(include_self=True))
    saved = [(sub, list(sub._inbound_nodes), list(sub._outbound_nodes)) for sub in inner]
    shadowed = [sub for sub in inner if _spec_predates_call(type(sub))]
    try:
        for sub in shadowed:
            vars(sub)["compute_output_spec"] = functools.partial(keras.Operation.compute_output_spec, sub)
        yield
    finally:
        for sub in shadowed:
            vars(sub).pop("compute_output_spec", None)
        for sub, inbound, outbound in saved:
            sub._inbound_nodes[:] = inbound
            sub._outbound_nodes[:] = outbound


def _spec_predates_call(kind: type[Any]) -> bool:
    """Whether class `kind` has a `call` newer than its own `compute_output_spec` (one not Keras's generic one)."""
    calls = [c for c in kind.__mro__ if "call" in vars(c)]
    specs = [c for c in kind.__mro__ if "compute_output_spec" in vars(c)]
    if not calls or not specs or specs[0] in (keras.layers.Layer, keras.Operation):
        return False
    return calls[0] is not specs[0] and issubclass(calls[0], specs[0])


def _first_line(error: Exception) -> str:
    """The first line of an error's message that says something (Keras wraps a layer's error in several lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    meaningful = [line for line in lines if not line.startswith("Exception encountered when calling")]
    return (meaningful or lines or [""])[0]


def _is_tensor(value: Any) -> bool:
    return ops.is_tensor(value) or isinstance(value, np.ndarray)


def _spec(tensor: Any) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in tensor.shape), keras.backend.standardize_dtype(tensor.dtype)


def _same(a: Any, b: Any) -> bool:
    """Whether two arguments that are not tensors are the same: the same object, or equal values of one type."""
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - a value whose `==` is not a truth value is the same only as itself
        return False


def _equal(a: Any, b: Any) -> bool:
    """Whether two outputs are the same structure of bit-identical values."""
    left, right = tree.flatten(a), tree.flatten(b)
    if len(left) != len(right):
        return False
    for x, y in zip(left, right, strict=True):
        if _is_tensor(x) != _is_tensor(y):
            return False
        if _is_tensor(x):
            if not np.array_equal(ops.convert_to_numpy(x), ops.convert_to_numpy(y)):
                return False
        elif not _same(x, y):
            return False
    return True
