import keras
import numpy as np

from keras_lsuv.targets import find_targets


def built(layer, input_shape):
    layer.build(input_shape)
    return layer


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
