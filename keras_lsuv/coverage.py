"""What LSUV did not reach: the model's trainable weights of rank 2 or more that no record covers, by layer.

A weight is covered when LSUV measured and scaled it (the kernels of a target it measured, converged or not), or
left it alone on purpose: the kernel of a deliberate start (`targets.is_deliberate_start`: skipped with that reason
by default, or left out by a `targets=` built on `default_targets`); frozen weights are not trainable, so never
listed. A target skipped for any other reason (not reached by the forward pass, never built, LoRA, quantized) does
not cover its weights.

Kernel-like weights are the trainable weights of rank 2 or more but tables and biases: the weights of `Embedding`
layers, the weights whose path names an embedding (`"embed"` in it: token, position, class and prompt embeddings of
layers written elsewhere) and the weights `targets.is_kernel_weight` says are no map: a name that says they are a
table or an added vector (`bias`, as `EinsumDense`'s `(heads, dim)` one, `token`, `table`, `pos`), or one input
alone (a class token `(1, 1, dim)`). A table is a lookup and a bias an added vector, not a linear map of the layer's
input: they are listed, but the coverage figure and the warning count kernel-like weights only. A measured target
covers its bias too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras

from keras_lsuv.report import LayerRecord, UncoveredLayer
from keras_lsuv.targets import (
    EMBEDDINGS,
    TARGET_CLASSES,
    Target,
    has_keras_call,
    holds_targets,
    is_deliberate_start,
    is_kernel_layer,
    is_kernel_weight,
    is_recurrent,
    own_kernels,
)

NOT_A_TARGET_KIND = "not a layer LSUV initializes"
NOT_CHOSEN = "not chosen as a target (targets= can choose it)"
NOT_A_SCALED_KERNEL = "not a kernel LSUV scales"
HOLDS_TARGETS = "a kernel of a layer whose sub-layers are targets: they are measured, not the layer as a whole"


def find_uncovered(model: keras.Model, records: Mapping[Target, LayerRecord]) -> tuple[list[UncoveredLayer], float]:
    """The layers whose weights LSUV did not reach, and the share of the kernel-like parameters it reached.

    Example:

    >>> model = keras.Sequential([keras.Input((5, 4)), keras.layers.LSTM(8), keras.layers.Dense(2)])
    >>> report = keras_lsuv.lsuv_init(model, x, verbose=0)  # calls find_uncovered: the Dense alone is reached
    >>> report.uncovered[0].class_name, report.uncovered[0].kernel_parameters, report.coverage
    ('LSTMCell', 384, 0.04)

    Args:
        model: The model LSUV ran on, built.
        records: The run's records, keyed by their targets (as the engines return them).

    Returns:
        One `UncoveredLayer` per layer holding weights not reached, in the order of Keras's walk over the model's
        layers, and `LSUVReport.coverage`: the kernel-like parameters covered over all kernel-like parameters (1.0
        where the model has none).
    """
    walk = list(model._flatten_layers(include_self=True, recursive=True))  # as targets.py walks (Keras's own walk)
    measured = [target for target, record in records.items() if not record.skipped]
    kept = [Target(layer) for layer in walk if is_deliberate_start(layer) and layer.built]
    covered = {id(kernel) for target in measured + kept for kernel in target.kernels}
    covered |= {id(target.layer.bias) for target in measured if target.has_bias}
    by_layer = {id(target.layer): record for target, record in records.items()}
    # A recurrent layer's weights are its cell's: the cell is listed, with its layer's reason.
    chosen_as = {id(layer.cell): layer for layer in walk if is_recurrent(layer)}
    # The walk lists a layer before its sub-layers: reversed, the innermost layer holding a weight comes first.
    owner: dict[int, keras.layers.Layer] = {}
    for layer in reversed(walk):
        for weight in layer.trainable_weights:
            owner.setdefault(id(weight), layer)
    total = sum(math.prod(weight.shape) for weight in _unique(model.weights))
    found: dict[int, UncoveredLayer] = {}
    kernel_like = reached = 0
    for weight in _unique(model.trainable_weights):
        if len(weight.shape) < 2:
            continue
        layer = owner.get(id(weight), model)
        size = math.prod(weight.shape)
        counted = 0 if _is_table_or_bias(layer, weight) else size
        kernel_like += counted
        if id(weight) in covered:
            reached += counted
            continue
        entry = found.setdefault(
            id(layer),
            UncoveredLayer(
                layer.name, type(layer).__name__, reason=_reason(chosen_as.get(id(layer), layer), by_layer), layer=layer
            ),
        )
        entry.weights[_path(weight)] = [int(n) for n in weight.shape]
        entry.parameters += size
        entry.kernel_parameters += counted
    for entry in found.values():
        entry.share = entry.parameters / total if total else 0.0
    order = {id(layer): index for index, layer in enumerate(walk)}
    uncovered = sorted(found.values(), key=lambda entry: order.get(id(entry.layer), -1))
    return uncovered, reached / kernel_like if kernel_like else 1.0


def uncovered_warning(uncovered: list[UncoveredLayer], coverage: float) -> str | None:
    """The warning `lsuv_init` gives when kernel-like weights were not reached, or `None`.

    Layers that `targets=` left out are not in it (that was the caller's choice), nor embedding tables; both stay in
    the report.
    """
    named = [entry for entry in uncovered if entry.kernel_parameters and entry.reason != NOT_CHOSEN]
    if not named:
        return None
    return (
        f"LSUV reached {coverage:.2%} of the model's kernel-like parameters; these keep their initialization: "
        + "; ".join(entry.describe() for entry in named)
        + ". See report.uncovered; report.assert_converged(min_coverage=1.0) fails on them."
    )


def _reason(layer: keras.layers.Layer, records: Mapping[int, LayerRecord]) -> str:
    """Why LSUV did not reach the weights of `layer`."""
    record = records.get(id(layer))
    if record is not None:
        return (record.reason or "") if record.skipped else NOT_A_SCALED_KERNEL
    if isinstance(layer, TARGET_CLASSES + EMBEDDINGS) or is_kernel_layer(layer) or is_recurrent(layer):
        return NOT_CHOSEN
    custom = not has_keras_call(layer)
    return HOLDS_TARGETS if custom and own_kernels(layer) and holds_targets(layer) else NOT_A_TARGET_KIND


def _is_table_or_bias(layer: keras.layers.Layer, weight: keras.Variable) -> bool:
    """Whether `weight` of `layer` is no kernel: an embedding table or a bias (see the module's docstring)."""
    return isinstance(layer, EMBEDDINGS) or "embed" in _path(weight).lower() or not is_kernel_weight(weight)


def _path(weight: keras.Variable) -> str:
    return str(getattr(weight, "path", weight.name))


def _unique(weights: list[keras.Variable]) -> list[keras.Variable]:
    return list({id(weight): weight for weight in weights}.values())
