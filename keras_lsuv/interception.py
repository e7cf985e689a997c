"""Intercepting a layer's calls during an eager forward pass, and leaving the layer exactly as found."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras

_ABSENT = object()


@contextlib.contextmanager
def intercepted_calls(
    layers: list[keras.layers.Layer], make_call: Callable[[keras.layers.Layer, Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Replaces each layer's `call` by `make_call(layer, call)` for the duration of the context.

    Keras has no forward-hook API. `Layer.__call__` looks `self.call` up at call time, so an instance attribute
    intercepts the layer eagerly on every backend. A user's own instance-level `call` is the one wrapped and is
    put back afterwards. Installing happens inside the protected region and each layer's previous state is
    recorded before its attribute is set, so an interrupt at any point (while installing, during the pass, while
    removing) leaves no interceptor behind.

    Example:

    >>> with intercepted_calls([layer], lambda layer, call: lambda *a, **k: call(*a, **k)):
    ...     model(x)
    """
    installed: list[tuple[dict[str, Any], Any]] = []
    try:
        for layer in layers:
            state = vars(layer)
            installed.append((state, state.get("call", _ABSENT)))
            state["call"] = make_call(layer, layer.call)
        yield
    finally:
        _restore(installed)


def _restore(installed: list[tuple[dict[str, Any], Any]]) -> None:
    # Each restore is one dict operation; an interrupt between two of them is held until all are done.
    interrupted: BaseException | None = None
    while installed:
        state, previous = installed[-1]
        try:
            if previous is _ABSENT:
                state.pop("call", None)
            else:
                state["call"] = previous
            installed.pop()
        except BaseException as error:  # noqa: BLE001 - re-raised once every layer is restored
            interrupted = error
    if interrupted is not None:
        raise interrupted


def is_traced(args: Any) -> bool:
    """True when a call's arguments are symbolic or batched by a transform: inside JAX control flow (`scan`, `vmap`,
    `map`), a TF graph, or torch's `vmap` (what `keras.ops.vectorized_map` runs on torch).

    Such values cannot be measured on the host. Keras offers no portable test, so each backend is asked directly.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return any(isinstance(value, jax.core.Tracer) for value in _leaves(args))
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    if backend == "torch":
        import torch

        # A tensor inside `torch.vmap` (or `torch.func.grad`) is a functorch wrapper without storage of its own:
        # reading it on the host fails. torch names no public test for it.
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        return any(isinstance(value, torch.Tensor) and wrapped(value) for value in _leaves(args))
    return False


def _leaves(args: Any) -> Iterator[Any]:
    """The leaves of a call's arguments (lists, tuples and dicts, nested), in no particular order.

    `keras.tree.flatten` finds the same leaves but sorts dict keys and, on torch, goes through torch's pytree: about
    20 µs per call of a layer, which `is_traced` pays at every intercepted call.
    """
    if isinstance(args, (list, tuple)):
        for item in args:
            yield from _leaves(item)
    elif isinstance(args, dict):
        for item in args.values():
            yield from _leaves(item)
    elif args is not None:
        yield args
