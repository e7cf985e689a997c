"""The sub-model engine: the design card taken literally, kept as the slow reference.

For each target layer of a Functional or Sequential model, in topological order, a sub-model from the model's
inputs to that layer's output is built and re-run after every rescale, so the cost grows with depth squared.
Nested models are entered with their inputs computed once by the outer prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from keras_lsuv.centering import channel_groups, find_centered_scale
from keras_lsuv.inference import inference_mode
from keras_lsuv.interception import intercepted_calls
from keras_lsuv.options import LSUVOptions
from keras_lsuv.report import LayerRecord, MergeRecord
from keras_lsuv.rescale import ScaleLimit, find_scale, float32_copy, write_kernel
from keras_lsuv.residual import Merge
from keras_lsuv.statistics import Moments, moments, variance
from keras_lsuv.targets import Target, targets_inside


def run_submodel(
    model: keras.Model,
    batch: Any,
    targets: list[Target],
    options: LSUVOptions,
    on_record: Callable[[LayerRecord], None],
    merges: dict[Merge, MergeRecord | None] | None = None,
) -> dict[Target, LayerRecord]:
    """Rescales every target by re-running the sub-model that ends at it; returns records in topological order.

    It does not solve merges (`LSUVOptions` rejects `residual=` with this engine), so `merges` stays as it is.
    """
    _check_is_graph(model, "the model")
    by_layer = {id(t.layer): t for t in targets}
    records: dict[Target, LayerRecord] = {}

    def visit(graph: keras.Model, graph_batch: Any) -> None:
        for layer in graph.layers:
            if isinstance(layer, keras.Model):
                _check_is_graph(layer, f"the nested model '{layer.name}'")
                # `Operation.input` is the tensor the nested model was called on in `graph` (node 0);
                # `Functional.input` would give the nested model's own Input instead.
                prefix = keras.Model(graph.inputs, keras.Operation.input.fget(layer))
                visit(layer, prefix(graph_batch, training=False))
            elif id(layer) in by_layer and (calls := _calls_in(graph, layer)) > 1:
                raise ValueError(
                    f"engine='submodel' measures a layer at one of its calls, but layer '{layer.name}' is called "
                    f"{calls} times: LSUV measures over all of them. Use engine='single_pass'."
                )
            elif id(layer) in by_layer:
                target = by_layer.pop(id(layer))
                record = records[target] = _rescale_with_submodel(target, graph, graph_batch, options)
                if not record.skipped:
                    on_record(record)
            elif inside := targets_inside(layer, targets):
                inner = inside[0].layer
                raise ValueError(
                    f"engine='submodel' cannot reach layer '{inner.name}' inside '{layer.name}' "
                    f"({type(layer).__name__}): it is not a node of a Functional graph. Use engine='single_pass'."
                )

    with inference_mode():
        visit(model, batch)
    return records | {target: target.skipped_record() for target in by_layer.values()}


def _calls_in(graph: keras.Model, layer: keras.layers.Layer) -> int:
    """How many nodes (calls) of `layer` the graph has. Keras keeps them in private attributes only: a layer's
    `_inbound_nodes` also holds nodes of other graphs (a Sequential re-creates its graph on every `add`)."""
    graph = getattr(graph, "_functional", graph)  # a Sequential's graph is the Functional it keeps
    nodes = {id(node) for depth_nodes in graph._nodes_by_depth.values() for node in depth_nodes}
    return sum(id(node) in nodes for node in layer._inbound_nodes)


def _check_is_graph(model: keras.Model, what: str) -> None:
    if not getattr(model, "inputs", None):
        raise ValueError(
            f"engine='submodel' needs Functional or Sequential models, but {what} ({type(model).__name__}) "
            "is subclassed: it has no graph to cut sub-models from. Use engine='single_pass'."
        )


def _rescale_with_submodel(target: Target, graph: keras.Model, graph_batch: Any, options: LSUVOptions) -> LayerRecord:
    layer = target.layer
    if target.skip_reason:
        return target.skipped_record()
    if reason := target.unmeasurable(layer.output):  # back to its kernels before step 1, for the layers after it
        target.restore_weights()
        return target.skipped_record(reason)
    submodel = keras.Model(graph.inputs, layer.output)
    kernel = target.scaled_kernel
    original = float32_copy(kernel)
    # The layer's inputs, for what `Target.measured` leaves out (the padding of an embedding with `mask_zero`).
    inputs = (keras.Model(graph.inputs, layer.input)(graph_batch, training=False),) if target.is_embedding else ()

    calls = _calls_of(layer, submodel, graph_batch) if target.is_recurrent else []

    def variance_at(scale: float) -> float:
        write_kernel(kernel, original, scale)
        if calls:  # a recurrent layer: its input projection over every step of its calls
            return variance(ops.concatenate([target.input_projection(*call) for call in calls]))
        with target.activation_removed() as activation:
            z = submodel(graph_batch, training=False)
        return variance(target.measured(options.measure.of(z, activation), inputs, {}))

    def measure_at(scale: float) -> Moments:  # center=True: the pre-activation's moments per channel
        write_kernel(kernel, original, scale)
        if calls:
            return moments(ops.concatenate([target.input_projection(*call) for call in calls]))
        with target.activation_removed():
            z = submodel(graph_batch, training=False)
        return moments(target.measured(z, inputs, {}), channel_groups(target, z))

    limit = ScaleLimit.of(kernel, original, layer, 0.0)
    if options.center:
        record = find_centered_scale(target, measure_at, options.criterion, limit)
    else:
        record = find_scale(target, variance_at, options.criterion, limit)
    write_kernel(kernel, original, record.scale)
    return record


def _calls_of(layer: keras.layers.Layer, submodel: keras.Model, batch: Any) -> list[tuple[Any, Any]]:
    """The arguments of every call of `layer` when `submodel` runs `batch` (the mask Keras passes included)."""
    calls: list[tuple[Any, Any]] = []

    def make_call(_: Any, call: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            calls.append((args, kwargs))
            return call(*args, **kwargs)

        return recorded

    with intercepted_calls([layer], make_call), inference_mode():
        submodel(batch, training=False)
    return calls
