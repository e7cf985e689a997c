import keras
import numpy as np
import pytest

from keras_lsuv.targets import find_targets, redraw_orthonormal


def built(layer, input_shape):
    layer.build(input_shape)
    return layer


def assert_orthonormal(matrix):
    rows, cols = matrix.shape
    gram = matrix.T @ matrix if rows >= cols else matrix @ matrix.T
    np.testing.assert_allclose(gram, np.eye(min(rows, cols)), atol=1e-5)


def kernel(variable):
    return keras.ops.convert_to_numpy(variable).astype("float64")


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (keras.layers.Dense(12), (None, 30)),
        (keras.layers.Conv1D(6, 3), (None, 10, 4)),
        (keras.layers.Conv2D(16, 3), (None, 8, 8, 3)),
        (keras.layers.Conv3D(4, 2), (None, 4, 4, 4, 2)),
    ],
)
def test_plain_kernels_are_orthonormal_as_fan_in_by_fan_out(layer, input_shape):
    target = find_targets(keras.Sequential([built(layer, input_shape)]))[0]
    redraw_orthonormal(target, np.random.default_rng(0))
    w = kernel(layer.kernel)
    assert_orthonormal(w.reshape(-1, w.shape[-1]))


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (keras.layers.Conv1DTranspose(5, 3, strides=2), (None, 6, 4)),
        (keras.layers.Conv2DTranspose(3, 3, strides=2), (None, 6, 6, 8)),
        (keras.layers.Conv3DTranspose(2, 2), (None, 3, 3, 3, 16)),
    ],
)
def test_transposed_kernels_are_orthonormal_over_their_own_fan_in(layer, input_shape):
    target = find_targets(keras.Sequential([built(layer, input_shape)]))[0]
    redraw_orthonormal(target, np.random.default_rng(0))
    w = kernel(layer.kernel)  # (*k, filters, in_channels)
    channels = w.shape[-1]
    assert_orthonormal(np.moveaxis(w, -1, 0).reshape(channels, -1))  # (in, prod(k)·filters)


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (None, 8, 8, 5)),
        (keras.layers.DepthwiseConv1D(4, depth_multiplier=3), (None, 9, 6)),
    ],
)
def test_depthwise_kernels_are_orthonormal_per_channel(layer, input_shape):
    target = find_targets(keras.Sequential([built(layer, input_shape)]))[0]
    redraw_orthonormal(target, np.random.default_rng(0))
    w = kernel(layer.kernel)  # (*k, in, multiplier)
    per_channel = np.moveaxis(w, -2, 0).reshape(w.shape[-2], -1, w.shape[-1])
    for matrix in per_channel:
        assert_orthonormal(matrix)
    assert not np.allclose(per_channel[0], per_channel[1])


def test_separable_conv_redraws_both_kernels():
    layer = built(keras.layers.SeparableConv2D(6, 3, depth_multiplier=2), (None, 8, 8, 4))
    target = find_targets(keras.Sequential([layer]))[0]
    redraw_orthonormal(target, np.random.default_rng(0))
    depthwise = kernel(layer.depthwise_kernel)
    for matrix in np.moveaxis(depthwise, -2, 0).reshape(4, 9, 2):
        assert_orthonormal(matrix)
    pointwise = kernel(layer.pointwise_kernel)
    assert_orthonormal(pointwise.reshape(-1, 6))
    assert target.scaled_kernel is layer.pointwise_kernel


def test_same_seed_same_kernels_on_every_call():
    def draw(seed):
        layer = built(keras.layers.Dense(8), (None, 8))
        redraw_orthonormal(find_targets(keras.Sequential([layer]))[0], np.random.default_rng(seed))
        return kernel(layer.kernel)

    np.testing.assert_array_equal(draw(1), draw(1))
    assert not np.allclose(draw(1), draw(2))


def test_targets_are_found_in_nested_models_and_composite_layers_once():
    inner = keras.Sequential([keras.layers.Dense(8)], name="inner")
    inputs = keras.Input((4, 8))
    attention = keras.layers.MultiHeadAttention(2, 4, name="mha")
    h = attention(inputs, inputs)
    shared = keras.layers.Dense(8, name="shared")
    h = shared(shared(inner(h)))
    model = keras.Model(inputs, keras.layers.LayerNormalization()(h))
    names = [t.layer.name for t in find_targets(model)]
    assert sorted(names) == sorted(["query", "key", "value", "attention_output", "dense", "shared"])
    assert len(names) == len(set(names))


def test_linear_shortcut_only_for_keras_own_call():
    class Custom(keras.layers.Dense):
        def call(self, x):
            return super().call(x) ** 2

    plain, custom = built(keras.layers.Dense(2), (None, 3)), built(Custom(2), (None, 3))
    targets = find_targets(keras.Sequential([plain, custom]))
    assert [t.is_linear_in_kernel for t in targets] == [True, False]


def test_channels_first_bias_broadcasts_over_the_channel_axis():
    layer = built(keras.layers.Conv2D(3, 1, data_format="channels_first"), (None, 2, 4, 4))
    layer.bias.assign(np.array([1.0, 2.0, 3.0], "float32"))
    target = find_targets(keras.Sequential([layer]))[0]
    bias = keras.ops.convert_to_numpy(target.bias_term(keras.ops.zeros((5, 3, 4, 4))))
    assert bias.shape == (1, 3, 1, 1)
