"""`center=True`: every target's pre-activation at zero mean per channel and unit variance, measured on the model."""

import keras
import numpy as np
import pytest
import zoo

import keras_lsuv
from keras_lsuv.centering import NO_BIAS_REASON
from keras_lsuv.guard import trained_weights_evidence, training_evidence

layers = keras.layers


class SquaredDense(layers.Dense):
    """A `call` of its own: LSUV re-evaluates it at each scale instead of using the closed form."""

    def call(self, x):
        return super().call(x) + 0.1 * keras.ops.square(super().call(x))


class BiasGainDense(layers.Dense):
    """Adds its bias with a gain: `x·W + gain·b` (a `call` of its own, so evaluated again at each scale)."""

    def __init__(self, units, gain, **kwargs):
        super().__init__(units, **kwargs)
        self.gain = gain

    def call(self, x):
        return self.activation(keras.ops.matmul(x, self.kernel) + self.gain * self.bias)


def bias_gain_model(gain, calls):
    """A `BiasGainDense` called `calls` times per pass (twice: rescaled by whole passes), then a Dense head."""
    inputs = keras.Input((16,))
    h, block = inputs, BiasGainDense(16, gain, activation="tanh", name="gain")
    for _ in range(calls):
        h = block(h)
    return keras.Model(inputs, layers.Dense(3, name="head")(h))


def channels_first_cnn():
    if keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow's CPU convolutions do not run channels_first")
    return keras.Sequential(
        [
            keras.Input((3, 8, 8)),
            layers.Conv2D(6, 3, data_format="channels_first", activation="relu"),
            layers.Conv2D(4, 3, data_format="channels_first"),
        ]
    )


def mixed_biases():
    """A custom `call`, a layer without bias, and a shared layer (called twice: rescaled by whole passes)."""
    inputs = keras.Input((16,))
    h = SquaredDense(24, activation="tanh", name="custom")(inputs)
    h = layers.Dense(24, activation="relu", use_bias=False, name="no_bias")(h)
    shared = layers.Dense(24, activation="tanh", name="shared")
    return keras.Model(inputs, layers.Dense(3, name="head")(shared(shared(h))))


MODELS = {
    "deep_mlp": lambda: zoo.deep_mlp(depth=4),
    "residual_cnn": zoo.residual_cnn,
    "nested": zoo.nested_model,
    "transformer": zoo.small_attention,
    "subclassed_shared": zoo.Subclassed,
    "channels_first": channels_first_cnn,
    "custom_no_bias_shared": mixed_biases,
}


@pytest.mark.parametrize("name", MODELS)
def test_every_channel_is_centered_and_every_variance_unit_as_measured_on_the_model(name):
    model = MODELS[name]()
    x = zoo.batch_for(model) + np.float32(1.5)  # inputs off zero, so that the pre-activations are too
    model(x[:2])
    report = zoo.initialize_and_check(model, x, center=True)  # the oracle checks the channel means and the records
    measured = [r for r in report.records if not r.skipped]
    assert measured and all(r.converged for r in measured)
    assert max(abs(r.initial_mean) for r in measured) > 0.1  # there was something to center


def test_a_block_shared_along_the_chain_is_centered_or_says_it_is_not():
    # Each call of the block feeds the next: centering or scaling one layer moves the channel means and variances of
    # the others (ffn2's variance grows 40-fold for a 1.7-fold scale on torch). Every record the report calls
    # converged is centered and at unit variance as measured on the model (the oracle); the others are warned of.
    model = zoo.SharedAlongTheChain(depth=4)
    x = zoo.batch_for(model, n=128) * np.float32(3.0) + np.float32(1.0)
    warned = []
    report = zoo.initialize_and_check(model, x, warned=warned, center=True)
    assert report[model.proj].converged
    not_converged = {r.name for r in report.records if not r.converged}
    assert not_converged == {w.message.args[0].split("'")[1] for w in warned if "did not converge" in str(w.message)}


def shared_block_between_merges(depth=2):
    """A block (two Dense) called once per depth along a chain, each call followed by a residual branch whose `Add`
    is a node of the Functional graph, so that `residual="stream"` solves its merge (`zoo.SharedAlongTheChain` adds
    inside a subclassed `call`, which residual does not see)."""
    inputs = keras.Input((16,))
    first, second = layers.Dense(32, activation="gelu"), layers.Dense(16)
    h = layers.Dense(16)(inputs)
    for level in range(depth):
        h = layers.Activation("relu")(second(first(h)))
        branch = layers.Dense(16, name=f"branch_end_{level}")(layers.Dense(32, activation="relu")(h))
        h = layers.Add()([h, branch])
    return keras.Model(inputs, layers.Dense(3)(h))


def test_a_branch_scaled_by_its_merge_stays_centered_when_a_shared_block_is_settled():
    # Settling the shared block centers it again, which moved the channel means of the branches its merges had
    # scaled to 0.05-0.07 deviations while their records stayed converged: they are centered again (their bias
    # only, the kernel keeping its merge's scale), and the oracle checks every converged record's channel means.
    model = shared_block_between_merges()
    x = zoo.batch_for(model) * np.float32(2.0) + np.float32(1.0)
    report = zoo.initialize_and_check(model, x, warned=[], center=True, residual="stream")
    branch_ends = [report[model.get_layer(f"branch_end_{level}")] for level in range(2)]
    assert all(r.converged and "with its residual branch at merge" in r.reason for r in branch_ends), str(report)
    solved = {id(layer) for merge in report.merges if not merge.skipped for layer in merge.branch_layers}
    assert all(id(r.layer) in solved for r in branch_ends)


def test_the_submodel_engine_centers_as_the_single_pass_one():
    x = zoo.batch_for(zoo.residual_cnn()) + np.float32(1.5)
    single, reference = zoo.residual_cnn(), zoo.residual_cnn()
    reference.set_weights(single.get_weights())
    zoo.initialize_and_check(single, x, center=True)
    zoo.initialize_and_check(reference, x, center=True, engine="submodel")
    for a, b in zip(zoo.weights_of(single), zoo.weights_of(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


BIAS_GAIN_RUNS = {
    "single_pass": ({}, 1),
    "submodel": ({"engine": "submodel"}, 1),
    "by_passes": ({}, 2),
}


@pytest.mark.parametrize("gain", [2.0, -1.0])
@pytest.mark.parametrize("run", BIAS_GAIN_RUNS)
def test_a_bias_added_with_a_gain_other_than_one_is_centered(gain, run):
    # `bias -= mean` alone alternates between two biases for a gain of 2, and diverges for -1: the correction
    # measures the gain (a secant through the last two biases and means) and converges for any constant gain.
    options, calls = BIAS_GAIN_RUNS[run]
    model = bias_gain_model(gain, calls)
    x = zoo.batch_for(model) + np.float32(1.5)
    report = zoo.initialize_and_check(model, x, center=True, **options)  # the oracle checks the channel means
    assert all(r.converged for r in report.records), str(report)
    assert abs(report[model.get_layer("gain")].initial_mean) > 0.1  # there was something to center


@pytest.mark.parametrize("run", BIAS_GAIN_RUNS)
def test_a_bias_that_does_not_move_the_means_is_reported_not_centered(run):
    options, calls = BIAS_GAIN_RUNS[run]
    model = bias_gain_model(0.0, calls)  # `x·W + 0·b`: no bias can center it
    x = zoo.batch_for(model) + np.float32(1.5)
    warned = []
    report = zoo.initialize_and_check(model, x, warned=warned, center=True, **options)
    record = report[model.get_layer("gain")]
    assert not record.converged and record.reason.startswith("not centered: channel means up to")
    assert "changing its bias leaves its means as they were" in record.reason
    assert any("did not converge" in str(w.message) and "'gain'" in str(w.message) for w in warned)
    assert report[model.get_layer("head")].converged


@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
def test_under_bfloat16_a_channel_the_dtype_cannot_center_is_reported_not_centered(policy):
    # Inputs 100 times their spread off zero: the bias that centers the first layer is about 100 standard deviations
    # of its output, and bfloat16 rounds it to 2^-9 of that, 0.2 deviations: beyond the 5% held in bfloat16.
    model = keras.Sequential([keras.Input((16,)), layers.Dense(8, activation="tanh"), layers.Dense(4)])
    x = zoo.batch_for(model) * np.float32(0.01) + np.float32(1.0)
    warned = []
    report = zoo.initialize_and_check(model, x, warned=warned, center=True)  # converged ones within 5% (bfloat16)
    first = report[model.layers[0]]
    assert not first.converged and first.reason.startswith("not centered:") and "in bfloat16" in first.reason
    assert report[model.layers[1]].converged


def test_a_layer_without_bias_is_scaled_only_and_its_record_says_so():
    model = mixed_biases()
    x = zoo.batch_for(model) + np.float32(1.5)
    report = zoo.initialize_and_check(model, x, center=True)
    record = report[model.get_layer("no_bias")]
    assert record.converged and record.reason == NO_BIAS_REASON
    assert record.final_mean == pytest.approx(record.initial_mean * record.scale, rel=1e-3)  # scaled, not moved
    assert f"ok ({NO_BIAS_REASON})" in str(report)
    assert all(r.reason is None for r in report.records if r.layer.name != "no_bias")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_mixed_precision_layers_are_centered_by_reevaluation(policy):
    model = zoo.deep_mlp(depth=3)
    x = zoo.batch_for(model) + np.float32(1.5)
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    report = zoo.run(model, x, center=True)
    zoo.assert_report_is_true(model, x, report, before)  # the channel means within the tolerance of the dtype
    assert all(w.dtype == np.float32 for w in zoo.weights_of(model))  # the variables keep their own dtype


def test_a_failure_puts_every_bias_back():
    class Fail(layers.Layer):
        def call(self, x):
            return x * np.float32(np.nan)

    inputs = keras.Input((16,))
    h = layers.Dense(16, activation="relu", bias_initializer="ones")(inputs)
    h = layers.Dense(16, activation="relu")(h)
    model = keras.Model(inputs, layers.Dense(4)(Fail()(h)))
    x = zoo.batch_for(model) + np.float32(1.5)
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match="non-finite"):
        zoo.run(model, x, center=True)
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_guard_takes_a_centered_model_for_fresh_and_a_trained_one_for_trained():
    model = zoo.deep_mlp(depth=3)
    x = zoo.batch_for(model) + np.float32(1.5)
    zoo.run(model, x, center=True)
    assert np.any(model.layers[0].bias)  # the biases were set
    assert training_evidence(model) is None  # freshly centered: LSUVCallback may initialize it

    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    callback = keras_lsuv.LSUVCallback(x, center=True, verbose=0)
    model.fit(x, np.zeros(len(x), "int32"), epochs=1, batch_size=len(x), verbose=0, callbacks=[callback])
    assert callback.report.skipped_reason is None and callback.report.center
    assert "bias that is no longer" in trained_weights_evidence(model)  # trained: moved from what LSUV set

    restored = zoo.deep_mlp(depth=3)
    restored.build((None, 16))
    restored.set_weights(model.get_weights())  # trained from what LSUV centered, no optimizer state
    assert "bias that is no longer" in trained_weights_evidence(restored)
    with pytest.warns(UserWarning, match="LSUV skipped: the model's weights look already trained"):
        restored.compile(optimizer="sgd", loss="mse")
        again = keras_lsuv.LSUVCallback(x, center=True, verbose=0)
        restored.fit(x, np.zeros((len(x), 10)), epochs=1, batch_size=len(x), verbose=0, callbacks=[again])
    assert again.report.skipped_reason
