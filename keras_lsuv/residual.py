"""Residual-aware LSUV (`residual="stream"`): the merges of a residual stream, and the branch scale each one needs.

Plain LSUV gives every branch of a residual network unit variance, so a stream that adds a branch per block grows
with depth. With `residual="stream"`, each merge `Add([stream, branch])` of a Functional graph (a `keras.layers.Add`
or an `x + y` between Keras tensors), or of a layer's `call` traced into a graph (`tracing`: `x = x + self.mlp(x)`
inside a subclassed layer), is solved in the same pass as the layers: the last target of each branch (and
everything the branch's output passes through that scales with it) is multiplied by one factor `s >= 0` chosen so
that the merge's output has the target variance. Its variance as a function of `s` is a quadratic known from one
reduction: `var(U + s·S) = var(U) + 2·s·cov(U, S) + s²·var(S)`, where `U` is the sum of the inputs that are not
branches (the stream) and `S` the sum of those that are. A merge already within tolerance of the target at `s = 1`
keeps its branches as they are, as the paper's loop keeps a layer within tolerance (a ConvNeXt branch, whose layer
scale starts at 1e-6, adds nothing measurable to a stream at the target). Where the stream alone already carries the
target (an identity stream with no activation after its merges: ResNet v2, pre-LN transformers), a branch
anti-correlated with the stream may still reach it at a small scale; otherwise no `s > 0` does, and the branch is
scaled to the least variance the merge can have, 0 for a branch uncorrelated with the stream, the way Fixup and
SkipInit start residual branches.

An input of a merge is a branch when it is the output of a target with Keras's own `call` (`Target.
is_linear_in_kernel`: a `call` of its own need not scale with its kernel) through layers that scale with their input
(`f(s·x) = s·f(x)`: `SCALING_LAYERS`, keras.applications' `LayerScale` and `StochasticDepth`, and the classes declared
with `scales_with_input`), each output on that path used by the next layer only. The target's kernel and bias are
both multiplied by `s`, so its pre-activation becomes exactly `s` times what it was and so does the branch; where the
branch passes through a layer scale (a layer whose output is proportional to a weight of its own, `x * gamma`), that
weight is multiplied instead, and the target keeps the variance LSUV gave it. Either way the merge's output at the
scale, `U + s·S`, is the one the model computes, and the pass goes on with it. `MultiHeadAttention` ends with its
output projection, so an attention branch ends at that `EinsumDense` (Keras's own `call` only: a subclass with a
`call` of its own ends no branch).

Besides additions, a merge is a keras.applications `CustomScaleLayer` (InceptionResNetV2's `x + c·branch`, `c` a
constant of the layer): its inputs enter the merge with their coefficients, `U + s·c·S`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import keras
import numpy as np
from keras import layers, ops, tree

from keras_lsuv.report import LayerRecord, MergeRecord
from keras_lsuv.rescale import Criterion, ScaleLimit, float32_copy, variable_dtype, write_kernel
from keras_lsuv.statistics import moments, variance
from keras_lsuv.targets import Target
from keras_lsuv.tracing import TracedCall

STREAM = "stream"
RESIDUAL_MODES = (STREAM,)
# Layers `f` with `f(s·x) = s·f(x)` for every `s >= 0`, through which a branch's scale passes unchanged, in inference
# mode and in training (a dropout's mask multiplies its input). Not `BatchNormalization`: in training (`fit`) it
# divides by the batch's own deviation, which undoes any scale of its input; nor `GaussianNoise` and `AlphaDropout`,
# which add to their input in training.
SCALING_LAYERS: tuple[type[keras.layers.Layer], ...] = (
    layers.Dropout,
    layers.SpatialDropout1D,
    layers.SpatialDropout2D,
    layers.SpatialDropout3D,
    layers.GaussianDropout,
    layers.Identity,
    layers.Reshape,
    layers.Flatten,
    layers.Permute,
    layers.RepeatVector,
    layers.ZeroPadding1D,
    layers.ZeroPadding2D,
    layers.ZeroPadding3D,
    layers.Cropping1D,
    layers.Cropping2D,
    layers.Cropping3D,
    layers.UpSampling1D,
    layers.UpSampling2D,
    layers.UpSampling3D,
    layers.MaxPooling1D,
    layers.MaxPooling2D,
    layers.MaxPooling3D,
    layers.AveragePooling1D,
    layers.AveragePooling2D,
    layers.AveragePooling3D,
    layers.GlobalAveragePooling1D,
    layers.GlobalAveragePooling2D,
    layers.GlobalAveragePooling3D,
    layers.GlobalMaxPooling1D,
    layers.GlobalMaxPooling2D,
    layers.GlobalMaxPooling3D,
    layers.LeakyReLU,
    layers.PReLU,
    layers.Activation,
    layers.ReLU,
)
# Activations `a` with `a(s·z) = s·a(z)` for `s >= 0`: a target (or `Activation` layer) with one of these scales with
# its kernel.
SCALING_ACTIVATIONS = (keras.activations.linear, keras.activations.relu, keras.activations.leaky_relu)
# A variance of the branch below this fraction of the target carries no usable signal to scale: a standard deviation
# 1e-12 of the target's, far below where a layer scale starts (ConvNeXt's `gamma` at 1e-6 gives a branch of variance
# 1e-12), and far above where float32 squares underflow (1e-38).
MIN_BRANCH_VARIANCE = 1e-24


def _applications_classes() -> tuple[dict[type[Any], str | None], type[Any] | None]:
    """keras.applications' layers that scale with their input (with the name of the weight their output is
    proportional to, or `None`), and its `CustomScaleLayer` (a merge `x + c·branch`, or `None`).

    They are private classes of Keras (`keras.src`, not exported): a Keras that has moved or renamed them has none
    here, and their branches are not found, as before they were known.
    """
    try:
        from keras.src.applications import convnext, inception_resnet_v2
    except ImportError:
        return {}, None
    scaling = {convnext.LayerScale: "gamma", convnext.StochasticDepth: None}
    return scaling, getattr(inception_resnet_v2, "CustomScaleLayer", None)


# Layer classes declared to scale with their input, each with the name of the weight its output is proportional to
# (a layer scale's `gamma`) or `None`: keras.applications' and those of `scales_with_input`.
DECLARED_SCALING, SCALED_ADD = _applications_classes()

LayerClass = TypeVar("LayerClass", bound=type[Any])


def scales_with_input(layer_class: LayerClass, weight: str | None = None) -> LayerClass:
    """Declares a layer class as scaling with its input, so that a residual branch passes through it.

    With `residual="stream"`, each input of a merge is traced back, through layers whose output scales with their
    input, to the `Dense` or convolution layer that ends its branch, whose kernel and bias are then multiplied by
    the merge's branch scale. A branch through a layer of your own (a drop-path, a layer scale) is not found unless
    the layer is declared here.

    Declare a class only where `layer(s * x) == s * layer(x)` for every `s >= 0`, in inference and in training (the
    forward pass `fit` runs): a drop-path that multiplies its input by a random per-sample mask does; a layer that
    adds to its input (a bias, noise) or divides it by its own statistics (a normalization) does not. Only the class
    itself is declared: a subclass with a `call` of its own is not.

    Args:
        layer_class: The layer class, a subclass of `keras.layers.Layer`.
        weight: The name of the layer's variable attribute its output is proportional to, if any (a layer scale's
            `gamma` in `x * gamma`). A branch through the layer is then scaled in that variable rather than in the
            kernel of the layer that ends it, which keeps the variance LSUV gave it.

    Returns:
        `layer_class`, so that this also decorates a class.

    Raises:
        TypeError: If `layer_class` is not a `keras.layers.Layer` subclass, or `weight` not a string.

    Example:

    >>> @keras_lsuv.scales_with_input
    ... class StochasticDepth(keras.layers.Layer):
    ...     def __init__(self, rate, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.rate = rate
    ...
    ...     def call(self, x, training=None):
    ...         if not training:
    ...             return x
    ...         keep = 1 - self.rate
    ...         shape = (keras.ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
    ...         return x / keep * keras.ops.floor(keep + keras.random.uniform(shape))
    >>> class LayerScale(keras.layers.Layer):
    ...     def build(self, input_shape):
    ...         self.gamma = self.add_weight(shape=input_shape[-1:], initializer=keras.initializers.Constant(1e-5))
    ...
    ...     def call(self, x):
    ...         return x * self.gamma
    >>> _ = keras_lsuv.scales_with_input(LayerScale, weight="gamma")
    >>> report = keras_lsuv.lsuv_init(model, x_train[:256], residual="stream")  # branches through both are solved
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(f"scales_with_input: expected a keras.layers.Layer subclass, got {layer_class!r}.")
    if weight is not None and not isinstance(weight, str):
        raise TypeError(f"scales_with_input: `weight` must be the name of a variable attribute, got {weight!r}.")
    DECLARED_SCALING[layer_class] = weight
    return layer_class


def _is_add(operation: Any) -> bool:
    """Whether `operation` adds its inputs: a `keras.layers.Add`, or the operation `x + y` (`keras.ops.add`) records
    in a Functional graph, whose class Keras does not export (`keras.src.ops.numpy.Add`)."""
    if isinstance(operation, layers.Add):
        return True
    kind = type(operation)
    return kind.__name__ == "Add" and kind.__module__ == "keras.src.ops.numpy"


def _coefficients(operation: Any, inputs: int) -> list[float] | None:
    """The constant each of `inputs` inputs of `operation` is multiplied by before it is added, where `operation`
    is a merge: 1 for each input of an addition, `[1, c]` for keras.applications' `CustomScaleLayer`
    (`x[0] + x[1] * c`, Keras's own `call` only); else `None`."""
    if _is_add(operation):
        return [1.0] * inputs
    if SCALED_ADD is not None and type(operation) is SCALED_ADD and inputs == 2:
        return [1.0, float(operation.scale)]
    return None


@dataclasses.dataclass(eq=False)
class Merge:
    """One merge of a residual stream: an addition node of a Functional graph or of a layer's traced call; or, with
    no branch and a `skip_reason`, a layer whose call could not be traced (its additions unseen).

    Args:
        operation: The `Add` layer, the addition operation, or the `CustomScaleLayer` of the node (or the layer not
            traced).
        branches: For each input of the node, in order, the target that ends its branch, or `None` for the stream.
        coefficients: For each input, the constant it is multiplied by in the merge (1 but for `CustomScaleLayer`).
        weights: For each input, the variable its branch is scaled in where the branch passes through a layer scale
            (`scales_with_input`'s `weight`), else `None` (the target's kernel and bias).
        skip_reason: Why no branch of it can be scaled, else `None`.
        within: The layer whose traced call holds the addition, else `None`.
    """

    operation: Any
    branches: list[Target | None]
    coefficients: list[float]
    weights: list[keras.Variable | None]
    skip_reason: str | None = None
    within: keras.layers.Layer | None = None

    @property
    def name(self) -> str:
        return str(self.operation.name)

    @property
    def branch_targets(self) -> list[Target]:
        return [target for target in self.branches if target is not None]

    @property
    def branch_weights(self) -> list[keras.Variable | None]:
        """For each of `branch_targets`, the layer scale's variable its branch is scaled in, or `None`."""
        return [w for target, w in zip(self.branches, self.weights, strict=True) if target is not None]

    def record(self, **fields: Any) -> MergeRecord:
        """Its record, with `fields` (the outcome) beside what identifies the merge and its branches."""
        return MergeRecord(
            self.name,
            type(self.operation).__name__,
            branches=[target.layer.name for target in self.branch_targets],
            operation=self.operation,
            branch_layers=[target.layer for target in self.branch_targets],
            within=self.within,
            **fields,
        )

    def skipped_record(self, reason: str | None = None) -> MergeRecord:
        """The record of a merge left as it is: `reason`, or its skip reason."""
        return self.record(reason=reason or self.skip_reason or "not reached by the forward pass")


def find_merges(model: keras.Model, targets: list[Target], traced: Sequence[TracedCall] = ()) -> list[Merge]:
    """Every addition node of the Functional graphs in `model` (itself and nested ones) and of the graphs its layers'
    calls were traced into (`traced`), with its branches, once.

    A node belongs to several graphs where a Functional model is built from another one's tensors (keras-hub's
    `DeepLabV3Backbone` builds its feature pyramid from its encoder's): each operation is one merge, as each layer is
    one target, and a tensor's consumers are counted over every graph, so that a branch is used by nothing else in
    any of them.

    A layer whose call was traced is, in the graph that calls it, as its traced graph: a branch that ends at its
    output goes on inside it from its traced output (a `TransformerEncoder` as a Functional graph's branch, keras-hub's
    `CachedMultiHeadAttention` ending at its output projection as `MultiHeadAttention` does).

    Args:
        model: The model, built.
        targets: Its targets; those with a `skip_reason` end no branch (their layer is left alone).
        traced: The calls of its layers traced into graphs (`tracing.trace_calls`).

    Returns:
        The merges, in each graph's topological order. A merge whose operation appears in several nodes is not
        solvable at one call and carries a `skip_reason`; so does one with no input that is a branch.
    """
    by_layer = {id(t.layer): t for t in targets if not t.skip_reason}
    nodes: dict[int, Any] = {}  # every node of every graph, once, by id
    within: dict[int, keras.layers.Layer] = {}  # the layer whose traced call holds a node
    outputs = []
    graphs = [(None, graph) for graph in _graphs(model)] + [(call.layer, call.function) for call in traced]
    for layer, graph in graphs:
        for depth in sorted(graph._nodes_by_depth, reverse=True):
            nodes.update((id(node), node) for node in graph._nodes_by_depth[depth])
            if layer is not None:
                within.update((id(node), layer) for node in graph._nodes_by_depth[depth])
        outputs += tree.flatten(graph.outputs)
    index = Graph(
        consumers=Counter(id(tensor) for node in nodes.values() for tensor in node.input_tensors),
        calls=Counter(id(node.operation) for node in nodes.values()),
        producers={id(tensor): node for node in nodes.values() for tensor in node.outputs},
        traced={id(call.layer): call.function for call in traced},
    )
    index.consumers.update(id(tensor) for tensor in outputs)
    calls = index.calls
    merges: dict[int, Merge] = {}
    for node in nodes.values():
        coefficients = _coefficients(node.operation, len(node.input_tensors))
        if coefficients is None or len(node.input_tensors) < 2 or id(node.operation) in merges:
            continue
        ends = [_branch_end(tensor, by_layer, index) for tensor in node.input_tensors]
        merge = merges[id(node.operation)] = Merge(
            node.operation,
            [end.target for end in ends],
            coefficients,
            [end.weight for end in ends],
            within=within.get(id(node)),
        )
        if calls[id(node.operation)] > 1 or len(getattr(node.operation, "_inbound_nodes", ())) > 1:
            merge.skip_reason = "called several times: a branch scale is solved at one call"
        elif not merge.branch_targets:
            obstacles = [end.obstacle for end in ends if end.obstacle]
            merge.skip_reason = "no input is a branch: " + (
                "; ".join(obstacles)
                if obstacles
                else "none is the output of a target through layers that scale with it (e.g. Dropout, pooling, "
                "relu, or a layer declared with keras_lsuv.scales_with_input), used only on the way to this merge"
            )
    return list(merges.values())


def branch_scale(stream: float, branch: float, covariance: float, goal: float) -> tuple[float, bool]:
    """The branch scale `s >= 0` that gives `var(U + s·S)` the target `goal`, from the moments at `s = 1`.

    Example:

    >>> branch_scale(stream=0.5, branch=2.0, covariance=0.0, goal=1.0)
    (0.5, True)

    Args:
        stream: `var(U)`, the variance of the inputs that are not branches (0 without any).
        branch: `var(S)`, the variance of the branches' sum; positive.
        covariance: `cov(U, S)`.
        goal: The target variance.

    Returns:
        `(scale, reachable)`: the root nearest to 1 where the target can be reached, else the scale of least
        variance (`max(0, -cov / var(S))`) and `False`.
    """
    discriminant = covariance * covariance - branch * (stream - goal)
    if discriminant >= 0:
        roots = [(-covariance + sign * math.sqrt(discriminant)) / branch for sign in (1.0, -1.0)]
        positive = [root for root in roots if root > 0]
        if positive:
            return min(positive, key=lambda root: abs(math.log(root))), True
    return max(0.0, -covariance / branch), False


def merge_variance(stream: float, branch: float, covariance: float, scale: float) -> float:
    """`var(U + s·S)` from the moments at `s = 1`."""
    return stream + 2.0 * scale * covariance + scale * scale * branch


def solve(
    merge: Merge,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    criterion: Criterion,
    limit: ScaleLimit | None = None,
) -> tuple[MergeRecord, Any]:
    """Finds the branch scale of `merge` from one call's inputs (its branches at unit variance).

    Args:
        merge: The merge.
        args: The positional arguments of its call.
        kwargs: Its keyword arguments.
        criterion: The target variance and tolerance.
        limit: The largest branch scale the branches' dtypes hold (`branch_limit`); the scale stops there, and the
            record says so.

    Returns:
        The merge's record and its output at the branch scale (`U + s·S`, each branch rounded to its own dtype as
        the model computes it), or `None` for the output where it is left as it is (the record then says why). The
        branches themselves are not scaled here (`scale_branch`).

    Raises:
        ValueError: If an input of the merge is not finite.
    """
    inputs = [value for value in tree.flatten((args, kwargs)) if value is not None and hasattr(value, "shape")]
    if len(inputs) != len(merge.branches):
        mismatch = f"called with {len(inputs)} tensors, not the {len(merge.branches)} of its node"
        return merge.skipped_record(mismatch), None
    dtype = keras.backend.result_type(*[x.dtype for x in inputs])
    terms = list(zip(inputs, merge.coefficients, merge.branches, strict=True))
    stream = [ops.multiply(ops.cast(x, "float32"), c) for x, c, end in terms if end is None]
    branches = [(x, c) for x, c, end in terms if end is not None]
    branch = _sum([ops.multiply(ops.cast(x, "float32"), c) for x, c in branches])
    if stream:
        total = _sum(stream)
        shape = ops.shape(ops.add(total, branch))
        total, branch = ops.broadcast_to(total, shape), ops.broadcast_to(branch, shape)
        # The covariance from the mean of the product, not from `var(U + S)`: a branch far smaller than the stream (a
        # layer scale's 1e-6) would be lost in the rounding of `U + S`.
        parts = [total, branch, ops.multiply(total, branch)]
    else:
        parts = [branch]
    stats = moments(ops.stack(parts, axis=-1), (len(parts),))  # one reduction, global under several processes
    variances = stats.m2 / stats.count
    if not np.all(np.isfinite(variances)):
        raise ValueError(f"LSUV: the inputs of merge '{merge.name}' are not finite (variances {variances}).")
    if stream:
        stream_variance, branch_variance = float(variances[0]), float(variances[1])
        covariance = float(stats.mean[2] - stats.mean[0] * stats.mean[1])
    else:
        stream_variance, branch_variance, covariance = 0.0, float(variances[0]), 0.0
    goal = criterion.target_variance
    if branch_variance <= MIN_BRANCH_VARIANCE * goal:
        return merge.skipped_record(f"its branches carry no signal (variance {branch_variance:.3g})"), None
    if abs(merge_variance(stream_variance, branch_variance, covariance, 1.0) - goal) < criterion.tolerance:
        scale, reachable = 1.0, True  # within tolerance as it is: kept, as the paper's loop keeps such a layer
    else:
        scale, reachable = branch_scale(stream_variance, branch_variance, covariance, goal)
    reason: str | None = None
    if limit is not None and scale > limit.scale:
        reason = (
            f"reaching the target would need a branch scale of {scale:.3g}, beyond what {limit.dtype} can hold in "
            f"a branch (at most {limit.scale:.3g})"
        )
        scale = limit.scale
    elif not reachable:
        reason = (
            f"the stream alone has variance {stream_variance:.3g}: no branch scale brings the merge to the target, "
            f"so the branches are scaled by {scale:.3g}, to the merge's least variance"
        )
    # Each branch at the scale in its own dtype, as the model computes it (float16 rounds, and may overflow).
    scaled = _sum(
        [
            ops.multiply(ops.cast(ops.cast(ops.multiply(ops.cast(x, "float32"), scale), x.dtype), "float32"), c)
            for x, c in branches
        ]
    )
    output = scaled if not stream else ops.add(total, scaled)
    final = merge_variance(stream_variance, branch_variance, covariance, scale)
    if _narrow(dtype) or any(_narrow(x.dtype) for x, _ in branches):
        final = variance(ops.cast(ops.cast(output, dtype), "float32"))  # what the model computes, measured
        if not math.isfinite(final):
            reason = f"its output at branch scale {scale:.3g} is not finite in {dtype}"
    record = merge.record(
        stream_variance=stream_variance if stream else None,
        branch_variance=branch_variance,
        initial_variance=merge_variance(stream_variance, branch_variance, covariance, 1.0),
        final_variance=final,
        scale=scale,
        converged=math.isfinite(final) and abs(final - goal) < criterion.tolerance,
        reason=reason,
    )
    return record, ops.cast(output, dtype)


def branch_limit(target: Target, output_peak: float, weight: keras.Variable | None = None) -> ScaleLimit:
    """The largest factor the branch ending at `target` can be scaled by: its kernel and its bias in their dtype and
    in the layer's compute dtype, its pre-activation (peaking at `output_peak` now, 0 if not measured) in the compute
    dtype, as `ScaleLimit` bounds a layer's rescale; or, where the branch is scaled in a layer scale's `weight`, that
    weight in its dtype and in `target`'s compute dtype. Unbounded where every dtype is float32 or wider (no
    realistic scale overflows there, and a non-finite output stops the run with every weight restored)."""
    layer = target.layer
    if weight is not None:
        if not any(_narrow(dtype) for dtype in [layer.compute_dtype, variable_dtype(weight)]):
            return ScaleLimit()
        return ScaleLimit.of(weight, float32_copy(weight), layer, 0.0)
    variables = [target.scaled_kernel] + ([layer.bias] if target.has_bias else [])
    if not any(_narrow(dtype) for dtype in [layer.compute_dtype, *map(variable_dtype, variables)]):
        return ScaleLimit()
    peaks = [output_peak] + [0.0] * (len(variables) - 1)  # the pre-activation's peak bounds the kernel's scale
    limits = [ScaleLimit.of(v, float32_copy(v), layer, peak) for v, peak in zip(variables, peaks, strict=True)]
    return min(limits, key=lambda limit: limit.scale)


def scale_branch(
    target: Target, scale: float, weight: keras.Variable | None = None
) -> list[tuple[keras.Variable, Any]]:
    """Multiplies the kernel whose scale sets `target`'s output, and its bias, by `scale`, or the layer scale's
    `weight` where the branch passes through one; returns each variable with its value before, to undo it."""
    if weight is not None:
        variables = [weight]
    else:
        variables = [target.scaled_kernel] + ([target.layer.bias] if target.has_bias else [])
    before = [(variable, float32_copy(variable)) for variable in variables]
    for variable, value in before:
        write_kernel(variable, value, scale)
    return before


def branch_record(record: LayerRecord, merge: MergeRecord, weight: keras.Variable | None = None) -> LayerRecord:
    """The record of a branch's last layer after `merge` scaled it: its variance is the merge's to set; or, where
    the merge scaled a layer scale's `weight` on the branch instead, the layer's own record, naming the merge."""
    scale = merge.scale
    if weight is not None:
        return dataclasses.replace(
            record,
            merge=merge.name,
            reason=(record.reason + "; " if record.reason else "")
            + f"its residual branch is scaled by {scale:.3g} at merge '{merge.name}' in '{weight.path}', a layer "
            "scale after it",
        )
    return dataclasses.replace(
        record,
        scale=record.scale * scale,
        final_variance=None if record.final_variance is None else record.final_variance * scale * scale,
        final_mean=None if record.final_mean is None else record.final_mean * scale,
        converged=merge.converged,
        merge=merge.name,
        reason=f"scaled by {scale:.3g} with its residual branch at merge '{merge.name}'"
        + ("" if merge.converged else f", which did not converge: {merge.reason}"),
    )


def _scales_with_input(layer: Any) -> bool:
    """Whether `layer` (any operation of a graph) scales with its input as it is now: one of `SCALING_LAYERS`, or an
    instance of a declared class (`DECLARED_SCALING`) with that class's `call`."""
    if isinstance(layer, layers.Activation):
        return layer.activation in SCALING_ACTIVATIONS
    if isinstance(layer, layers.ReLU):
        return layer.max_value is None and float(layer.threshold) == 0.0
    return isinstance(layer, SCALING_LAYERS) or _declared(layer) is not None


def _declared(layer: Any) -> type[Any] | None:
    """The declared class (`DECLARED_SCALING`) whose `call` `layer` runs, or `None`."""
    for kind in type(layer).__mro__:
        if kind in DECLARED_SCALING:
            return kind if type(layer).call is kind.call else None
    return None


def _layer_scale(layer: Any) -> keras.Variable | None:
    """The variable `layer`'s output is proportional to, where its class was declared with one; else `None`."""
    kind = _declared(layer)
    name = None if kind is None else DECLARED_SCALING[kind]
    weight = None if name is None else getattr(layer, name, None)
    # One of the layer's own weights (not `isinstance(weight, keras.Variable)`: before Keras 3.7 that class is not the
    # backend variables' base).
    return weight if any(weight is own for own in layer.weights) else None


@dataclasses.dataclass
class BranchEnd:
    """Where a merge's input leads back to: the target that ends its branch (`None` for the stream), the layer
    scale's variable nearest the merge on the way (`None` for none), and what stops the walk where that is worth a
    merge's skip reason."""

    target: Target | None = None
    weight: keras.Variable | None = None
    obstacle: str | None = None


@dataclasses.dataclass
class Graph:
    """What `find_merges` knows of every graph at once, by tensor and operation id: how many nodes consume each
    tensor (a graph's output counts as one), how many nodes call each operation, the node that produces each tensor,
    and the traced graph of each layer whose call was traced."""

    consumers: Counter[int]
    calls: Counter[int]
    producers: dict[int, Any]
    traced: dict[int, keras.Function]


def _branch_end(tensor: Any, by_layer: dict[int, Target], graph: Graph) -> BranchEnd:
    """The target whose output reaches `tensor` through layers that scale with it, each output used once, with the
    first layer scale's weight on the way; else no target, with what stops it where that is worth a merge's skip
    reason."""
    weight: keras.Variable | None = None
    while graph.consumers[id(tensor)] == 1 and id(tensor) in graph.producers:
        node = graph.producers[id(tensor)]
        operation: Any = node.operation
        # A layer called several times is scaled at all its calls: only one without weights (a dropout keras-hub's
        # blocks apply after their attention and their MLP alike) passes a branch's scale through one of them.
        if graph.calls[id(operation)] != 1 and not (_scales_with_input(operation) and not operation.weights):
            return BranchEnd()
        inner = graph.traced.get(id(operation))
        if inner is not None and len(inner.outputs) == 1:  # the layer's output is its traced graph's
            end = _branch_end(inner.outputs[0], by_layer, graph)
            if end.target is not None:
                return BranchEnd(end.target, end.weight if weight is None else weight)
        if isinstance(operation, layers.MultiHeadAttention):
            if type(operation).call is not layers.MultiHeadAttention.call:  # a `call` of its own may do more after
                return BranchEnd(
                    obstacle=f"layer '{operation.name}' has a `call` of its own, whose output need not scale with its "
                    "kernel"
                )
            operation = operation._output_dense  # its output is the output projection's (`MultiHeadAttention.call`)
        if id(operation) in by_layer:
            return _scaling_target(by_layer[id(operation)], weight)
        if isinstance(operation, layers.BatchNormalization):
            return BranchEnd(
                obstacle=f"the path of an input passes through BatchNormalization '{operation.name}', which in "
                "training (fit) divides by the batch's own deviation and so undoes a branch scale"
            )
        if not _scales_with_input(operation) or len(node.input_tensors) != 1:
            return BranchEnd()
        if weight is None:
            weight = _layer_scale(operation)
        tensor = node.input_tensors[0]
    return BranchEnd()


def _scaling_target(target: Target, weight: keras.Variable | None) -> BranchEnd:
    """`target` where its output scales with its kernel and bias: Keras's own `call` (`Target.is_linear_in_kernel`)
    and an activation in `SCALING_ACTIVATIONS`; else no target, and why."""
    name = target.layer.name
    if not target.is_linear_in_kernel:
        return BranchEnd(
            obstacle=f"layer '{name}' has a `call` of its own, whose output need not scale with its kernel"
        )
    if getattr(target.layer, "activation", None) not in (None, *SCALING_ACTIVATIONS):
        return BranchEnd()
    return BranchEnd(target, weight)


def _graphs(model: keras.layers.Layer) -> Iterator[Any]:
    """The Functional graphs in `model`: itself (a Sequential's is the Functional it keeps) and nested models."""
    for layer in model._flatten_layers(include_self=True):  # Keras's own walk over every sub-layer
        graph = getattr(layer, "_functional", None) or layer
        if isinstance(graph, keras.Model) and getattr(graph, "_nodes_by_depth", None):
            yield graph


def _narrow(dtype: Any) -> bool:
    """Whether `dtype` is a float narrower than float32 (float16, bfloat16)."""
    return keras.backend.standardize_dtype(dtype) in ("float16", "bfloat16")


def _sum(tensors: list[Any]) -> Any:
    total = tensors[0]
    for tensor in tensors[1:]:
        total = ops.add(total, tensor)
    return total
