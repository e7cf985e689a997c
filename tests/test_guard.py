"""The trained-model guard: LSUVCallback never re-initializes weights that came from training or a checkpoint."""

import random
import re
import warnings

import keras
import numpy as np
import pytest
import zoo

import keras_lsuv
from keras_lsuv import guard
from keras_lsuv.guard import trained_weights_evidence

X = zoo.batch_for(keras.Sequential([keras.Input((16,))]), n=64)
LABELS = np.zeros(len(X), "int32")


def train_two_steps(model):
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="sparse_categorical_crossentropy")
    model.fit(X, LABELS, batch_size=32, epochs=1, verbose=0)  # 64 samples, 2 steps
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2


def resume_with_lr_zero(model, callback):
    """`fit` with learning rate 0: the weights after it are the ones training started from."""
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="sparse_categorical_crossentropy")
    model.fit(X, LABELS, batch_size=32, epochs=1, verbose=0, callbacks=[callback])


def assert_same(expected, model):
    for a, b in zip(expected, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def reload_keras_file(path):
    return keras.models.load_model(path, compile=False)


def reload_weights_file(path):
    model = zoo.deep_mlp(depth=3)
    model.load_weights(path)
    return model


@pytest.mark.parametrize(
    "suffix, reload", [(".keras", reload_keras_file), (".weights.h5", reload_weights_file)], ids=["keras", "weights.h5"]
)
def test_reloaded_trained_model_is_left_alone_by_the_callback(tmp_path, suffix, reload):
    trained = zoo.deep_mlp(depth=3)
    train_two_steps(trained)
    path = str(tmp_path / f"model{suffix}")
    trained.save(path) if suffix == ".keras" else trained.save_weights(path)
    model = reload(path)
    loaded = zoo.weights_of(model)
    assert_same(zoo.weights_of(trained), model)
    callback = keras_lsuv.LSUVCallback(X, seed=0, verbose=0)
    with pytest.warns(
        UserWarning, match=r"LSUV skipped: the model's weights look already trained: layer '.*' has a bias"
    ):
        resume_with_lr_zero(model, callback)  # re-compiled: a fresh optimizer with no steps
    assert callback.report.skipped_reason and not callback.report.records
    assert_same(loaded, model)


def test_keras_file_loaded_with_its_optimizer_is_left_alone(tmp_path):
    trained = zoo.deep_mlp(depth=3)
    train_two_steps(trained)
    trained.save(tmp_path / "model.keras")
    model = keras.models.load_model(tmp_path / "model.keras")
    loaded = zoo.weights_of(model)
    model.optimizer.learning_rate.assign(0.0)
    callback = keras_lsuv.LSUVCallback(X, seed=0, verbose=0)
    with pytest.warns(UserWarning, match=r"already been trained \(2 optimizer steps\)"):
        model.fit(X, LABELS, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    assert_same(loaded, model)


def test_trained_model_recompiled_with_a_new_optimizer_is_left_alone():
    model = zoo.deep_mlp(depth=3)
    train_two_steps(model)
    trained = zoo.weights_of(model)
    with pytest.warns(UserWarning, match="look already trained"):
        resume_with_lr_zero(model, keras_lsuv.LSUVCallback(X, seed=0, verbose=0))
    assert_same(trained, model)


def test_fresh_model_still_gets_lsuv_without_a_warning():
    model, reference = zoo.deep_mlp(depth=3), zoo.deep_mlp(depth=3)
    keras_lsuv.lsuv_init(reference, X, seed=0, verbose=0)
    callback = keras_lsuv.LSUVCallback(X, seed=0, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        resume_with_lr_zero(model, callback)
    assert callback.report.converged and callback.report.records
    for a, b in zip(zoo.weights_of(model), zoo.weights_of(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(abs(v - 1) < 0.1 for v in zoo.preactivation_variances(model, X).values())


def test_force_still_forces(tmp_path):
    trained = zoo.deep_mlp(depth=3)
    train_two_steps(trained)
    trained.save_weights(tmp_path / "model.weights.h5")
    model = reload_weights_file(tmp_path / "model.weights.h5")
    loaded = zoo.weights_of(model)
    callback = keras_lsuv.LSUVCallback(X, seed=0, verbose=0, force=True)
    resume_with_lr_zero(model, callback)
    assert callback.report.converged and not callback.report.skipped_reason
    assert not np.allclose(loaded[0], zoo.weights_of(model)[0])  # kernels re-initialized
    for a, b in zip(loaded[1::2], zoo.weights_of(model)[1::2], strict=True):
        np.testing.assert_array_equal(a, b)  # LSUV never touches biases
    assert all(abs(v - 1) < 0.1 for v in zoo.preactivation_variances(model, X).values())


def test_lsuv_init_called_directly_runs_on_trained_weights_but_warns():
    model = zoo.deep_mlp(depth=3)
    train_two_steps(model)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")  # fresh optimizer state
    before = zoo.weights_of(model)
    with pytest.warns(UserWarning, match="look already trained.*LSUVCallback would skip"):
        report = keras_lsuv.lsuv_init(model, X, seed=0, verbose=0)
    assert report.converged and not np.allclose(before[0], zoo.weights_of(model)[0])
    assert all(abs(v - 1) < 0.1 for v in zoo.preactivation_variances(model, X).values())


def test_model_initialized_by_lsuv_still_looks_fresh():
    model = zoo.deep_mlp(depth=3)
    keras_lsuv.lsuv_init(model, X, seed=0, verbose=0)
    assert trained_weights_evidence(model) is None


def test_moved_normalization_statistics_count_and_frozen_layers_do_not():
    inputs = keras.Input((16,))
    backbone = keras.Sequential([keras.layers.Dense(8, use_bias=False), keras.layers.BatchNormalization()])
    head = keras.layers.Dense(3, use_bias=False)
    model = keras.Model(inputs, head(backbone(inputs)))
    assert trained_weights_evidence(model) is None
    batch_norm = backbone.layers[1]
    batch_norm.moving_variance.assign(np.full(8, 0.5, "float32"))
    assert "moving_variance" in trained_weights_evidence(model)
    backbone.trainable = False  # a frozen (say pretrained) backbone: LSUV still initializes the new head
    assert trained_weights_evidence(model) is None
    report = keras_lsuv.lsuv_init(model, X, seed=0, verbose=0)
    assert [r.name for r in report.records if not r.skipped] == [head.name]


def test_constant_bias_initializer_counts_from_its_own_constant():
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(4, bias_initializer=keras.initializers.Constant(0.1))]
    )
    assert trained_weights_evidence(model) is None
    model.layers[0].bias.assign(np.full(4, 0.2, "float32"))
    assert "initial 0.1" in trained_weights_evidence(model)


L = keras.layers
# Every Keras layer with a bias or normalization weights, small: name -> (input shape, layer).
LAYERS = {
    "Dense": ((4,), lambda: L.Dense(3)),
    "EinsumDense": ((4,), lambda: L.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="c")),
    "Conv1D": ((5, 2), lambda: L.Conv1D(3, 2)),
    "Conv2D": ((5, 5, 2), lambda: L.Conv2D(3, 2)),
    "Conv3D": ((4, 4, 4, 2), lambda: L.Conv3D(3, 2)),
    "Conv1DTranspose": ((5, 2), lambda: L.Conv1DTranspose(3, 2)),
    "Conv2DTranspose": ((5, 5, 2), lambda: L.Conv2DTranspose(3, 2)),
    "Conv3DTranspose": ((4, 4, 4, 2), lambda: L.Conv3DTranspose(3, 2)),
    "DepthwiseConv1D": ((5, 2), lambda: L.DepthwiseConv1D(2)),
    "DepthwiseConv2D": ((5, 5, 2), lambda: L.DepthwiseConv2D(2)),
    "SeparableConv1D": ((5, 2), lambda: L.SeparableConv1D(3, 2)),
    "SeparableConv2D": ((5, 5, 2), lambda: L.SeparableConv2D(3, 2)),
    "SimpleRNN": ((5, 2), lambda: L.SimpleRNN(3)),
    "GRU": ((5, 2), lambda: L.GRU(3)),
    "LSTM": ((5, 2), lambda: L.LSTM(3)),
    "Bidirectional(LSTM)": ((5, 2), lambda: L.Bidirectional(L.LSTM(3))),
    "ConvLSTM1D": ((3, 5, 2), lambda: L.ConvLSTM1D(3, 2)),
    "ConvLSTM2D": ((3, 5, 5, 2), lambda: L.ConvLSTM2D(3, 2)),
    "BatchNormalization": ((4,), lambda: L.BatchNormalization()),
    "LayerNormalization": ((4,), lambda: L.LayerNormalization()),
    "GroupNormalization": ((4,), lambda: L.GroupNormalization(2)),
    "MultiHeadAttention": ((3, 4), lambda: L.MultiHeadAttention(num_heads=2, key_dim=2)),
    "TimeDistributed(Dense)": ((3, 4), lambda: L.TimeDistributed(L.Dense(2))),
}
if hasattr(L, "RMSNormalization"):  # Keras 3.9+
    LAYERS["RMSNormalization"] = ((4,), lambda: L.RMSNormalization())
# The names of the weights these layers initialize to a constant.
CONSTANT_NAMES = {"bias", "beta", "gamma", "moving_mean", "moving_variance", "scale"}


def model_with(name):
    shape, make = LAYERS[name]
    inputs = keras.Input(shape)
    layer = make()
    outputs = layer(inputs, inputs) if isinstance(layer, L.MultiHeadAttention) else layer(inputs)
    return keras.Model(inputs, outputs)


def never_rebuilt(*args):
    raise AssertionError(f"a Keras layer was rebuilt: {args}")


@pytest.mark.parametrize("name", LAYERS)
def test_every_fresh_keras_layer_looks_fresh_and_each_moved_weight_is_seen(name, monkeypatch):
    model = model_with(name)
    monkeypatch.setattr(guard, "_freshly_built", never_rebuilt)  # Keras's own layers are known: cheap, fresh or not
    assert trained_weights_evidence(model) is None
    constants = [w for w in model.weights if w.name in CONSTANT_NAMES]
    assert constants
    for weight in constants:
        fresh = np.array(keras.ops.convert_to_numpy(weight))
        moved = fresh.copy()
        moved.flat[0] += 0.25
        weight.assign(moved)
        assert f"has a {weight.name} that is no longer" in (trained_weights_evidence(model) or ""), weight.path
        weight.assign(fresh)
    assert trained_weights_evidence(model) is None


def recurrent_model(name):
    """A Dense target around the recurrent layer, no other bias: the recurrent cells' biases are the evidence."""
    shape, make = {
        "LSTM": ((3, 4), lambda: L.LSTM(4)),
        "Bidirectional(LSTM)": ((3, 4), lambda: L.Bidirectional(L.LSTM(4))),
        "ConvLSTM2D": ((2, 4, 4, 1), lambda: L.ConvLSTM2D(2, 3, padding="same")),
    }[name]
    inputs = keras.Input(shape)
    hidden = L.Flatten()(make()(inputs))
    return keras.Model(inputs, L.Dense(3, activation="softmax", use_bias=False)(hidden))


@pytest.mark.parametrize("name", ["LSTM", "Bidirectional(LSTM)", "ConvLSTM2D"])
def test_callback_initializes_a_fresh_recurrent_model_and_then_sees_it_trained(name):
    model = recurrent_model(name)
    x = zoo.batch_for(model, n=32)
    labels = np.zeros(len(x), "int32")
    before = zoo.kernels_by_layer(model)
    callback = keras_lsuv.LSUVCallback(x, seed=0, verbose=0)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="sparse_categorical_crossentropy")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        # The recurrent kernels are no target: the report lists them, with the one warning that says so.
        warnings.filterwarnings("ignore", "LSUV reached .* of the model's kernel-like parameters", UserWarning)
        model.fit(x, labels, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert not callback.report.skipped_reason and callback.report.records
    after = zoo.kernels_by_layer(model)
    assert all(not np.array_equal(before[layer][0], after[layer][0]) for layer in before)  # LSUV rescaled them
    zoo.assert_report_is_true(model, x, callback.report, before)
    assert trained_weights_evidence(model) is None
    model.optimizer.learning_rate.assign(0.5)
    model.fit(x[:16], labels[:16], batch_size=16, epochs=1, verbose=0)  # one step: the cells' biases move
    assert re.search(r"layer '(conv_)?lstm_cell' has a bias that is no longer", trained_weights_evidence(model))


class OffsetDense(keras.layers.Layer):
    """A custom layer whose build sets its bias from an argument, not from its `bias_initializer`."""

    def __init__(self, units, offset, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.offset = offset
        self.kernel_initializer = keras.initializers.GlorotUniform()  # unseeded: draws a seed from Python's random
        self.bias_initializer = keras.initializers.Zeros()

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer=self.kernel_initializer)
        self.bias = self.add_weight(shape=(self.units,), initializer=keras.initializers.Constant(self.offset))

    def call(self, x):
        return keras.ops.matmul(x, self.kernel) + self.bias


def offset_dense_model(offset):
    inputs = keras.Input((4,))
    return keras.Model(inputs, OffsetDense(3, offset)(inputs))


def test_custom_layer_is_compared_with_a_copy_rebuilt_from_its_config_which_leaves_nothing_behind():
    model = offset_dense_model(0.5)
    layer = model.layers[-1]
    attributes = dict(vars(layer))
    weights = [(w, np.array(keras.ops.convert_to_numpy(w))) for w in model.weights]
    state = random.getstate()
    assert trained_weights_evidence(model) is None
    assert random.getstate() == state  # what keras.utils.set_random_seed makes reproducible stays so
    assert dict(vars(layer)) == attributes
    assert [w for w, _ in weights] == list(model.weights)
    for weight, values in weights:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), values)
    layer.bias.assign(np.array([0.5, 0.5, 0.75], "float32"))
    evidence = trained_weights_evidence(model)
    assert "has a bias that is no longer the initial value its build sets (max |difference| 0.25)" in evidence


def test_custom_layer_that_does_not_rebuild_is_judged_by_its_constant():
    model = offset_dense_model(np.float32(0.5))  # an argument Keras cannot record in the layer's config
    with pytest.raises(NotImplementedError):
        model.layers[-1].get_config()
    assert "has a bias that is no longer its initial 0 (max |difference| 0.5)" in trained_weights_evidence(model)
