"""The trained-model guard: LSUVCallback never re-initializes weights that came from training or a checkpoint."""

import warnings

import keras
import numpy as np
import pytest
import zoo

import keras_lsuv
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
