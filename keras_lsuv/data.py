"""Turning what the user passes as `x` into one checked batch for the model."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

DEFAULT_NUM_SAMPLES = 256
# Reading an iterable stops with an error after this many empty batches in a row (a source that never yields data).
MAX_EMPTY_BATCHES = 100
_UNBATCHED_HINT = (
    "x looks unbatched (call .batch(n) on a tf.data.Dataset, give a torch DataLoader a batch_size or a "
    "batch_sampler, add a batch axis to a single sample)."
)


def prepare_batch(model: keras.Model, x: Any, num_samples: int = DEFAULT_NUM_SAMPLES) -> Any:
    """Draws up to `num_samples` samples from `x`, checks them and converts them to backend tensors.

    Example:

    >>> batch = prepare_batch(model, pandas_frame, num_samples=64)  # 64 rows, as a float32 tensor

    Args:
        model: The model the batch is for; when it has symbolic inputs, the
            structure and shapes of the batch are checked against them.
        x: What `fit` would take as training data. Arrays: a NumPy array
            (ml_dtypes floats such as bfloat16 included), a backend tensor, a
            pandas `DataFrame` or `Series`, a SciPy sparse matrix or a
            `tf.SparseTensor` (densified), a `tf.RaggedTensor` for a model whose
            input is ragged, or lists, tuples and dicts of them, nested as the
            model's inputs are; the first `num_samples` samples are used.
            Iterables: a `tf.data.Dataset`, a `keras.utils.PyDataset`, a
            Python generator or iterator, a torch `DataLoader`; batches are
            taken until `num_samples` samples are collected. Their elements may
            be `x`, `(x, y)` or `(x, y, sample_weight)`; only `x` is used.
        num_samples: How many samples to use at most.

    Returns:
        The batch, with the structure of the model's inputs.

    Raises:
        ValueError: If `x` is not data (a str, a symbolic tensor), yields
            nothing or only empty batches, is unbatched, not numeric, not
            finite, has inputs with different numbers of samples, or does not
            match the model.
    """
    batch = draw_samples(x, num_samples)
    leaves = keras.tree.flatten(batch)
    tensors = [_to_tensor(leaf) for leaf in leaves]
    if any(len(t.shape) == 0 for t in tensors):
        raise ValueError(f"Every input of the LSUV batch needs a batch dimension; got a scalar. {_UNBATCHED_HINT}")
    if int(tensors[0].shape[0]) == 0:  # every input has as many samples (`draw_samples` checks)
        raise ValueError("The LSUV batch is empty (0 samples).")
    for leaf, tensor in zip(leaves, tensors, strict=True):
        if not _is_finite(leaf, tensor):
            raise ValueError("The LSUV batch contains NaN or Inf values; LSUV needs finite training data.")
    batch = keras.tree.pack_sequence_as(batch, tensors)
    return _match_model_inputs(model, batch)


def draw_samples(x: Any, num_samples: int) -> Any:
    """The first `num_samples` input samples of `x` (arrays are sliced, iterables read batch by batch)."""
    check_is_data(x)
    leaves = keras.tree.flatten(x)
    if not leaves:
        raise ValueError(f"LSUV needs training inputs, but x holds no arrays: {x!r}.")
    for leaf in leaves:
        if leaf is not None:  # a None entry is reported below with the other non-arrays
            check_is_data(leaf, what="an entry of x")
    if all(_is_array(leaf) for leaf in leaves):
        _check_same_rows(leaves, "The arrays in x")  # before slicing, which would hide a difference
        return keras.tree.map_structure(lambda array: _first_rows(array, num_samples), x)
    if isinstance(x, (list, tuple, dict)):
        kinds = sorted({type(leaf).__name__ for leaf in leaves if not _is_array(leaf)})
        raise ValueError(f"The inputs given to LSUV must be arrays or tensors; got {kinds}.")
    if not hasattr(x, "__iter__") and not hasattr(x, "__next__"):
        raise ValueError(
            f"LSUV cannot read samples from a {type(x).__name__}: pass arrays, a tf.data.Dataset, a "
            "keras.utils.PyDataset, a generator or a torch DataLoader."
        )
    # A torch DataLoader with batch_size=None yields its dataset's items as they are, which may be batches already
    # (`fit` takes them): what it yields tells, as for any other iterable.
    return _read_iterable(x, num_samples)


def _read_iterable(x: Any, num_samples: int) -> Any:
    name = type(x).__name__
    parts, count, empty_in_a_row = [], 0, 0
    for element in x:
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(element)
        leaves = keras.tree.flatten(inputs)
        if not leaves or not all(_is_array(leaf) for leaf in leaves):
            kinds = sorted({type(leaf).__name__ for leaf in leaves})
            raise ValueError(
                f"The {name} given to LSUV yields {kinds or 'nothing'}, not batches of arrays: each element must "
                "be x, (x, y) or (x, y, sample_weight) with arrays that have a batch dimension."
            )
        if any(len(leaf.shape) == 0 for leaf in leaves):
            raise ValueError(f"The {name} given to LSUV yields scalars, not batches: {_UNBATCHED_HINT}")
        rows = _check_same_rows(leaves, f"The inputs of a batch of the {name} given to LSUV")
        empty_in_a_row = empty_in_a_row + 1 if rows == 0 else 0
        if empty_in_a_row >= MAX_EMPTY_BATCHES:
            raise ValueError(f"The {name} given to LSUV yielded {MAX_EMPTY_BATCHES} empty batches in a row.")
        if rows:
            parts.append(keras.tree.map_structure(lambda leaf: _to_host(_first_rows(leaf, num_samples)), inputs))
            count += rows
        if count >= num_samples:
            break
    if not parts:
        raise ValueError(f"The {name} given to LSUV yielded no batch: it is empty or exhausted.")
    try:
        return keras.tree.map_structure(lambda *arrays: _concatenate(arrays)[:num_samples], *parts)
    except (ValueError, TypeError) as error:
        raise ValueError(f"The batches of the {name} given to LSUV do not fit together: {error}") from error


def _concatenate(arrays: tuple[Any, ...]) -> Any:
    if any(_is_ragged(array) for array in arrays):
        # Ragged batches (a tf.data.Dataset of ragged tensors) are TensorFlow's own; Keras has no ragged ops.
        import tensorflow as tf

        try:
            return tf.concat(list(arrays), axis=0)
        except tf.errors.InvalidArgumentError as error:
            raise ValueError(error.message) from error
    return np.concatenate(arrays)


def _check_same_rows(leaves: list[Any], what: str) -> int:
    """The number of samples (rows) the arrays `leaves` share; a `ValueError` naming `what` if they differ.

    Scalars have no rows; they are left to the caller's own message.
    """
    rows = sorted({int(leaf.shape[0]) for leaf in leaves if len(leaf.shape)})
    if len(rows) > 1:
        raise ValueError(
            f"{what} have different numbers of samples: {rows}. Every input needs one row per sample, as in fit."
        )
    return rows[0] if rows else 0


def first_sample(batch: Any) -> Any:
    """The first sample of every input, keeping the batch dimension (for building a model)."""
    return keras.tree.map_structure(lambda t: t[:1], batch)


def check_is_data(x: Any, what: str = "x") -> None:
    """Raises a `ValueError` if `x` cannot be training data at all: `None`, text or a symbolic tensor."""
    if x is None:
        raise ValueError(f"LSUV needs training inputs, but {what} is None.")
    if isinstance(x, (str, bytes)):
        raise ValueError(f"{what} is a {type(x).__name__} ({x[:20]!r}); LSUV needs numeric training inputs, not text.")
    if isinstance(x, keras.KerasTensor):
        raise ValueError(
            f"{what} is a symbolic KerasTensor (from keras.Input or a layer's output): LSUV needs concrete "
            "training data, e.g. a NumPy array of real samples."
        )


def _is_array(leaf: Any) -> bool:
    # NumPy arrays, tensors of any framework, pandas objects, SciPy and TF sparse; datasets and loaders have no shape.
    return hasattr(leaf, "shape") and (hasattr(leaf, "dtype") or hasattr(leaf, "dtypes"))


def _is_ragged(leaf: Any) -> bool:
    return type(leaf).__name__ == "RaggedTensor"


def _first_rows(leaf: Any, num_samples: int) -> Any:
    """The first `num_samples` rows of one array: backend tensors and ragged tensors as they are, the rest as NumPy."""
    if len(leaf.shape) == 0:
        return leaf  # rejected with a clear message once the whole batch is known
    if hasattr(leaf, "dtype") and not _is_numeric_dtype(leaf.dtype):
        raise ValueError(f"The LSUV batch must be numeric; got data of dtype {leaf.dtype}.")
    if hasattr(leaf, "dtypes") and hasattr(leaf, "columns"):  # a pandas DataFrame: one dtype per column
        text = {str(column): str(dtype) for column, dtype in leaf.dtypes.items() if not _is_numeric_dtype(dtype)}
        if text:
            raise ValueError(f"The LSUV batch must be numeric; the DataFrame's columns {text} are not.")
    if _is_ragged(leaf) or (ops.is_tensor(leaf) and type(leaf).__name__ != "SparseTensor"):
        return leaf[:num_samples]  # this backend's own dense tensors stay where they are
    # Slice first where that is cheap, so that Keras converts at most `num_samples` rows.
    if isinstance(leaf, np.ndarray):
        leaf = leaf[:num_samples]
    elif hasattr(leaf, "iloc"):  # pandas
        leaf = leaf.iloc[:num_samples]
    elif hasattr(leaf, "tocsr"):  # SciPy sparse (COO cannot be sliced)
        leaf = leaf.tocsr()[:num_samples]
    return _keras_array_to_numpy(leaf, min(num_samples, int(leaf.shape[0])))


def _keras_array_to_numpy(leaf: Any, rows: int) -> np.ndarray:
    """The first `rows` rows of `leaf` as a dense NumPy array, converted the way `fit` converts arrays.

    This is Keras's own array slicing, the one `fit`'s `ArrayDataAdapter`
    uses: pandas objects (a `Series` becomes one feature), SciPy sparse and
    `tf.SparseTensor` (densified), tensors of another framework, and floats
    other than `floatx` (ml_dtypes' bfloat16 included) cast to `floatx`. It is
    private Keras API, used only here; tests/test_data.py pins its behaviour.
    """
    from keras.src.trainers.data_adapters import array_slicing

    try:
        sliceable = array_slicing.convert_to_sliceable(leaf)
    except (ValueError, TypeError) as error:
        raise ValueError(f"LSUV cannot use the {type(leaf).__name__} in x as training data: {error}") from error
    return np.asarray(type(sliceable).convert_to_numpy(sliceable[0:rows]))


def _to_host(leaf: Any) -> Any:
    """`leaf` as a NumPy array; a `tf.RaggedTensor` stays one (only a ragged model input takes it)."""
    if _is_ragged(leaf):
        return leaf
    return ops.convert_to_numpy(leaf) if ops.is_tensor(leaf) else np.asarray(leaf)


def _to_tensor(leaf: Any) -> Any:
    dtype = keras.backend.standardize_dtype(leaf.dtype) if _is_numeric_dtype(leaf.dtype) else None
    if dtype is None:
        raise ValueError(f"The LSUV batch must be numeric; got data of dtype {leaf.dtype}.")
    if _is_ragged(leaf):
        return leaf  # only a ragged model input takes it; _match_model_inputs checks that
    return ops.convert_to_tensor(leaf)


def _is_finite(leaf: Any, tensor: Any) -> bool:
    """Whether every value of an input is finite: checked in NumPy where it came as a NumPy array (a device check
    costs a fresh JAX process two compilations per input shape, ~0.1 s), else on the backend."""
    if isinstance(leaf, np.ndarray):
        return bool(np.all(np.isfinite(leaf)))
    values = tensor.flat_values if _is_ragged(tensor) else tensor
    return bool(ops.convert_to_numpy(ops.all(ops.isfinite(values))))


def _is_numeric_dtype(dtype: Any) -> bool:
    try:
        name = keras.backend.standardize_dtype(dtype)
    except (ValueError, TypeError):
        return False
    return any(kind in name for kind in ("float", "int", "bool"))


def _match_model_inputs(model: keras.Model, batch: Any) -> Any:
    """Checks `batch` against the model's symbolic inputs and gives it their structure (see `_select_inputs`)."""
    # An unbuilt Sequential has no inputs (AttributeError, or ValueError before Keras 3.7).
    inputs = getattr(model, "inputs", None) if model.built else None
    if not inputs:
        for leaf in keras.tree.flatten(batch):
            if _is_ragged(leaf):
                raise ValueError(_ragged_message("the model", "its inputs are not known"))
        return batch  # subclassed or unbuilt: the model's call checks its own inputs
    # A Sequential has one input and no `input` structure (it raises); a Functional model's is the (nested)
    # structure it was built from, which its call flattens as `keras.tree.flatten` does.
    declared = inputs[0] if isinstance(model, keras.Sequential) else model.input
    batch = _select_inputs(batch, declared, "x")
    leaves = keras.tree.flatten(batch)
    if len(leaves) != len(inputs):
        names = keras.tree.map_structure(lambda t: t.name, declared)
        raise ValueError(
            f"The model has {len(inputs)} input(s) but the LSUV batch has {len(leaves)} array(s); the model's "
            f"inputs are {names}."
        )
    for leaf, symbolic in zip(leaves, keras.tree.flatten(declared), strict=True):
        if _is_ragged(leaf) and not getattr(symbolic, "ragged", False):
            raise ValueError(_ragged_message(f"the model's input '{symbolic.name}'", "it is not ragged"))
        shape, got = tuple(symbolic.shape[1:]), tuple(leaf.shape[1:])
        if len(shape) != len(got) or any(e is not None and e != g for e, g in zip(shape, got, strict=True)):
            unbatched = len(got) == len(shape) - 1
            raise ValueError(
                f"The LSUV batch does not match the model's input '{symbolic.name}': expected samples of "
                f"shape {shape}, got {got}."
                + (f" Each sample has one dimension too few: {_UNBATCHED_HINT}" if unbatched else "")
            )
    return batch


def _select_inputs(batch: Any, declared: Any, where: str) -> Any:
    """`batch` arranged as the model's `declared` inputs, at every level of nesting.

    A dict gives the entries of a dict input by key (other keys are left out); a dict for inputs that are not a
    dict gives them by input name, as a Functional model's call does. Lists and tuples are followed entry by
    entry; any other structure is left as it is, for the model's call to flatten (its arrays are counted and
    checked against the inputs afterwards).
    """
    if isinstance(batch, dict):
        if isinstance(declared, dict):
            entries = _entries(batch, list(declared), where)
            return {
                key: _select_inputs(entry, declared[key], f"{where}[{key!r}]")
                for key, entry in zip(declared, entries, strict=True)
            }
        if isinstance(declared, keras.KerasTensor):
            return _entries(batch, [declared.name], where)[0]
        if isinstance(declared, (list, tuple)) and all(isinstance(t, keras.KerasTensor) for t in declared):
            return _entries(batch, [t.name for t in declared], where)
    if isinstance(batch, (list, tuple)) and isinstance(declared, (list, tuple)) and len(batch) == len(declared):
        return [_select_inputs(b, d, f"{where}[{i}]") for i, (b, d) in enumerate(zip(batch, declared, strict=True))]
    return batch


def _entries(batch: dict[Any, Any], keys: list[Any], where: str) -> list[Any]:
    missing = [key for key in keys if key not in batch]
    if missing:
        got = sorted(batch, key=str)
        place = "" if where == "x" else f" in {where}"
        raise ValueError(f"The LSUV batch is missing the model input(s) {missing}{place}; got keys {got}.")
    return [batch[key] for key in keys]


def _ragged_message(where: str, why: str) -> str:
    return (
        f"x holds a tf.RaggedTensor, which {where} cannot take ({why}). Pad it to a dense tensor "
        "(ragged.to_tensor()) or build the model on keras.Input(..., ragged=True)."
    )
