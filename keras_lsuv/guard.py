"""Whether a model already holds trained weights, so that LSUV does not wipe them.

Two signals, both read from the model itself:

- the optimizer's step count: training in this process, or a `.keras` file
  loaded with its optimizer state;
- the weights: a trainable layer whose bias (or normalization `beta`,
  `gamma`, moving mean or variance) was initialized to a constant no longer
  holds that constant. Fresh Keras layers start with zero biases and unit
  `gamma`; training moves them at the first step, and `load_weights` or
  `load_model(compile=False)` of a trained checkpoint brings the moved values
  back. LSUV itself only rescales kernels, so a model LSUV initialized still
  looks fresh.

What they cannot see: a model with no such weight (no biases, no
normalization, or only random bias initializers), weights set by hand, and
frozen layers (a frozen pretrained backbone does not count, so LSUV still
initializes the new layers around it).
"""

from __future__ import annotations

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
    """Names a weight that has moved from the constant its layer initialized it to, or returns `None`.

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
        if not np.all(values == np.asarray(constant, dtype=values.dtype)):  # the constant as the variable holds it
            difference = float(np.max(np.abs(values.astype("float64") - constant)))
            return (
                f"layer '{layer.name}' has a {name} that is no longer its initial {constant:g} "
                f"(max |difference| {difference:.3g})"
            )
    return None


def _constant_weights(model: keras.Model) -> Iterator[tuple[keras.layers.Layer, str, float]]:
    # `_flatten_layers` reaches the sub-layers of composite layers too (targets.py walks them the same way).
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if not layer.trainable:
            continue
        # The layer's own weights, not `isinstance(w, keras.Variable)`: before Keras 3.7 that class is not the
        # backend variables' base.
        own = {id(w) for w in layer.weights}
        for name, initializer_name in CONSTANT_WEIGHTS:
            weight = getattr(layer, name, None)
            constant = _constant_of(getattr(layer, initializer_name, None))
            if id(weight) in own and constant is not None:
                yield layer, name, constant


def _constant_of(initializer: object) -> float | None:
    if isinstance(initializer, keras.initializers.Zeros):
        return 0.0
    if isinstance(initializer, keras.initializers.Ones):
        return 1.0
    if isinstance(initializer, keras.initializers.Constant) and np.ndim(initializer.value) == 0:
        return float(initializer.value)
    return None
