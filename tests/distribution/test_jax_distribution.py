"""LSUV under keras.distribution on 4 virtual CPU devices (JAX)."""

import keras
import numpy as np
import pytest

import keras_lsuv

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution runs on JAX")
X = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")


def make_mlp():
    return keras.Sequential(
        [keras.Input((16,))]
        + [keras.layers.Dense(32, activation="relu", name=f"hidden_{i}") for i in range(3)]
        + [keras.layers.Dense(4, name="head")]
    )


def weights(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


@pytest.fixture
def devices():
    found = keras.distribution.list_devices()
    assert len(found) == 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4 (make distribution)"
    return found


@pytest.fixture
def reference():
    """The same model, seed and batch without any distribution."""
    model = make_mlp()
    keras_lsuv.lsuv_init(model, X, seed=0, verbose=0)
    return weights(model)


def data_parallel(devices):
    return keras.distribution.DataParallel(devices=devices)


def model_parallel(devices):
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden_.*kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


@pytest.mark.parametrize("make_distribution", [data_parallel, model_parallel])
def test_standalone_lsuv_matches_the_undistributed_result_and_keeps_layouts(devices, reference, make_distribution):
    with make_distribution(devices).scope():
        model = make_mlp()
        layouts = [w.value.sharding for w in model.weights]
        report = keras_lsuv.lsuv_init(model, X, seed=0, verbose=0)
    assert report.converged
    assert [w.value.sharding for w in model.weights] == layouts
    for a, b in zip(weights(model), reference, strict=True):  # global statistics, not per replica
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_model_parallel_really_shards_the_kernel(devices):
    with model_parallel(devices).scope():
        model = make_mlp()
        keras_lsuv.lsuv_init(model, X, seed=0, verbose=0)
    sharding = model.layers[0].kernel.value.sharding
    assert not sharding.is_fully_replicated and tuple(sharding.spec) == (None, "model")


@pytest.mark.parametrize("make_distribution", [data_parallel, model_parallel])
def test_callback_in_fit_under_distribution(devices, reference, make_distribution):
    with make_distribution(devices).scope():
        model = make_mlp()
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        callback = keras_lsuv.LSUVCallback(X, seed=0, verbose=0)
        model.fit(X, np.zeros((64, 4), "float32"), epochs=1, batch_size=16, verbose=0, callbacks=[callback])
    assert callback.report.converged
    for a, b in zip(weights(model), reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
