"""Whether a model already holds trained weights, so that LSUV does not wipe them.

Two signals, both read from the model itself:

- the optimizer's step count: training in this process, or a `.keras` file
  loaded with its optimizer state;
- the weights: a trainable layer whose bias (or normalization `beta`,
  `gamma`, `scale`, moving mean or variance) was initialized to a constant no
  longer holds what its layer's build gave it. Fresh Keras layers start with
  zero biases and unit `gamma`; training moves them at the first step, and
  `load_weights` or `load_model(compile=False)` of a trained checkpoint brings
  the moved values back. LSUV itself rescales kernels, so a model LSUV
  initialized still looks fresh; a bias LSUV centered (`center=True`) is
  noted here (`note_lsuv_bias`, in this process, by the layer object) and
  looks fresh while it holds what LSUV set, trained once it moves from it.

A fresh weight holds what its layer's build gives it: for Keras's own layers,
the initializer's constant, with ones for the forget gate of an LSTM or
ConvLSTM cell (`unit_forget_bias=True`, Keras's default). A layer from
elsewhere (a custom layer, a Keras layer subclassed) may build the weight
otherwise: where its weight does not hold the constant, it is compared with
what a fresh copy of the layer, rebuilt from its config and build shapes,
holds, and only a weight that differs from both counts as moved. A model of
Keras layers rebuilds nothing, fresh or trained.

What they cannot see: a model with no such weight (no biases, no
normalization, or only random bias initializers), weights set by hand, and
frozen layers (a frozen pretrained backbone does not count, so LSUV still
initializes the new layers around it). A layer from elsewhere that builds a
weight otherwise and does not rebuild from its config is judged by the
constant alone, so it looks trained.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Iterator

import keras
import numpy as np
from keras import ops

# Weights that layers initialize to a constant, with the attribute holding that initializer.
CONSTANT_WEIGHTS = (
    ("bias", "bias_initializer"),
    ("beta", "beta_initializer"),
    ("gamma", "gamma_initializer"),
    ("moving_mean", "moving_mean_initializer"),
    ("moving_variance", "moving_variance_initializer"),
)
# Keras layers whose build gives a weight a constant without keeping its initializer in an attribute:
# (name in `keras.layers`, weight, constant). RMSNormalization is in Keras 3.9 and later.
BUILT_CONSTANTS = (("RMSNormalization", "scale", 1.0),)
# The bias values LSUV's centering wrote, by layer (weakly: a layer that is gone takes its entry with it).
_LSUV_BIASES: weakref.WeakKeyDictionary[keras.layers.Layer, np.ndarray] = weakref.WeakKeyDictionary()


def note_lsuv_bias(layer: keras.layers.Layer, values: np.ndarray) -> None:
    """Notes the bias LSUV's centering gave `layer`, so that the guard takes it for a fresh one while it holds it.

    Args:
        layer: The layer whose `bias` was set.
        values: The values as the variable holds them (its shape and dtype).
    """
    _LSUV_BIASES[layer] = np.array(values)


def training_evidence(model: keras.Model) -> str | None:
    """Why `model` looks trained (optimizer steps first, then moved weights), or `None` when it looks fresh.

    Example:

    >>> training_evidence(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])) is None
    True

    Args:
        model: A Keras model, built or not.

    Returns:
        A reason that completes "LSUV skipped: ...".
    """
    if steps := optimizer_steps_evidence(model):
        return steps
    moved = trained_weights_evidence(model)
    return f"the model's weights look already trained: {moved}" if moved else None


def skipped_reason(evidence: str) -> str:
    """The report's and the warning's reason for skipping a model, from `training_evidence`'s (or part of it)."""
    return f"{evidence}; nothing was changed. Pass force=True to re-initialize it."


def optimizer_steps_evidence(model: keras.Model) -> str | None:
    """Says how many steps the model's optimizer has taken, or returns `None` (no optimizer, or no step yet)."""
    optimizer = getattr(model, "optimizer", None)
    steps = 0 if optimizer is None else int(ops.convert_to_numpy(optimizer.iterations))
    return f"the model has already been trained ({steps} optimizer steps)" if steps else None


def trained_weights_evidence(model: keras.Model) -> str | None:
    """Names a weight that has moved from what its layer's build initialized it to, or returns `None`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> trained_weights_evidence(model) is None
    True
    >>> model.layers[0].bias.assign([0.5, 0.0])
    >>> trained_weights_evidence(model)
    "layer 'dense' has a bias that is no longer its initial 0 (max |difference| 0.5)"

    Args:
        model: A Keras model, built or not (an unbuilt model has no weights and no evidence).

    Returns:
        A short description of the first moved weight, for warnings.
    """
    for layer, name, constant in _constant_weights(model):
        values = ops.convert_to_numpy(getattr(layer, name))
        initial = _as_keras_builds(layer, name, constant, values)
        if np.all(values == initial):
            continue
        noted = _LSUV_BIASES.get(layer) if name == "bias" else None
        if noted is not None and noted.shape == values.shape and np.all(values == noted):
            continue  # as LSUV centered it: not trained
        if not _is_from_keras(layer):  # another layer's build may give the weight something else: ask a copy
            built = _freshly_built(layer, name, values.shape)
            if built is not None:
                if np.all(values == built):
                    continue
                initial = built
        description = f"its initial {constant:g}" if np.all(initial == constant) else "the initial value its build sets"
        difference = float(np.max(np.abs(values.astype("float64") - initial.astype("float64"))))
        return f"layer '{layer.name}' has a {name} that is no longer {description} (max |difference| {difference:.3g})"
    return None


def _constant_weights(model: keras.Model) -> Iterator[tuple[keras.layers.Layer, str, float]]:
    built_constants = [
        (getattr(keras.layers, layer_class), name, constant)
        for layer_class, name, constant in BUILT_CONSTANTS
        if hasattr(keras.layers, layer_class)
    ]
    # `_flatten_layers` reaches the sub-layers of composite layers too (targets.py walks them the same way).
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if not layer.trainable:
            continue
        # The layer's own weights, not `isinstance(w, keras.Variable)`: before Keras 3.7 that class is not the
        # backend variables' base.
        own = {id(w) for w in layer.weights}
        candidates = [(name, _constant_of(getattr(layer, initializer, None))) for name, initializer in CONSTANT_WEIGHTS]
        candidates += [(name, constant) for cls, name, constant in built_constants if isinstance(layer, cls)]
        for name, constant in candidates:
            if id(getattr(layer, name, None)) in own and constant is not None:
                yield layer, name, constant


def _constant_of(initializer: object) -> float | None:
    if isinstance(initializer, keras.initializers.Zeros):
        return 0.0
    if isinstance(initializer, keras.initializers.Ones):
        return 1.0
    if isinstance(initializer, keras.initializers.Constant) and np.ndim(initializer.value) == 0:
        return float(initializer.value)
    return None


def _as_keras_builds(layer: keras.layers.Layer, name: str, constant: float, like: np.ndarray) -> np.ndarray:
    """What Keras's own build of `layer` gives its weight `name`, shaped and typed `like`.

    That is the initializer's constant, with ones for the forget gate where `unit_forget_bias` is set (LSTM and
    ConvLSTM cells: their bias holds the input, forget, cell and output gates' biases, in that order).
    """
    initial = np.full(like.shape, constant, dtype=like.dtype)
    if name == "bias" and getattr(layer, "unit_forget_bias", False) and like.ndim == 1 and like.shape[0] % 4 == 0:
        units = like.shape[0] // 4
        initial[units : 2 * units] = 1
    return initial


def _is_from_keras(layer: keras.layers.Layer) -> bool:
    # Keras's own layers are known exactly (`_as_keras_builds`; tests/test_guard.py checks every one) and are never
    # rebuilt: besides the build, a layer's `get_config()` imports TensorFlow where it is installed (seconds, on the
    # JAX and torch backends too), which a fresh LSTM model's first LSUV call would pay.
    return type(layer).__module__.split(".")[0] == "keras"


def _freshly_built(layer: keras.layers.Layer, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The values of weight `name` in a new copy of `layer`, built with the shapes `layer` was built with.

    A layer's `get_config()` and `get_build_config()` are what `keras.saving` rebuilds it from, so the copy gives
    the weight what the layer's build gave it; `layer` itself is only read. Only the compared weights' initializers
    are kept: the others (kernels) become zeros, an allocation instead of a random draw (an orthogonal kernel of
    1024 units takes seconds). A weight whose build depends on another initializer then differs from the copy's and
    counts as moved: the guard errs towards a warning, never towards wiping weights. Only layers from outside Keras
    whose weight does not hold its constant pay this.

    Returns:
        The values, or `None` where the layer does not rebuild (a config that lacks an argument of its class) or
        the copy's weight has another shape: the caller then falls back to the initializer's constant alone, so the
        weight counts as moved.
    """
    kept = {initializer for _, initializer in CONSTANT_WEIGHTS}
    zeros = keras.initializers.serialize(keras.initializers.Zeros())
    # Building a layer draws default seeds (of unseeded initializers and SeedGenerators) from Python's `random`,
    # which `keras.utils.set_random_seed` seeds: its state is put back, so that the check does not change what the
    # user's code draws next.
    state = random.getstate()
    try:
        config = {
            key: zeros if key.endswith("_initializer") and key not in kept and value is not None else value
            for key, value in layer.get_config().items()
        }
        fresh = type(layer).from_config(config)
        fresh.build_from_config(layer.get_build_config())
        values = np.asarray(ops.convert_to_numpy(getattr(fresh, name)))
    except Exception:  # whatever a layer's config, class or build raises, it just does not rebuild
        return None
    finally:
        random.setstate(state)
    return values if values.shape == shape else None
