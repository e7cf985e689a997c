"""Small models of every kind LSUV must handle, and an engine-independent way to check its result."""

import contextlib
import warnings

import keras
import numpy as np

import keras_lsuv
from keras_lsuv.targets import TARGET_CLASSES

layers = keras.layers


def deep_mlp(depth=10, width=32, inputs=16):
    model = keras.Sequential([keras.Input((inputs,))])
    for _ in range(depth):
        model.add(layers.Dense(width, activation="tanh", bias_initializer="zeros"))
    model.add(layers.Dense(10, activation="softmax"))
    return model


def residual_cnn():
    """Separable, depthwise and transposed convs, a residual add, two outputs."""
    inputs = keras.Input((12, 12, 3))
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    r = layers.SeparableConv2D(8, 3, padding="same", activation="relu")(h)
    r = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=1, activation="relu")(r)
    h = layers.Add()([h, r])
    up = layers.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu", name="up")(h)
    segmentation = layers.Conv2D(2, 1, name="segmentation")(up)
    pooled = layers.GlobalAveragePooling2D()(h)
    classes = layers.Dense(5, activation="softmax", name="classes")(pooled)
    return keras.Model(inputs, [classes, segmentation])


def nested_model():
    """A Sequential inside a Functional model."""
    inner = keras.Sequential([layers.Dense(24, activation="relu"), layers.Dense(24, activation="relu")], name="inner")
    inputs = keras.Input((16,))
    h = layers.Dense(24, activation="relu")(inputs)
    h = inner(h)
    return keras.Model(inputs, layers.Dense(3)(h))


class Subclassed(keras.Model):
    """No graph; `shared` is called twice per forward pass."""

    def __init__(self):
        super().__init__()
        self.first = layers.Dense(32, activation="relu")
        self.shared = layers.Dense(32, activation="relu")
        self.conv = layers.Conv1D(8, 3, padding="same", activation="elu")
        self.head = layers.Dense(4)

    def call(self, x):
        h = self.shared(self.shared(self.first(x)))
        h = self.conv(keras.ops.expand_dims(h, -1))
        return self.head(keras.ops.reshape(h, (-1, 32 * 8)))


class SharedAlongTheChain(keras.Model):
    """One residual block called once per layer of depth (as ALBERT shares its transformer layer): each call of the
    block feeds the next, so rescaling `ffn2` moves what `ffn1` measures at its later calls."""

    def __init__(self, depth=4):
        super().__init__()
        self.proj = layers.Dense(16)
        self.ffn1 = layers.Dense(32, activation="gelu")
        self.ffn2 = layers.Dense(16)
        self.head = layers.Dense(3)
        self.depth = depth

    def call(self, x):
        h = self.proj(x)
        for _ in range(self.depth):
            h = h + self.ffn2(self.ffn1(h))
        return self.head(h)


def transformer_block(seq=6, dim=16):
    inputs = keras.Input((seq, dim))
    attention = layers.MultiHeadAttention(num_heads=2, key_dim=8)(inputs, inputs)
    h = layers.LayerNormalization()(layers.Add()([inputs, attention]))
    ffn = layers.Dense(32, activation="gelu")(h)
    ffn = layers.Dense(dim)(ffn)
    h = layers.LayerNormalization()(layers.Add()([h, ffn]))
    return keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling1D()(h)))


def mobilenet():
    return keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=5)


def batch_for(model, n=64, seed=0):
    rng = np.random.default_rng(seed)
    # An unbuilt Sequential has no inputs (AttributeError, or ValueError before Keras 3.7): 16 features then.
    shape = tuple(model.inputs[0].shape[1:]) if model.built and getattr(model, "inputs", None) else (16,)
    return rng.normal(size=(n, *shape)).astype("float32")


def target_layers(model, select=None):
    """The layers LSUV initializes by default (or those `select` chooses), walked independently of the package
    (which layers are kernel layers is the package's definition, `keras_lsuv.is_kernel_layer`)."""
    select = select or (
        lambda layer: (
            isinstance(layer, TARGET_CLASSES)
            or keras_lsuv.is_kernel_layer(layer)
            or keras_lsuv.targets.is_recurrent(layer)
        )
    )
    seen, found = set(), []

    def walk(layer):
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if select(child) and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
            walk(child)

    walk(model)
    return found


def _is_tracer(value):
    """A JAX tracer, a TF graph tensor, or a tensor inside torch's vmap: none can be evaluated again after the pass."""
    if keras.backend.backend() == "jax":
        import jax

        return isinstance(value, jax.core.Tracer)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.is_tensor(value) and tf.is_symbolic_tensor(value)
    if keras.backend.backend() == "torch":
        import torch

        return isinstance(value, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(value)
    return False


def preactivation_variances(model, x):
    """Each target layer's pre-activation variance over every call of it in a plain forward pass, by layer object."""
    return pooled_variances(preactivations(model, x))


def pooled_variances(outputs):
    """Each layer's variance over all its calls' outputs together, from `preactivations`."""
    return {layer: float(np.var(np.concatenate([z.ravel() for z in zs]))) for layer, zs in outputs.items()}


def channel_means(layer, outputs):
    """The mean of each output channel (one per bias value) over the outputs of every call of `layer`."""
    channels = int(np.prod(layer.bias.shape))
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        outputs = [np.moveaxis(z, 1, -1) for z in outputs]
    return np.concatenate([z.reshape(-1, channels) for z in outputs]).mean(axis=0)


def preactivations(model, x, select=None):
    """Each target layer's pre-activation outputs (float64 arrays), one per call of it in a plain forward pass.

    Independent of the engines: the pass records the inputs of every eager call of each target, then each
    recorded call is evaluated again through `layer(...)` (so with the layer's own dtype policy) with its
    activation replaced by the identity (written to the instance's `__dict__`, so that a Keras layer used as an
    activation works on torch too; a kernel layer's output is taken as its `call` returns it, and one that is not
    one tensor is not measured), less the padding of an `Embedding` with `mask_zero=True` (`unmasked`), and the
    variance is taken over all the calls' outputs together. Calls inside JAX control flow (tracers), a TF graph or
    torch's vmap are not recorded. Layers are keys, never names (Keras allows equal names).
    """
    captured = {}
    targets = target_layers(model, select)

    def record(layer, args, kwargs, output):
        if not any(_is_tracer(v) for v in keras.tree.flatten((args, kwargs))):
            captured.setdefault(id(layer), []).append((args, kwargs))

    with recorded_calls(targets, record):
        model(x, training=False)
    found = {}
    for layer in targets:
        if id(layer) not in captured:
            continue
        if keras_lsuv.targets.is_recurrent(layer):
            found[layer] = [input_projection(layer, args, kwargs) for args, kwargs in captured[id(layer)]]
            continue
        outputs = []
        state = vars(layer)
        whole = keras_lsuv.is_kernel_layer(layer)
        had_own, own = "activation" in state, state.get("activation")
        if not whole:
            state["activation"] = keras.activations.linear
        try:
            for args, kwargs in captured[id(layer)]:
                output = layer(*args, **kwargs)
                if not hasattr(output, "shape"):
                    break
                output = keras.ops.convert_to_numpy(output).astype("float64")
                outputs.append(unmasked(layer, args, kwargs, output))
        finally:
            if had_own:
                state["activation"] = own
            elif not whole:
                del state["activation"]
        if outputs:
            found[layer] = outputs
    return found


def input_projection(layer, args, kwargs):
    """A recurrent layer's input projection over every step of one call, in NumPy: each step's input times the
    cell's input kernel, as rows, the steps the call's mask leaves out left out."""
    sequences = keras.ops.convert_to_numpy(args[0] if args else kwargs["sequences"]).astype("float64")
    kernel = keras.ops.convert_to_numpy(layer.cell.kernel).astype("float64")
    if isinstance(layer, (layers.ConvLSTM1D, layers.ConvLSTM2D, layers.ConvLSTM3D)):  # each frame convolved
        frames = sequences.reshape(-1, *sequences.shape[2:]).astype("float32")
        cell = layer.cell
        z = keras.ops.conv(
            frames, kernel.astype("float32"), cell.strides, cell.padding, cell.data_format, cell.dilation_rate
        )
        rows = keras.ops.convert_to_numpy(z).astype("float64").reshape(sequences.shape[0] * sequences.shape[1], -1)
    else:
        rows = (sequences @ kernel).reshape(sequences.shape[0] * sequences.shape[1], -1)
    mask = kwargs.get("mask")
    return rows if mask is None else rows[keras.ops.convert_to_numpy(mask).reshape(-1).astype(bool)]


def unmasked(layer, args, kwargs, output):
    """What the layers after an `Embedding` with `mask_zero=True` see of the output of its call with `args`/`kwargs`:
    the vectors of the tokens that are not padding (token 0), as rows. A `ReversibleEmbedding`'s `reverse=True`
    call maps hidden states to logits and has no mask: whole, as any other layer's output."""
    reverse = kwargs.get("reverse", args[1] if len(args) > 1 else False)
    if not (isinstance(layer, layers.Embedding) and layer.mask_zero) or reverse:
        return output
    ids = keras.ops.convert_to_numpy(args[0] if args else kwargs["inputs"])
    return output[ids != 0]


def output_variances(model, x, operations, training=False):
    """The variance of each operation's output (a merge: an `Add` layer or `x + y`) in a plain forward pass, by
    operation object; each must be called once.

    With `training=True` the pass is the one `fit` runs (`BatchNormalization` on the batch's own statistics), with
    every dropout and noise layer off (its rate or deviation 0 for the pass) so that it measures the scales, not a
    random draw; every weight, the moving statistics included, is put back afterwards.
    """
    outputs = {}

    def record(operation, args, kwargs, output):
        assert operation not in outputs, f"{operation.name} called twice"
        outputs[operation] = float(np.var(keras.ops.convert_to_numpy(output).astype("float64")))

    saved = weights_of(model)
    with recorded_calls(operations, record), random_layers_off(model if training else None):
        model(x, training=training)
    for weight, value in zip(model.weights, saved, strict=True):
        weight.assign(value)
    return outputs


def merge_variances(model, x, merges, training=False):
    """The variance of each merge's output in a plain forward pass (`fit`'s with `training=True`, as
    `output_variances`), by `id` of its record; a merge the pass cannot show is left out.

    A merge of a Functional graph is an operation the pass calls (`output_variances`). A merge inside a layer's traced
    `call` (`record.within`) is no operation of the model: its output is read where the plain pass shows it, as the
    input of a sub-layer that consumes it in the traced graph (the block's second `LayerNormalization` for its first
    addition), or as the layer's own output where the addition ends its `call`.
    """
    plain = [merge for merge in merges if merge.within is None]
    measured = output_variances(model, x, [merge.operation for merge in plain], training)
    found = {id(merge): measured[merge.operation] for merge in plain}
    reads = {}  # id(merge) -> (layer, which tensors of its call: "input" or "output", position among them)
    for merge in merges:
        if merge.within is None:
            continue
        [node] = merge.operation._inbound_nodes
        output = node.output_tensors[0]
        consumers = [n for n in merge.operation._outbound_nodes if isinstance(n.operation, keras.layers.Layer)]
        if consumers:
            position = [id(t) for t in consumers[0].input_tensors].index(id(output))
            reads[id(merge)] = (consumers[0].operation, "input", position)
        elif not merge.operation._outbound_nodes:
            reads[id(merge)] = (merge.within, "output", 0)
    seen = {}

    def record(layer, args, kwargs, output):
        seen.setdefault(layer, []).append((keras.tree.flatten((args, kwargs)), keras.tree.flatten(output)))

    saved = weights_of(model)
    layers_read = list({id(layer): layer for layer, _, _ in reads.values()}.values())
    with recorded_calls(layers_read, record), random_layers_off(model if training else None):
        model(x, training=training)
    for weight, value in zip(model.weights, saved, strict=True):
        weight.assign(value)
    for key, (layer, kind, position) in reads.items():
        calls = seen.get(layer, [])
        if len(calls) != 1:
            continue
        tensors = [t for t in calls[0][0 if kind == "input" else 1] if hasattr(t, "shape")]
        found[key] = float(np.var(keras.ops.convert_to_numpy(tensors[position]).astype("float64")))
    return found


@contextlib.contextmanager
def random_layers_off(model):
    """Sets the rate (or noise deviation) of every dropout and noise layer of `model` to 0 in the block; nothing if
    `model` is `None`."""
    kinds = {layers.Dropout: "rate", layers.GaussianDropout: "rate", layers.AlphaDropout: "rate"}
    kinds[layers.GaussianNoise] = "stddev"
    found = []
    if model is not None:
        for layer in model._flatten_layers(include_self=False):
            for kind, attribute in kinds.items():
                if isinstance(layer, kind):
                    found.append((layer, attribute, getattr(layer, attribute)))
                    setattr(layer, attribute, 0)
    try:
        yield
    finally:
        for layer, attribute, value in found:
            setattr(layer, attribute, value)


@contextlib.contextmanager
def recorded_calls(operations, record):
    """Calls `record(operation, args, kwargs, output)` after every call of each operation (a layer, or an operation
    of a Functional graph) in the block, through an instance-level `call` removed afterwards."""

    def recorder(operation, original):
        def call(*args, **kwargs):
            output = original(*args, **kwargs)
            record(operation, args, kwargs, output)
            return output

        return call

    for operation in operations:
        vars(operation)["call"] = recorder(operation, operation.call)
    try:
        yield
    finally:
        for operation in operations:
            vars(operation).pop("call", None)


def weights_of(model):
    return [np.array(keras.ops.convert_to_numpy(w)) for w in model.weights]


def kernels_of(layer):
    """A built target layer's kernel variables: both of a separable conv, the matrix of an embedding, every weight of
    rank 2 or more of a kernel layer."""
    if keras_lsuv.is_kernel_layer(layer) or keras_lsuv.targets.is_recurrent(layer):
        return [weight for weight in layer.weights if len(weight.shape) >= 2]
    if hasattr(layer, "pointwise_kernel"):
        return [layer.depthwise_kernel, layer.pointwise_kernel]
    return [layer.embeddings if isinstance(layer, layers.Embedding) else layer.kernel]


def kernels_by_layer(model, select=None):
    """Every built target layer's kernels (`kernels_of`), copied to NumPy, by layer object; the targets `select`
    chooses, if given."""
    found = {}
    for layer in target_layers(model, select):
        if not layer.built:  # never called: it has no kernel
            continue
        found[layer] = [np.array(keras.ops.convert_to_numpy(kernel)) for kernel in kernels_of(layer)]
    return found


# The largest |channel mean| of a centered layer, as a fraction of the target standard deviation, by its compute
# dtype, as the guide states it ("Centering: `center`"): bfloat16 rounds the bias too coarsely for 1%.
MEAN_TOLERANCES = {"bfloat16": 0.05}
MEAN_TOLERANCE = 0.01


def assert_report_is_true(model, x, report, before, tolerance=0.1, select=None, mean_tolerance=None, in_training=False):
    """The report against the model, measured independently over every call of each layer.

    The report has one record per target layer (chosen by `select`, the default targets if `None`), matched by the
    layer object (never by name); every layer the report calls converged measures within `tolerance` of 1 and as
    reported; every layer it did not measure has its kernels bit-identical to `before` (from `kernels_by_layer`);
    every weight is finite. For a centered run (`report.center`), every converged layer with a bias has each
    channel's mean within `mean_tolerance` of 0 (by default the guide's tolerance for the layer's compute dtype,
    `MEAN_TOLERANCES`, times the target standard deviation), and every measured record's means are as measured. With
    `in_training`, every merge the report calls converged measures within `tolerance` of 1 in the forward pass `fit`
    runs too (`output_variances(..., training=True)`).
    """
    outputs = preactivations(model, x, select)
    measured = pooled_variances(outputs)
    after = kernels_by_layer(model, select)
    recorded = [record.layer for record in report.records]
    assert len({id(layer) for layer in recorded}) == len(recorded), "a layer has several records"
    targets = target_layers(model, select)
    assert {id(layer) for layer in recorded} == {id(layer) for layer in targets}, "records != targets"
    branch_ends = set()
    if report.residual:  # every merge the report solved measures as it says, and its branches set their variance
        merged = merge_variances(model, x, [m for m in report.merges if not m.skipped])
        for merge in report.merges:
            if merge.skipped:
                continue
            branch_ends |= {id(layer) for layer in merge.branch_layers}
            if id(merge) not in merged:  # inside a traced call, where the plain pass does not show it
                continue
            value = merged[id(merge)]
            assert abs(merge.final_variance - value) <= 2e-2 * value + 1e-6, f"{merge.name}: {merge} vs {value}"
            if merge.converged:
                assert abs(value - 1.0) < tolerance, f"merge {merge.name}: reported converged, measures {value}"
            branch_ends |= {id(layer) for layer in merge.branch_layers}
        converged = [m for m in report.merges if not m.skipped and m.converged]
        if in_training and converged:
            in_fit = merge_variances(model, x, converged, training=True)
            for merge in converged:
                value = in_fit.get(id(merge))
                assert value is None or abs(value - 1.0) < tolerance, f"{merge.name}: converged, {value} in training"
    for record in report.records:
        if report.center and not record.skipped:
            mean = float(np.mean(np.concatenate([z.ravel() for z in outputs[record.layer]])))
            assert abs(record.final_mean - mean) <= 1e-3 + 2e-2 * abs(mean), f"{record.name}: {record} vs mean {mean}"
            if record.converged and getattr(record.layer, "bias", None) is not None:
                means = channel_means(record.layer, outputs[record.layer])
                dtype = keras.backend.standardize_dtype(record.layer.compute_dtype)
                bound = mean_tolerance
                if bound is None:
                    bound = MEAN_TOLERANCES.get(dtype, MEAN_TOLERANCE) * np.sqrt(report.target_variance)
                assert np.max(np.abs(means)) <= bound, f"{record.name}: channel means {means} beyond {bound} ({dtype})"
        elif not record.skipped:
            assert record.initial_mean is None and record.final_mean is None, f"{record.name}: means without center"
        assert (record.merge is not None) == (id(record.layer) in branch_ends), f"{record.name}: merge {record.merge}"
        if record.skipped:
            for a, b in zip(before.get(record.layer, []), after.get(record.layer, []), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{record.name} was not measured but changed")
        elif id(record.layer) in branch_ends:  # its merge's to set: as reported
            value = measured[record.layer]
            assert abs(record.final_variance - value) <= 2e-2 * value + 1e-6, f"{record.name}: {record} vs {value}"
        elif record.converged:
            value = measured[record.layer]
            assert abs(value - 1.0) < tolerance, f"{record.name}: reported converged, measures {value}"
            assert abs(record.final_variance - value) <= 2e-2 * value, f"{record.name}: {record} vs {value}"
            experts = expert_rows(record.layer, outputs[record.layer]) if report.engine == "single_pass" else None
            if experts is not None:
                each = np.var(experts, axis=1)  # a bank called once: each expert scaled on its own
                assert np.all(np.abs(each - 1.0) < tolerance), f"{record.name}: experts measure {each}"
    for weight in weights_of(model):
        assert np.isfinite(weight).all()


def expert_rows(layer, outputs):
    """Each expert's output, as rows, where `layer` is a mixture-of-experts bank called once (a float32 rank-3 kernel
    named `expert...` last among its kernels, its output stacking that many experts on its first axis); else
    `None`."""
    banks = [w for w in layer.weights if len(w.shape) == 3 and "expert" in w.name.lower() and w.dtype == "float32"]
    if len(outputs) != 1 or not banks or outputs[0].ndim < 2 or outputs[0].shape[0] != banks[-1].shape[0]:
        return None
    return outputs[0].reshape(outputs[0].shape[0], -1)


class CheckWhenTrainingBegins(keras.callbacks.Callback):
    """Runs `check(model)` in `on_train_begin`, after the callbacks listed before it."""

    def __init__(self, check):
        super().__init__()
        self.check = check

    def on_train_begin(self, logs=None):
        self.check(self.model)


def run(model, x, **options):
    """`lsuv_init`, silent and seeded unless the options say otherwise: the one way tests run LSUV."""
    options.setdefault("verbose", 0)
    options.setdefault("seed", 0)
    return keras_lsuv.lsuv_init(model, x, **options)


def initialize_and_check(model, x, warned=None, **options):
    """Runs LSUV and checks the report against the model; returns the report.

    Args:
        warned: A list that receives every warning of the run, if given.
    """
    model(x[:2])
    before = kernels_by_layer(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run(model, x, **options)
    for warning in caught:
        if warned is None:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        else:
            warned.append(warning)
    in_training = options.get("residual") is not None  # a merge's record must hold as `fit` runs the model
    assert_report_is_true(model, x, report, before, select=options.get("targets"), in_training=in_training)
    return report


def small_mlp():
    return keras.Sequential([keras.Input((16,)), layers.Dense(32, activation="relu"), layers.Dense(4)])


def small_cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.SeparableConv2D(8, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(4),
        ]
    )


def small_attention():
    return transformer_block(seq=4, dim=8)


def scaled_batch(model, scale, n=128):
    return batch_for(model, n=n) * np.float32(scale)
