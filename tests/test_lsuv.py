"""`lsuv_init` end to end: every target of the zoo reaches unit variance; what it leaves alone (frozen, LoRA,
unreached, never built, layers named alike) keeps its kernel; any failure restores every weight; bad input is named."""

import warnings

import keras
import numpy as np
import pytest
import zoo
from keras import layers, ops

ZOO = {
    "deep_mlp": zoo.deep_mlp,
    "residual_cnn": zoo.residual_cnn,
    "nested": zoo.nested_model,
    "subclassed": zoo.Subclassed,
    "transformer": zoo.transformer_block,
    "mobilenet_v2": zoo.mobilenet,
}


@pytest.mark.parametrize("name", ZOO)
def test_every_target_reaches_unit_preactivation_variance(name):
    model = ZOO[name]()
    x = zoo.batch_for(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no layer may fail to converge
        report = zoo.run(model, x)
    processed = [r for r in report.records if not r.skipped]
    assert processed and report.converged
    measured = zoo.preactivation_variances(model, x)
    assert set(measured) == {r.layer for r in processed}
    for layer, value in measured.items():
        assert abs(value - 1.0) < 0.1, f"{name}: {layer.name} has pre-activation variance {value}"
        # The reported variance is the one the layer really has (GPUs convolve float32 in TF32: ~1e-3 apart).
        assert report[layer].final_variance == pytest.approx(value, rel=1e-2)


def test_frozen_layers_are_untouched():
    model = zoo.deep_mlp(depth=4)
    frozen = model.layers[1]
    frozen.trainable = False
    before = np.array(keras.ops.convert_to_numpy(frozen.kernel))
    report = zoo.run(model, zoo.batch_for(model))
    np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(frozen.kernel))
    assert report[frozen.name].skipped and "frozen" in report[frozen.name].reason
    assert report[model.layers[2].name].converged


def test_lora_layer_is_skipped_with_a_reason():
    model = zoo.deep_mlp(depth=3)
    model.layers[0].enable_lora(2)
    report = zoo.run(model, zoo.batch_for(model))
    assert "LoRA" in report[model.layers[0].name].reason
    assert report[model.layers[1].name].converged


def assert_unchanged(before, model):
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_batch_is_rejected_and_nothing_changes(bad):
    model = zoo.deep_mlp(depth=3)
    x = zoo.batch_for(model)
    x[3, 2] = bad
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        zoo.run(model, x)
    assert_unchanged(before, model)


def poisoned_model(error):
    """Two Dense layers (rescaled before the failure), then a layer that fails, then one more Dense."""

    class Fail(keras.layers.Layer):
        armed = False  # set once the graph is built

        def call(self, x):
            if self.armed and error is not None:
                raise error
            return x / 0.0 if self.armed else x

    inputs = keras.Input((16,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    h = keras.layers.Dense(16, activation="relu")(h)
    fail = Fail()
    model = keras.Model(inputs, keras.layers.Dense(4)(fail(h)))
    fail.armed = True
    return model


@pytest.mark.parametrize("engine", ["single_pass", "submodel"])
def test_network_producing_non_finite_values_restores_every_weight(engine):
    model = poisoned_model(None)
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match="non-finite"):
        zoo.run(model, zoo.batch_for(model), engine=engine)
    assert_unchanged(before, model)


def test_interrupt_restores_every_weight_and_propagates():
    model = poisoned_model(KeyboardInterrupt())
    before = zoo.weights_of(model)
    with pytest.raises(KeyboardInterrupt):
        zoo.run(model, zoo.batch_for(model))
    assert_unchanged(before, model)


def test_zero_batch_warns_and_leaves_finite_weights():
    model = zoo.deep_mlp(depth=3)
    with pytest.warns(UserWarning, match="too small to rescale"):
        report = zoo.run(model, np.zeros((32, 16), "float32"))
    assert not report.converged
    assert all(np.isfinite(w).all() for w in zoo.weights_of(model))


def test_unreachable_tolerance_warns_not_converged():
    model = zoo.deep_mlp(depth=2)
    with pytest.warns(UserWarning, match="did not converge"):
        report = zoo.run(model, zoo.batch_for(model), measure="output", max_iterations=2)
    softmax = report.records[-1]
    assert not softmax.converged and softmax.iterations == 2


def test_output_measure_normalizes_the_activation_output():
    model = keras.Sequential([keras.Input((16,))] + [keras.layers.Dense(32, activation="relu") for _ in range(4)])
    x = zoo.batch_for(model)
    zoo.run(model, x, measure="output")
    h = x
    for layer in model.layers:
        h = layer(h)
        assert abs(float(np.var(keras.ops.convert_to_numpy(h))) - 1) < 0.1


def test_seeded_runs_are_reproducible():
    a, b, c = zoo.residual_cnn(), zoo.residual_cnn(), zoo.residual_cnn()
    x = zoo.batch_for(a)
    zoo.run(a, x, seed=5)
    zoo.run(b, x, seed=5)
    zoo.run(c, x, seed=6)
    for wa, wb in zip(zoo.weights_of(a), zoo.weights_of(b), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-6, atol=1e-7)
    assert not np.allclose(zoo.weights_of(a)[0], zoo.weights_of(c)[0])


def test_without_orthonormal_keeps_the_kernel_direction():
    model = zoo.deep_mlp(depth=2)
    before = zoo.weights_of(model)[0]
    report = zoo.run(model, zoo.batch_for(model), orthonormal=False)
    after = zoo.weights_of(model)[0]
    np.testing.assert_allclose(after, before * report.records[0].scale, rtol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_converges_with_float32_kernels(policy):
    keras.config.set_dtype_policy(policy)
    try:
        model = zoo.deep_mlp(depth=4)
        report = zoo.run(model, zoo.batch_for(model))
    finally:
        keras.config.set_dtype_policy("float32")
    assert report.converged
    assert all(keras.backend.standardize_dtype(layer.kernel.dtype) == "float32" for layer in model.layers)


def test_unbuilt_sequential_is_built_and_initialized():
    model = keras.Sequential([keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)])
    report = zoo.run(model, zoo.batch_for(keras.Sequential([keras.Input((16,))])))
    assert model.built and report.converged and len(report.records) == 2


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((0, 16), "float32"), "empty"),
        (np.zeros((8, 15), "float32"), "does not match"),
        (np.array([["a"] * 16] * 4), "numeric"),
        ([np.zeros((8, 16), "float32"), np.zeros((8, 16), "float32")], "input"),
        (None, "None"),
    ],
)
def test_bad_batches_are_rejected_and_nothing_changes(x, message):
    model = zoo.deep_mlp(depth=2)
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match=message):
        zoo.run(model, x)
    assert_unchanged(before, model)


def test_dict_batch_for_a_multi_input_model():
    a, b = keras.Input((4,), name="a"), keras.Input((6,), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(8)(a), keras.layers.Dense(8)(b)])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(2)(h))
    rng = np.random.default_rng(0)
    batch = {"a": rng.normal(size=(32, 4)).astype("float32"), "b": rng.normal(size=(32, 6)).astype("float32")}
    assert zoo.run(model, batch).converged
    with pytest.raises(ValueError, match=r"missing the model input\(s\) \['b'\]"):
        zoo.run(model, {"a": batch["a"]})


@pytest.mark.parametrize(
    "option",
    [
        {"target_variance": 0},
        {"tolerance": -1},
        {"max_iterations": 1.5},
        {"measure": "post"},
        {"engine": "fast"},
        {"verbose": 3},
    ],
)
def test_bad_options_are_rejected(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        zoo.run(zoo.deep_mlp(depth=1), np.zeros((4, 16), "float32"), **option)


def test_trained_model_is_skipped_unless_forced():
    model = zoo.deep_mlp(depth=2)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = zoo.batch_for(model)
    model.fit(x, np.zeros(len(x)), epochs=1, batch_size=32, verbose=0)
    before = zoo.weights_of(model)
    with pytest.warns(UserWarning, match="already been trained"):
        report = zoo.run(model, x)
    assert report.skipped_reason and not report.records
    assert_unchanged(before, model)
    assert zoo.run(model, x, force=True).converged
    assert not np.allclose(before[0], zoo.weights_of(model)[0])


def test_verbose_prints_the_table_and_zero_is_silent(capsys):
    model = zoo.deep_mlp(depth=2)
    zoo.run(model, zoo.batch_for(model), verbose=0)
    assert capsys.readouterr().out == ""
    zoo.run(zoo.deep_mlp(depth=2), zoo.batch_for(model), verbose=2)
    out = capsys.readouterr().out
    assert "initial var" in out and "3/3 layers converged" in out


class TwoHeads(keras.Model):
    """`unused` is never called; `dropout_only` only when training."""

    def __init__(self):
        super().__init__()
        self.body = layers.Dense(16, activation="relu")
        self.unused = layers.Dense(4)
        self.dropout_only = layers.Dense(16)
        self.head = layers.Dense(4)

    def call(self, x, training=False):
        h = self.body(x)
        if training:
            h = self.dropout_only(h)
        return self.head(h)


def test_unreached_layers_keep_their_kernels_and_are_reported():
    model = TwoHeads()
    x = zoo.batch_for(model)
    model(x[:2], training=True)
    model.unused.build((None, 16))
    before = zoo.kernels_by_layer(model)
    with pytest.warns(UserWarning, match="not measured") as caught:
        report = zoo.run(model, x)
    for name in (model.unused.name, model.dropout_only.name):
        assert report[name].skipped and "not reached" in report[name].reason
        assert any(name in str(w.message) for w in caught)
    zoo.assert_report_is_true(model, x, report, before)
    assert report[model.body.name].converged and report[model.head.name].converged


def test_a_layer_the_model_never_builds_is_skipped_and_the_rest_initialized():
    model = TwoHeads()  # `unused` and `dropout_only` are never called, so never built
    x = zoo.batch_for(model)
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    with pytest.warns(UserWarning, match="not measured") as caught:
        report = zoo.run(model, x)
    for layer in (model.unused, model.dropout_only):
        assert not layer.built and report[layer].skipped and "never built" in report[layer].reason
        assert any(f"'{layer.name}' (never built" in str(w.message) for w in caught)
    zoo.assert_report_is_true(model, x, report, before)
    assert report[model.body].converged and report[model.head].converged


def nested_blocks_named_alike():
    """Two nested models each holding a Dense named "proj" (Keras allows equal names across models)."""
    inputs = keras.Input((16,))
    block1 = keras.Sequential([keras.Input((16,)), layers.Dense(16, name="proj")], name="block1")
    block2 = keras.Sequential([keras.Input((16,)), layers.Dense(16, name="proj")], name="block2")
    model = keras.Model(inputs, layers.Dense(2, name="head")(block2(block1(inputs))))
    block2.trainable = False
    return model, block1.layers[0], block2.layers[0]


class NamedAlike(keras.Model):
    """Two Dense layers named "proj"; the second is built but never called."""

    def __init__(self):
        super().__init__()
        self.proj = layers.Dense(16, name="proj")
        self.spare = layers.Dense(16, name="proj")
        self.head = layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.proj(x))


def subclassed_named_alike():
    model = NamedAlike()
    model.spare.build((None, 16))
    return model, model.proj, model.spare


@pytest.mark.parametrize("factory", [nested_blocks_named_alike, subclassed_named_alike])
def test_layers_sharing_a_name_are_told_apart_by_object(factory):
    model, measured_layer, left_alone = factory()
    assert measured_layer.name == left_alone.name
    x = zoo.batch_for(model) * np.float32(3.0)  # far from unit variance: the measured layer must be rescaled
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    report = zoo.run(model, x)
    zoo.assert_report_is_true(model, x, report, before)  # re-measured layer by layer, matched by object
    assert report[measured_layer].converged and report[measured_layer].iterations >= 1
    assert report[left_alone].skipped
    assert abs(zoo.preactivation_variances(model, x)[measured_layer] - 1.0) < 0.1
    assert not np.array_equal(before[measured_layer][0], zoo.kernels_by_layer(model)[measured_layer][0])
    with pytest.raises(ValueError, match="2 layers of the report are named 'proj'"):
        report["proj"]


def test_stateful_rnn_state_is_restored():
    inputs = keras.Input(batch_shape=(32, 5, 8))
    model = keras.Model(inputs, layers.Dense(3)(layers.SimpleRNN(4, stateful=True)(inputs)))
    x = np.random.default_rng(0).normal(size=(32, 5, 8)).astype("float32")
    model(x)  # the state is now the last step's output
    rnn = model.layers[1]
    state = ops.convert_to_numpy(rnn.states[0]).copy()
    assert np.any(state != 0)
    report = zoo.run(model, x * np.float32(3.0), num_samples=32)
    assert report.converged
    np.testing.assert_array_equal(ops.convert_to_numpy(rnn.states[0]), state)


def test_violated_kernel_constraint_is_reported():
    model = keras.Sequential([keras.Input((16,)), layers.Dense(8, kernel_constraint=keras.constraints.MaxNorm(0.5))])
    with pytest.warns(UserWarning, match="kernel_constraint .MaxNorm."):
        report = zoo.run(model, zoo.batch_for(model) * np.float32(0.1))
    assert report.converged
