"""LSUV under tf.distribute.MirroredStrategy on 2 logical CPU devices (TensorFlow)."""

import keras
import numpy as np
import pytest

import keras_lsuv

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute runs on TensorFlow")
X = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")


def make_mlp():
    return keras.Sequential(
        [keras.Input((16,))] + [keras.layers.Dense(32, activation="relu") for _ in range(3)] + [keras.layers.Dense(4)]
    )


@pytest.fixture
def strategy():
    import tensorflow as tf

    assert len(tf.config.list_logical_devices("CPU")) == 2
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def reference():
    model = make_mlp()
    keras_lsuv.lsuv_init(model, X, seed=0, verbose=0)
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def assert_every_replica_equals(model, reference):
    for variable, expected in zip(model.weights, reference, strict=True):
        replicas = variable.value.values  # a MirroredVariable: one component per device
        assert len(replicas) == 2
        for component in replicas:
            np.testing.assert_allclose(np.asarray(component), expected, rtol=1e-5, atol=1e-6)


def test_standalone_lsuv_updates_every_replica_with_global_statistics(strategy, reference):
    with strategy.scope():
        model = make_mlp()
    assert keras_lsuv.lsuv_init(model, X, seed=0, verbose=0).converged
    assert_every_replica_equals(model, reference)


def test_callback_in_fit_under_mirrored_strategy(strategy, reference):
    with strategy.scope():
        model = make_mlp()
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    callback = keras_lsuv.LSUVCallback(X, seed=0, verbose=0)
    model.fit(X, np.zeros((64, 4), "float32"), epochs=1, batch_size=16, verbose=0, callbacks=[callback])
    assert callback.report.converged
    assert_every_replica_equals(model, reference)
