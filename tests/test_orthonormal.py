import math

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_lsuv


def as_matrix(kernel):
    values = keras.ops.convert_to_numpy(keras.ops.cast(kernel, "float32"))
    return values.reshape(-1, values.shape[-1])


def assert_orthonormal(matrix, gain=1.0, atol=1e-5):
    rows, cols = matrix.shape
    gram = matrix.T @ matrix if rows >= cols else matrix @ matrix.T
    np.testing.assert_allclose(gram, gain**2 * np.eye(min(rows, cols)), atol=atol)


@pytest.mark.parametrize(
    "shape",
    [
        (64, 16),  # tall: orthonormal columns
        (16, 64),  # wide: orthonormal rows
        (32, 32),  # square
        (5, 12, 24),  # Conv1D
        (3, 3, 8, 16),  # Conv2D, tall
        (3, 3, 4, 64),  # Conv2D, wide
        (2, 2, 2, 4, 8),  # Conv3D
    ],
)
def test_kernel_is_orthonormal(shape):
    kernel = keras_lsuv.Orthonormal(seed=1)(shape)
    assert tuple(kernel.shape) == shape
    assert_orthonormal(as_matrix(kernel))


def test_gain_scales_the_kernel():
    kernel = keras_lsuv.Orthonormal(gain=2.5, seed=3)((40, 10))
    assert_orthonormal(as_matrix(kernel), gain=2.5, atol=1e-4)


def test_not_the_identity_or_a_permutation():
    matrix = as_matrix(keras_lsuv.Orthonormal(seed=0)((32, 32)))
    assert np.count_nonzero(np.abs(matrix) > 1e-3) > 32 * 16


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_honoured_and_low_precision_stays_orthonormal(dtype):
    kernel = keras_lsuv.Orthonormal(seed=2)((48, 24), dtype=dtype)
    assert keras.backend.standardize_dtype(kernel.dtype) == dtype
    assert_orthonormal(as_matrix(kernel), atol=2e-2)


def test_default_dtype_is_floatx():
    kernel = keras_lsuv.Orthonormal(seed=2)((8, 8))
    assert keras.backend.standardize_dtype(kernel.dtype) == keras.config.floatx()


def test_integer_seed_is_reproducible_across_instances():
    a = keras_lsuv.Orthonormal(seed=7)((20, 10))
    b = keras_lsuv.Orthonormal(seed=7)((20, 10))
    c = keras_lsuv.Orthonormal(seed=8)((20, 10))
    np.testing.assert_array_equal(as_matrix(a), as_matrix(b))
    assert not np.allclose(as_matrix(a), as_matrix(c))


def test_unseeded_instances_differ_but_each_repeats_itself():
    # Keras's convention: an unseeded initializer picks a seed once, at construction.
    first, second = keras_lsuv.Orthonormal(), keras_lsuv.Orthonormal()
    assert not np.allclose(as_matrix(first((16, 16))), as_matrix(second((16, 16))))
    np.testing.assert_array_equal(as_matrix(first((16, 16))), as_matrix(first((16, 16))))


def test_seed_generator_advances():
    initializer = keras_lsuv.Orthonormal(seed=keras.random.SeedGenerator(5))
    a, b = initializer((16, 16)), initializer((16, 16))
    assert not np.allclose(as_matrix(a), as_matrix(b))
    assert_orthonormal(as_matrix(b))


@pytest.mark.parametrize("shape", [(), (7,)])
def test_rank_below_two_is_rejected(shape):
    with pytest.raises(ValueError, match="rank 2 or more"):
        keras_lsuv.Orthonormal()(shape)


@pytest.mark.parametrize("seed", ["1", 1.5, [1]])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        keras_lsuv.Orthonormal(seed=seed)


def test_config_round_trip_gives_the_same_values():
    initializer = keras_lsuv.Orthonormal(gain=0.5, seed=11)
    config = initializer.get_config()
    assert config == {"gain": 0.5, "seed": 11}
    clone = keras_lsuv.Orthonormal.from_config(config)
    np.testing.assert_array_equal(as_matrix(initializer((9, 6))), as_matrix(clone((9, 6))))


def test_serialize_deserialize_through_keras():
    config = keras.initializers.serialize(keras_lsuv.Orthonormal(gain=2.0, seed=4))
    restored = keras.initializers.deserialize(config)
    assert isinstance(restored, keras_lsuv.Orthonormal)
    assert restored.gain == 2.0 and restored.seed == 4


def test_string_alias_builds_a_layer_with_orthonormal_kernel():
    assert isinstance(keras.initializers.get("orthonormal"), keras_lsuv.Orthonormal)
    layer = keras.layers.Conv2D(16, 3, kernel_initializer="orthonormal")
    layer.build((None, 8, 8, 4))
    assert_orthonormal(as_matrix(layer.kernel))


def test_model_round_trips_through_keras_file(tmp_path):
    inputs = keras.Input((12,))
    outputs = keras.layers.Dense(6, kernel_initializer="orthonormal")(inputs)
    hidden = keras.layers.Dense(4, kernel_initializer=keras_lsuv.Orthonormal(gain=3.0, seed=1))(outputs)
    model = keras.Model(inputs, hidden)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for original, restored in zip(model.layers[1:], loaded.layers[1:], strict=True):
        assert isinstance(restored.kernel_initializer, keras_lsuv.Orthonormal)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(original.kernel), keras.ops.convert_to_numpy(restored.kernel)
        )
    assert loaded.layers[2].kernel_initializer.gain == 3.0


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=3),
    st.integers(1, 40),
    st.floats(0.1, 4.0),
    st.integers(0, 2**20),
)
def test_property_any_shape_is_orthonormal(leading, last, gain, seed):
    shape = (*leading, last)
    if len(shape) < 2:
        shape = (1, *shape)
    kernel = keras_lsuv.Orthonormal(gain=gain, seed=seed)(shape)
    assert tuple(kernel.shape) == shape
    matrix = as_matrix(kernel)
    assert matrix.shape == (math.prod(shape[:-1]), shape[-1])
    assert_orthonormal(matrix, gain=gain, atol=1e-4 * max(gain, 1) ** 2)
