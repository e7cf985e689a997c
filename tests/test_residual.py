"""`residual="stream"`: each merge of a residual stream at the target variance, measured on the model."""

import keras
import numpy as np
import pytest
import zoo

import keras_lsuv
from keras_lsuv.guard import trained_weights_evidence
from keras_lsuv.report import LSUVReport
from keras_lsuv.residual import branch_scale, merge_variance

layers = keras.layers


def resnet(blocks=4, post_activation=True, width=8):
    """Conv blocks `x + conv(conv(x))` without normalization; a relu after each merge if `post_activation`."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    for _ in range(blocks):
        h = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        h = layers.Conv2D(width, 3, padding="same")(h)
        x = layers.Add()([x, h])
        if post_activation:
            x = layers.Activation("relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10, name="logits")(x))


def projection_block(normalization=False):
    """A block whose shortcut is a conv too (ResNet's first block of a stage): both inputs are branches, the main
    one through a Dropout; each through a BatchNormalization too if `normalization` (then neither is a branch)."""
    normalize = layers.BatchNormalization if normalization else layers.Identity
    inputs = keras.Input((8, 8, 3))
    shortcut = normalize()(layers.Conv2D(12, 1, name="shortcut")(inputs))
    h = layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    h = layers.Dropout(0.5)(normalize()(layers.Conv2D(12, 3, padding="same", name="main")(h)))
    x = layers.Activation("relu")(layers.Add()([shortcut, h]))
    return keras.Model(inputs, layers.Dense(4)(layers.Flatten()(x)))


def normalized_blocks():
    """A stem with a BatchNormalization off every branch, a block whose branch ends with one, a block without: in
    training (fit), each BatchNormalization moves every merge after it."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Activation("relu")(layers.BatchNormalization(name="stem_norm")(layers.Conv2D(8, 3)(inputs)))
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    h = layers.BatchNormalization(name="branch_norm")(layers.Conv2D(8, 3, padding="same")(h))
    x = layers.Activation("relu")(layers.Add(name="normalized")([x, h]))
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = layers.Activation("relu")(layers.Add(name="plain")([x, layers.Conv2D(8, 3, padding="same")(h)]))
    return keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))


def pre_ln_transformer(blocks=2, width=16, tokens=6):
    """Pre-LN blocks written with `x + ...` (the addition operation, not an `Add` layer); attention branches end
    at MultiHeadAttention's output projection."""
    inputs = keras.Input((tokens, width))
    x = layers.Dense(width, name="embed")(inputs)
    for _ in range(blocks):
        h = layers.LayerNormalization()(x)
        x = x + layers.MultiHeadAttention(2, width // 2)(h, h)
        h = layers.Dense(2 * width, activation="gelu")(layers.LayerNormalization()(x))
        x = x + layers.Dense(width)(h)
    return keras.Model(inputs, layers.Dense(3)(x))


def nested_blocks():
    """The residual model nested inside another, with a layer shared by two calls after it (the pass halts there and
    the merges before it keep their scale)."""
    inner = resnet(blocks=2)
    inputs = keras.Input((8, 8, 3))
    shared = layers.Dense(10, activation="tanh", name="shared")
    return keras.Model(inputs, shared(shared(inner(inputs))))


class WeightNormalizedDense(layers.Dense):
    """A `call` of its own: the kernel's columns at unit norm, so that its output does not scale with its kernel."""

    def call(self, x):
        norm = keras.ops.sqrt(keras.ops.sum(keras.ops.square(self.kernel), axis=0, keepdims=True))
        return self.activation(keras.ops.matmul(x, self.kernel / norm) + self.bias)


class ShiftedDense(layers.Dense):
    """A `call` of its own that adds a constant after Keras's: scaling the kernel and bias does not scale it."""

    def call(self, x):
        return super().call(x) + 1.0


def own_call_branches():
    """An identity stream whose branches end at layers with a `call` of their own (a branch scale near 0 would be
    0/0 in the weight-normalized one)."""
    inputs = keras.Input((16,))
    x = layers.Dense(16)(inputs)
    for kind in (WeightNormalizedDense, ShiftedDense, WeightNormalizedDense):
        x = x + kind(16)(layers.Dense(32, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(3)(x))


MODELS = {
    "post_activation": resnet,
    "pre_activation": lambda: resnet(post_activation=False),
    "projection": projection_block,
    "transformer": pre_ln_transformer,
    "nested_shared": nested_blocks,
}


def merge_count(model):
    """The additions of the model's graphs, counted independently of `keras_lsuv.residual`."""
    count = 0
    for layer in model._flatten_layers(include_self=True):
        for operation in getattr(layer, "operations", []):
            count += type(operation).__name__ == "Add"
    return count


@pytest.mark.parametrize("name", MODELS)
def test_every_merge_measures_the_target_variance_on_the_model(name):
    model = MODELS[name]()
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")  # the oracle re-measures every merge and layer
    assert report.residual == "stream"
    assert len(report.merges) == merge_count(model)
    solved = [m for m in report.merges if not m.skipped]
    assert solved and all(m.converged for m in solved), str(report)
    report.assert_converged()
    merged = zoo.output_variances(model, x, [m.operation for m in solved])
    assert all(abs(merged[m.operation] - 1.0) < 0.1 for m in solved), merged


def test_a_post_activation_stream_keeps_unit_variance_where_plain_lsuv_lets_it_grow():
    plain, stream = resnet(blocks=6), resnet(blocks=6)
    x = zoo.batch_for(plain)
    zoo.run(plain, x)
    report = zoo.run(stream, x, residual="stream")
    adds = lambda model: [layer for layer in model.layers if isinstance(layer, layers.Add)]  # noqa: E731
    grown = zoo.output_variances(plain, x, adds(plain))
    kept = zoo.output_variances(stream, x, adds(stream))
    assert max(grown.values()) > 1.5, grown
    assert all(abs(value - 1.0) < 0.1 for value in kept.values()), kept
    # each branch's last conv was scaled down with its merge, and its record says so
    for merge in report.merges:
        (layer,) = merge.branch_layers
        assert 0 < merge.scale < 1 and f"merge '{merge.name}'" in report[layer].reason


def test_an_identity_stream_that_already_carries_the_target_gets_its_branches_scaled_to_the_least_variance():
    model = resnet(blocks=3, post_activation=False)
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")
    later = [m for m in report.merges if m.stream_variance is not None and m.stream_variance >= 1.0]
    for merge in later:
        least = max(0.0, -(merge.initial_variance - merge.stream_variance - merge.branch_variance) / 2)
        assert merge.final_variance <= merge.stream_variance + 1e-6
        assert merge.scale < 0.5 or least > 0, merge


def test_both_branches_of_a_projection_block_share_one_scale():
    model, plain = projection_block(), projection_block()
    plain.set_weights(model.get_weights())
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")
    plain_report = zoo.run(plain, x)
    (merge,) = report.merges
    assert merge.stream_variance is None and merge.branches == ["shortcut", "main"]
    for name in merge.branches:  # each is plain LSUV's scale times the merge's
        expected = merge.scale * plain_report[plain.get_layer(name)].scale
        assert report[model.get_layer(name)].scale == pytest.approx(expected, rel=1e-4)


def test_a_merge_with_no_scaling_path_is_left_alone_and_the_kernels_are_those_of_plain_lsuv():
    def model_with(beta):
        inputs = keras.Input((8, 8, 3))
        x = layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
        h = layers.Conv2D(6, 3, padding="same", activation="tanh")(x)  # tanh does not scale with its input
        norm = layers.BatchNormalization(beta_initializer=keras.initializers.Constant(beta))
        g = norm(layers.Conv2D(6, 3, padding="same")(x))  # a non-zero offset: no scaling path either
        return keras.Model(inputs, layers.Add()([x, h, g]))

    model, plain = model_with(0.5), model_with(0.5)
    plain.set_weights(model.get_weights())
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")
    zoo.run(plain, x)
    (merge,) = report.merges
    assert merge.skipped and "no input is a branch" in merge.reason
    for a, b in zip(zoo.weights_of(model), zoo.weights_of(plain), strict=True):
        np.testing.assert_array_equal(a, b)


def test_centering_holds_through_the_branch_scale():
    model = resnet(blocks=3)
    x = zoo.batch_for(model) + np.float32(1.0)
    report = zoo.initialize_and_check(model, x, residual="stream", center=True)  # the oracle checks channel means
    assert all(m.converged for m in report.merges)


def test_the_guard_takes_a_constant_bias_scaled_with_its_branch_for_a_fresh_one():
    inputs = keras.Input((16,))
    x = layers.Dense(16, activation="relu")(inputs)
    h = layers.Dense(16, bias_initializer=keras.initializers.Constant(0.1), name="branch")(x)
    model = keras.Model(inputs, layers.Dense(3)(layers.Activation("relu")(layers.Add()([x, h]))))
    x = zoo.batch_for(model)
    assert trained_weights_evidence(model) is None
    report = zoo.initialize_and_check(model, x, residual="stream")
    assert report.merges[0].scale != 1.0  # the constant bias was scaled
    assert trained_weights_evidence(model) is None


def test_a_failure_after_the_merges_restores_every_weight_they_scaled():
    inputs = keras.Input((8, 8, 3))
    x = resnet(blocks=2)(inputs)
    x = layers.Lambda(lambda t: keras.ops.log(t - 1e3))(x)  # NaN: the layer after it cannot be measured
    model = keras.Model(inputs, layers.Dense(3)(x))
    x = zoo.batch_for(model)
    model(x[:2])
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match="non-finite"):
        zoo.run(model, x, residual="stream")
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_callback_runs_it_and_the_report_round_trips():
    model = resnet(blocks=2)
    x = zoo.batch_for(model, n=32)
    y = np.zeros(32, "int32")
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = keras_lsuv.LSUVCallback(x, residual="stream", verbose=0, seed=0)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    report = callback.report
    assert len(report.merges) == 2 and all(m.converged for m in report.merges)
    assert LSUVReport.from_dict(report.to_dict()) == report
    assert "branch var" in str(report) and "2/2 merges converged" in str(report)
    assert "lsuv-merges" in report._repr_html_()


def test_assert_converged_names_a_merge_that_missed():
    report = LSUVReport(
        residual="stream",
        merges=[keras_lsuv.MergeRecord("add_3", initial_variance=3.0, final_variance=2.0, reason="far")],
    )
    with pytest.raises(AssertionError, match="merge 'add_3': far"):
        report.assert_converged()


@pytest.mark.parametrize("bad", ["streams", 1, True])
def test_a_bad_residual_mode_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="residual must be None or one of"):
        keras_lsuv.LSUVOptions(residual=bad)


def test_the_submodel_engine_refuses_it():
    with pytest.raises(ValueError, match="needs engine='single_pass'"):
        keras_lsuv.LSUVCallback(np.zeros((4, 3)), residual="stream", engine="submodel")


@pytest.mark.parametrize(
    "stream, branch, covariance", [(0.3, 1.0, 0.0), (0.0, 2.0, 0.0), (0.8, 1.0, 0.3), (1.5, 1.0, 0.2), (1.2, 1.0, -0.5)]
)
def test_branch_scale_reaches_the_goal_or_the_least_variance(stream, branch, covariance):
    scale, reachable = branch_scale(stream, branch, covariance, goal=1.0)
    assert scale >= 0
    if reachable:
        assert merge_variance(stream, branch, covariance, scale) == pytest.approx(1.0)
    else:
        grid = np.linspace(0, 3, 3001)
        least = min(merge_variance(stream, branch, covariance, s) for s in grid)
        assert merge_variance(stream, branch, covariance, scale) <= least + 1e-9


class FeaturePyramid(keras.Model):
    """A Functional model built from another one's tensors (as keras-hub's `DeepLabV3Backbone` builds its pyramid
    from its encoder's): the encoder's first merge belongs to both graphs; the encoder is tracked, not called."""

    def __init__(self):
        encoder = resnet(blocks=2)
        first = [layer for layer in encoder.layers if isinstance(layer, layers.Add)][0]
        features = keras.Model(encoder.inputs, first.output)
        inputs = keras.Input((8, 8, 3))
        super().__init__(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(features(inputs))))
        self.encoder = encoder
        self.first = first


def test_a_merge_in_two_graphs_has_one_record_and_is_solved():
    model = FeaturePyramid()
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")
    records = [m for m in report.merges if m.operation is model.first]
    assert len(records) == 1 and not records[0].skipped and records[0].converged, str(report)
    assert len({id(m.operation) for m in report.merges}) == len(report.merges)


def test_a_branch_ending_at_a_layer_with_its_own_call_is_no_branch():
    model = own_call_branches()
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")  # merges, and the layers after, re-measured
    assert len(report.merges) == 3
    for merge in report.merges:
        assert merge.skipped and "has a `call` of its own" in merge.reason, merge
    assert np.isfinite(keras.ops.convert_to_numpy(model(x))).all()


class ShiftedAttention(layers.MultiHeadAttention):
    """Attention with a `call` of its own that adds a constant after the output projection."""

    def call(self, query, value, key=None, **kwargs):
        return super().call(query, value, key, **kwargs) + 1.0


def test_an_attention_branch_with_a_call_of_its_own_is_no_branch():
    inputs = keras.Input((6, 16))
    x = layers.Dense(16, name="embed")(inputs)
    h = layers.LayerNormalization()(x)
    x = x + ShiftedAttention(2, 8)(h, h)  # U + s·(A + 1) is not what scaling the projection by s gives
    model = keras.Model(inputs, layers.Dense(3)(x))
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")  # the merge and the head re-measured
    (merge,) = report.merges
    assert merge.skipped and "has a `call` of its own" in merge.reason, merge


@pytest.mark.parametrize("build", [normalized_blocks, lambda: projection_block(normalization=True)])
def test_a_merge_after_a_batch_normalization_is_left_alone_as_training_would_undo_its_scale(build):
    model = build()
    x = zoo.batch_for(model)
    model(x[:2])
    norms = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    before = [zoo.weights_of(norm) for norm in norms]
    # the oracle measures every merge reported converged in the forward pass `fit` runs too
    report = zoo.initialize_and_check(model, x, residual="stream")
    assert report.merges
    for merge in report.merges:
        assert merge.skipped and "BatchNormalization" in merge.reason and "training (fit)" in merge.reason, merge
    for norm, weights in zip(norms, before, strict=True):
        for a, b in zip(weights, zoo.weights_of(norm), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_batch_normalization_after_the_merges_leaves_them_solved_and_they_hold_in_training():
    inputs = keras.Input((8, 8, 3))
    x = resnet(blocks=2)(inputs)
    model = keras.Model(inputs, layers.Dense(3)(layers.BatchNormalization()(x)))
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")  # training-mode merges measured too
    assert len(report.merges) == 2 and all(m.converged for m in report.merges), str(report)


def test_a_run_that_solves_no_merge_says_so_in_one_warning():
    model = zoo.SharedAlongTheChain()  # `h + ...` inside a subclassed model's call: no graph node
    x = zoo.batch_for(model)
    with pytest.warns(UserWarning, match=r"found no addition .* subclassed model's `call`"):
        zoo.run(model, x, residual="stream")

    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    h = layers.Conv2D(6, 3, padding="same", activation="tanh")(x)  # tanh does not scale with its input
    model = keras.Model(inputs, layers.Add()([x, h]))
    warned = []
    zoo.initialize_and_check(model, zoo.batch_for(model), warned=warned, residual="stream")
    (warning,) = [w for w in warned if "no merge" in str(w.message)]
    assert "saw 1 merge in" in str(warning.message) and "no input is a branch" in str(warning.message)


def test_no_such_warning_where_a_merge_is_solved():
    warned = []
    model = resnet(blocks=2)
    zoo.initialize_and_check(model, zoo.batch_for(model), warned=warned, residual="stream")
    assert not [w for w in warned if "residual='stream'" in str(w.message)], [str(w.message) for w in warned]


def test_a_branch_layer_record_names_its_merge_in_a_field():
    model = resnet(blocks=3, post_activation=False)  # later branches are scaled far below the target
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")  # every record names a merge iff it ends a branch
    for merge in report.merges:
        (layer,) = merge.branch_layers
        assert report[layer].merge == merge.name and report[layer].to_dict()["merge"] == merge.name
    assert report.records[0].merge is None and report.records[0].to_dict()["merge"] is None
    assert min(report[m.branch_layers[0]].final_variance for m in report.merges) < 0.5
    assert LSUVReport.from_dict(report.to_dict()) == report


def test_merges_are_listed_in_the_order_the_pass_reaches_them():
    inputs = keras.Input((8, 8, 3))
    x = resnet(blocks=2)(inputs)  # the inner merges come first in the pass, after the outer ones in the graph walk
    h = layers.Dense(10, activation="tanh")(x)
    model = keras.Model(inputs, layers.Add(name="outer")([x, h]))  # skipped: tanh, no branch
    x = zoo.batch_for(model)
    model(x[:2])
    operations = [op for layer in model._flatten_layers() for op in getattr(layer, "operations", [])]
    adds = [op for op in operations if type(op).__name__ == "Add"]
    order = []
    with zoo.recorded_calls(adds, lambda operation, *_: order.append(operation)):
        model(x, training=False)
    report = zoo.initialize_and_check(model, x, residual="stream")
    assert [m.operation for m in report.merges] == order and order[-1].name == "outer"


@pytest.fixture
def mixed_float16():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy(policy)


def test_a_branch_scale_float16_cannot_hold_is_bounded_and_reported(mixed_float16):
    inputs = keras.Input((16,))
    x = layers.Dense(16, activation="relu")(inputs)  # the stream: variance about 0.34
    # a branch of variance 1e-8 (leaky relu of a pre-activation near -10) needs a scale of about 8000, which its
    # bias (-80000) and pre-activation cannot hold in float16
    h = layers.Dense(16, bias_initializer=keras.initializers.Constant(-10.0), name="branch")(x)
    h = layers.LeakyReLU(negative_slope=1e-4)(h)
    model = keras.Model(inputs, layers.Dense(3)(layers.Add()([x, h])))
    x = zoo.batch_for(model)
    warned = []
    report = zoo.initialize_and_check(model, x, warned=warned, residual="stream")  # weights finite, merge measured
    (merge,) = report.merges
    assert not merge.skipped and not merge.converged and "float16" in merge.reason, merge
    assert any(f"merge '{merge.name}'" in str(w.message) and "float16" in str(w.message) for w in warned)
    assert np.isfinite(keras.ops.convert_to_numpy(model(x))).all()


@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
def test_a_centered_bfloat16_branch_is_measured_again_after_its_merge(policy):
    """Under bfloat16 a branch's last layer may end off center (inputs far off zero: the dtype rounds its bias), and
    its merge's output, predicted from the branch rounded once, differs from what the layer computes at the scaled
    kernel and bias: both are measured again on the model, and the records say what they measure."""
    inputs = keras.Input((16,))
    stream = layers.Dense(16, activation="relu")(layers.Dense(16)(inputs))
    branch = layers.Dense(16, name="branch_end")(inputs)
    model = keras.Model(inputs, layers.Dense(4)(layers.Add()([stream, branch])))
    x = zoo.batch_for(model) * np.float32(0.01) + np.float32(1.0)
    warned = []
    report = zoo.initialize_and_check(model, x, center=True, residual="stream", warned=warned)
    end = report[model.get_layer("branch_end")]
    assert end.merge == "add" and not end.converged and "after its merge" in end.reason, end
    assert any("'branch_end'" in str(warning.message) for warning in warned)
