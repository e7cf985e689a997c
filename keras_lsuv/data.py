"""Turning what the user passes as `x` into one checked batch for the model."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

DEFAULT_NUM_SAMPLES = 256


def prepare_batch(model: keras.Model, x: Any, num_samples: int = DEFAULT_NUM_SAMPLES) -> Any:
    """Draws up to `num_samples` samples from `x`, checks them and converts them to backend tensors.

    Args:
        model: The model the batch is for; when it has symbolic inputs, the
            structure and shapes of the batch are checked against them.
        x: What `fit` would take as training data. Arrays: a NumPy array or
            backend tensor, or a list, tuple or dict of them for a model with
            several inputs; the first `num_samples` samples are used.
            Iterables: a `tf.data.Dataset`, a `keras.utils.PyDataset`, a
            Python generator or iterator, a torch `DataLoader`; batches are
            taken until `num_samples` samples are collected. Their elements may
            be `x`, `(x, y)` or `(x, y, sample_weight)`; only `x` is used.
        num_samples: How many samples to use at most.

    Returns:
        The batch, with the structure of the inputs in `x`.

    Raises:
        ValueError: If `x` yields nothing, is not numeric, not finite, has
            inputs with different batch sizes, or does not match the model.
    """
    batch = draw_samples(x, num_samples)
    leaves = keras.tree.flatten(batch)
    tensors = [_to_tensor(leaf) for leaf in leaves]
    if any(len(t.shape) == 0 for t in tensors):
        raise ValueError("Every input of the LSUV batch needs a batch dimension; got a scalar.")
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) > 1:
        raise ValueError(f"The inputs of the LSUV batch have different batch sizes: {sorted(sizes)}.")
    if sizes == {0}:
        raise ValueError("The LSUV batch is empty (0 samples).")
    for tensor in tensors:
        if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(tensor)))):
            raise ValueError("The LSUV batch contains NaN or Inf values; LSUV needs finite training data.")
    batch = keras.tree.pack_sequence_as(batch, tensors)
    _check_against_model_inputs(model, batch)
    return batch


def draw_samples(x: Any, num_samples: int) -> Any:
    """The first `num_samples` input samples of `x` (arrays are sliced, iterables read batch by batch)."""
    if x is None:
        raise ValueError("LSUV needs training inputs, but x is None.")
    leaves = keras.tree.flatten(x)
    if not leaves:
        raise ValueError(f"LSUV needs training inputs, but x holds no arrays: {x!r}.")
    if all(_is_array(leaf) for leaf in leaves):
        return keras.tree.map_structure(lambda array: array[:num_samples], x)
    if isinstance(x, (list, tuple, dict)):
        kinds = sorted({type(leaf).__name__ for leaf in leaves if not _is_array(leaf)})
        raise ValueError(f"The inputs given to LSUV must be NumPy arrays or backend tensors; got {kinds}.")
    if not hasattr(x, "__iter__") and not hasattr(x, "__next__"):
        raise ValueError(
            f"LSUV cannot read samples from a {type(x).__name__}: pass arrays, a tf.data.Dataset, a "
            "keras.utils.PyDataset, a generator or a torch DataLoader."
        )
    parts, count = [], 0
    for element in x:
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(element)
        inputs = keras.tree.map_structure(_to_numpy, inputs)
        parts.append(inputs)
        count += len(keras.tree.flatten(inputs)[0])
        if count >= num_samples:
            break
    if not parts:
        raise ValueError(f"The {type(x).__name__} given to LSUV yielded no batch: it is empty or exhausted.")
    try:
        return keras.tree.map_structure(lambda *arrays: np.concatenate(arrays)[:num_samples], *parts)
    except (ValueError, TypeError) as error:
        raise ValueError(f"The batches of the {type(x).__name__} given to LSUV do not fit together: {error}") from error


def first_sample(batch: Any) -> Any:
    """The first sample of every input, keeping the batch dimension (for building a model)."""
    return keras.tree.map_structure(lambda t: t[:1], batch)


def _is_array(leaf: Any) -> bool:
    # NumPy arrays and tensors of any framework (a tf.Tensor under JAX, say); datasets and loaders have no shape.
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def _to_numpy(leaf: Any) -> np.ndarray:
    return ops.convert_to_numpy(leaf) if ops.is_tensor(leaf) else np.asarray(leaf)


def _to_tensor(leaf: Any) -> Any:
    if isinstance(leaf, np.ndarray):
        numeric = leaf.dtype.kind in "biuf"
    else:
        numeric = any(kind in keras.backend.standardize_dtype(leaf.dtype) for kind in ("float", "int", "bool"))
    if not numeric:
        raise ValueError(f"The LSUV batch must be numeric; got data of dtype {leaf.dtype}.")
    return ops.convert_to_tensor(leaf)


def _check_against_model_inputs(model: keras.Model, batch: Any) -> None:
    # An unbuilt Sequential has no inputs (AttributeError, or ValueError before Keras 3.7).
    inputs = getattr(model, "inputs", None) if model.built else None
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
        shape, got = tuple(symbolic.shape[1:]), tuple(leaf.shape[1:])
        if len(shape) != len(got) or any(e is not None and e != g for e, g in zip(shape, got, strict=True)):
            raise ValueError(
                f"The LSUV batch does not match the model's input '{symbolic.name}': expected samples of "
                f"shape {shape}, got {got}."
            )
