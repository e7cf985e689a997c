import keras
import numpy as np
import pytest
from keras import ops

from keras_lsuv import statistics
from keras_lsuv.statistics import moments, on_accelerator, variance


def sample(shape, seed, loc=0.0):
    return np.random.default_rng(seed).normal(loc, 2.0, shape).astype("float32")


def test_variance_is_the_variance_of_every_element():
    z = sample((64, 5, 7), 0, loc=3.0)
    assert variance(keras.ops.convert_to_tensor(z)) == pytest.approx(np.var(z.astype("float64")), rel=1e-5)


@pytest.mark.parametrize("groups", [(7,), (5, 7), (1, 5, 1)])
def test_grouped_moments_give_the_variance_at_any_kernel_scale(groups):
    z = sample((64, 5, 7), 1)
    bias = np.random.default_rng(2).normal(0.0, 3.0, groups)
    stats = moments(keras.ops.convert_to_tensor(z), groups)
    assert stats.mean.size == np.prod(groups)
    for scale in (1.0, 0.25, 3.0):
        expected = np.var(scale * (z.astype("float64") - bias) + bias)
        assert stats.variance(scale, bias.reshape(-1)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("groups", [(7,), (5, 7)])
def test_scaled_and_pooled_moments_are_those_of_the_tensor_at_that_kernel_scale(groups):
    z = sample((64, 5, 7), 4, loc=1.5)
    bias = np.random.default_rng(5).normal(0.0, 3.0, groups)
    scaled = moments(keras.ops.convert_to_tensor(z), groups).scaled(0.3, bias.reshape(-1))
    expected = 0.3 * (z.astype("float64") - bias) + bias
    np.testing.assert_allclose(
        scaled.mean, moments(keras.ops.convert_to_tensor(expected), groups).mean, rtol=1e-5, atol=1e-5
    )
    pooled = scaled.pooled()
    assert pooled.count == z.size and pooled.mean.shape == (1,)
    assert pooled.mean[0] == pytest.approx(np.mean(expected), rel=1e-5)
    assert pooled.variance() == pytest.approx(np.var(expected), rel=1e-5)


def test_large_mean_keeps_the_variance_in_float32():
    z = sample((256, 16), 3, loc=1000.0)  # E[z²] - E[z]² would lose most digits here
    assert variance(keras.ops.convert_to_tensor(z)) == pytest.approx(np.var(z.astype("float64")), rel=1e-4)


@pytest.mark.parametrize("groups", [None, (6,)])
def test_merged_moments_equal_the_moments_of_the_concatenation(groups):
    parts = [sample((n, 6), seed, loc=seed) for seed, n in enumerate((10, 33, 1))]
    merged = moments(keras.ops.convert_to_tensor(parts[0]), groups)
    for part in parts[1:]:
        merged = merged.merge(moments(keras.ops.convert_to_tensor(part), groups))
    whole = moments(keras.ops.convert_to_tensor(np.concatenate(parts)), groups)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-4)
    assert merged.variance() == pytest.approx(np.var(np.concatenate(parts).astype("float64")), rel=1e-5)


def test_merging_different_groupings_is_refused():
    z = keras.ops.convert_to_tensor(sample((8, 6), 4))
    with pytest.raises(ValueError, match="Cannot merge"):
        moments(z).merge(moments(z, (6,)))


def test_non_finite_values_give_non_finite_variance():
    z = sample((8, 4), 5)
    z[3, 1] = np.nan
    assert not np.isfinite(variance(keras.ops.convert_to_tensor(z)))


def test_on_accelerator_says_where_the_backend_computes():
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        expected = jax.default_backend() != "cpu"
    elif backend == "torch":
        import torch

        expected = torch.cuda.is_available()
    else:
        import tensorflow as tf

        expected = bool(tf.config.list_logical_devices("GPU"))
    assert on_accelerator(ops.ones((2, 3))) is expected


def test_the_host_and_the_device_give_the_same_moments(monkeypatch):
    # On a CPU a small tensor is reduced in NumPy (`statistics.on_host`); elsewhere on the device, in float32.
    z = keras.ops.convert_to_tensor(np.random.default_rng(3).normal(2.0, 3.0, size=(64, 5, 8)), "float32")
    assert statistics.on_host(z)
    host = statistics.moments(z, (8,)), statistics.variance(z)
    monkeypatch.setattr(statistics, "on_accelerator", lambda z: True)
    assert not statistics.on_host(z)
    device = statistics.moments(z, (8,)), statistics.variance(z)
    np.testing.assert_allclose(host[0].mean, device[0].mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(host[0].m2, device[0].m2, rtol=1e-5)
    assert host[1] == pytest.approx(device[1], rel=1e-5)
