"""Turning what the user passes as `x` into one checked batch for the model."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops


def prepare_batch(model: keras.Model, x: Any) -> Any:
    """Checks `x` and converts its arrays to backend tensors, keeping its structure.

    Args:
        model: The model the batch is for; when it has symbolic inputs, the
            structure and shapes of `x` are checked against them.
        x: An array or backend tensor, or a list, tuple or dict of them for a
            model with several inputs.

    Returns:
        The batch, with the structure of `x`.

    Raises:
        ValueError: If `x` is empty, not numeric, not finite, has leaves with
            different batch sizes, or does not match the model's inputs.
    """
    if x is None:
        raise ValueError("LSUV needs a batch of training inputs, but x is None.")
    leaves = keras.tree.flatten(x)
    if not leaves:
        raise ValueError(f"LSUV needs a batch of training inputs, but x has no arrays: {x!r}.")
    tensors = [_to_tensor(leaf) for leaf in leaves]
    sizes = {int(t.shape[0]) if len(t.shape) else None for t in tensors}
    if None in sizes:
        raise ValueError("Every input of the LSUV batch needs a batch dimension; got a scalar.")
    if len(sizes) > 1:
        raise ValueError(f"The inputs of the LSUV batch have different batch sizes: {sorted(sizes)}.")
    if sizes == {0}:
        raise ValueError("The LSUV batch is empty (0 samples).")
    for tensor in tensors:
        if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(tensor)))):
            raise ValueError("The LSUV batch contains NaN or Inf values; LSUV needs finite training data.")
    batch = keras.tree.pack_sequence_as(x, tensors)
    _check_against_model_inputs(model, batch)
    return batch


def first_sample(batch: Any) -> Any:
    """The first sample of every input, keeping the batch dimension (for building a model)."""
    return keras.tree.map_structure(lambda t: t[:1], batch)


def _to_tensor(leaf: Any) -> Any:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    dtype = keras.backend.standardize_dtype(leaf.dtype) if not isinstance(leaf, np.ndarray) else leaf.dtype.name
    if isinstance(leaf, np.ndarray) and leaf.dtype.kind not in "biuf":
        raise ValueError(f"The LSUV batch must be numeric; got an array of dtype {leaf.dtype}.")
    if "float" not in dtype and "int" not in dtype and dtype != "bool":
        raise ValueError(f"The LSUV batch must be numeric; got a tensor of dtype {dtype}.")
    return ops.convert_to_tensor(leaf)


def _check_against_model_inputs(model: keras.Model, batch: Any) -> None:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        return  # subclassed or unbuilt: the model's call checks its own inputs
    if isinstance(batch, dict):
        declared = model.input  # a dict when the model was built from a dict of inputs
        expected = list(declared) if isinstance(declared, dict) else [t.name for t in inputs]
        missing = [name for name in expected if name not in batch]
        if missing:
            raise ValueError(f"The LSUV batch is missing the model input(s) {missing}; got keys {sorted(batch)}.")
        leaves = [batch[name] for name in expected]
        inputs = [declared[name] for name in expected] if isinstance(declared, dict) else inputs
    else:
        leaves = keras.tree.flatten(batch)
    if len(leaves) != len(inputs):
        raise ValueError(f"The model has {len(inputs)} input(s) but the LSUV batch has {len(leaves)} array(s).")
    for leaf, symbolic in zip(leaves, inputs, strict=True):
        expected, got = tuple(symbolic.shape[1:]), tuple(leaf.shape[1:])
        if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got, strict=True)):
            raise ValueError(
                f"The LSUV batch does not match the model's input '{symbolic.name}': expected samples of "
                f"shape {expected}, got {got}."
            )
