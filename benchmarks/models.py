"""The models the benchmark measures, and their inputs: conv stacks, an MLP, a small transformer, a GPT-2 block
stack, ResNet50, torch twins.

keras-hub's `GPT2Backbone` is not used: keras-hub is installed with `--no-deps` for the tests' sweep only (its
declared dependencies pull `tensorflow-text` and with it the full `tensorflow` beside `tensorflow-cpu`), and the
benchmark keeps to its own models. `gpt2` builds the same block stack from `keras.layers` (pre-norm blocks of
causal `MultiHeadAttention` and a 4x GELU MLP, token and position embeddings, a final `LayerNormalization`): the
same target layers (four `EinsumDense` projections and two `Dense` per block) with the same kernel shapes.
torchvision cannot be installed beside the pinned CPU torch (PyPI's torchvision fails to import with torch 2.13.0),
so `torch_resnet50` is a hand-written torchvision `resnet50` (bottleneck blocks, stride on the 3x3 convolution) for
the `lsuv` peer.
"""

from __future__ import annotations

GPT2_VOCABULARY = 50257


def conv_stack(depth, image, batch_norm=False, filters=16):
    """`depth` Conv2D(`filters`, 3, relu) layers (or Conv2D, BatchNormalization, ReLU)."""
    import keras

    layers = [keras.Input(image)]
    for _ in range(depth):
        if batch_norm:
            layers += [
                keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
            ]
        else:
            layers.append(keras.layers.Conv2D(filters, 3, padding="same", activation="relu"))
    return keras.Sequential(layers)


def classifier(depth, image, batch_norm):
    """`conv_stack` followed by global average pooling and a 10-way Dense, compiled with SGD."""
    import keras

    model = keras.Sequential(
        [conv_stack(depth, image, batch_norm), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    )
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def mlp(depth, width):
    """`depth` Dense(`width`, tanh) layers on `width` features, then a 10-way Dense."""
    import keras

    hidden = [keras.layers.Dense(width, activation="tanh") for _ in range(depth)]
    return keras.Sequential([keras.Input((width,)), *hidden, keras.layers.Dense(10)])


def transformer(blocks, tokens, width, heads, ffn):
    """`blocks` post-norm encoder blocks (`MultiHeadAttention` of `heads` x `width // heads`, a GELU MLP of `ffn`,
    `LayerNormalization` after each residual sum) on `tokens` x `width` float inputs."""
    import keras
    from keras import layers

    inputs = keras.Input((tokens, width))
    x = inputs
    for _ in range(blocks):
        x = layers.LayerNormalization()(x + layers.MultiHeadAttention(heads, width // heads)(x, x))
        h = layers.Dense(ffn, activation="gelu")(x)
        x = layers.LayerNormalization()(x + layers.Dense(width)(h))
    return keras.Model(inputs, x)


def inputs(batch, image):
    """A standard normal float32 batch of `image`-shaped samples (seed 0)."""
    import numpy as np

    return np.random.default_rng(0).normal(size=(batch, *image)).astype("float32")


def gpt2(num_layers, width, num_heads, sequence_length, vocabulary=GPT2_VOCABULARY):
    """A GPT-2 backbone of `num_layers` blocks of `width` (token ids in, hidden states out)."""
    import keras
    from keras import layers

    tokens = keras.Input((sequence_length,), dtype="int32", name="token_ids")
    positions = keras.ops.arange(sequence_length)
    x = layers.Embedding(vocabulary, width, name="token_embedding")(tokens)
    x = x + layers.Embedding(sequence_length, width, name="position_embedding")(positions)
    for i in range(num_layers):
        h = layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_attention_norm")(x)
        h = layers.MultiHeadAttention(num_heads, width // num_heads, name=f"block{i}_attention")(
            h, h, use_causal_mask=True
        )
        x = x + h
        h = layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_mlp_norm")(x)
        h = layers.Dense(4 * width, activation=keras.activations.gelu, name=f"block{i}_mlp_in")(h)
        x = x + layers.Dense(width, name=f"block{i}_mlp_out")(h)
    x = layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    return keras.Model(tokens, x, name=f"gpt2_{num_layers}x{width}")


def token_ids(batch, sequence_length, vocabulary=GPT2_VOCABULARY):
    """Uniform random token ids (seed 0), int32."""
    import numpy as np

    return np.random.default_rng(0).integers(0, vocabulary, size=(batch, sequence_length)).astype("int32")


def resnet50(image_size):
    """`keras.applications.ResNet50` without weights, channels last, 1000 classes."""
    import keras

    return keras.applications.ResNet50(weights=None, input_shape=(image_size, image_size, 3))


def real_label(name, arguments, batch):
    """The label of a config's real model `(name, arguments, batch)`: `"GPT-2 ..."` or `"ResNet50 ..."`."""
    if name == "GPT-2":
        layers, width, _, tokens = arguments
        return f"GPT-2 {layers}x{width}, {batch}x{tokens} tokens"
    (image,) = arguments
    return f"ResNet50 {image}x{image}, batch {batch}"


def real_model(name, arguments, batch):
    """A config's real model `(name, arguments, batch)` and its input batch: `gpt2` on token ids, or `resnet50`."""
    if name == "GPT-2":
        return gpt2(*arguments), token_ids(batch, arguments[3])
    (image,) = arguments
    return resnet50(image), inputs(batch, (image, image, 3))


def torch_conv_stack(depth, channels):
    """`conv_stack` in torch (NCHW): `depth` Conv2d(16, 3, padding=1) / ReLU pairs on `channels` input channels."""
    import torch

    layers = []
    for i in range(depth):
        layers += [torch.nn.Conv2d(channels if i == 0 else 16, 16, 3, padding=1), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def torch_resnet50(blocks=(3, 4, 6, 3), width=64, classes=1000):
    """torchvision's `resnet50` architecture (NCHW), written out: `blocks` bottlenecks per stage."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inputs, planes, stride):
            super().__init__()
            outputs = 4 * planes
            self.body = nn.Sequential(
                nn.Conv2d(inputs, planes, 1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                nn.Conv2d(planes, outputs, 1, bias=False),
                nn.BatchNorm2d(outputs),
            )
            self.shortcut = None
            if stride != 1 or inputs != outputs:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
                )
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.body(x) + (x if self.shortcut is None else self.shortcut(x)))

    stages, inputs = [], width
    for i, count in enumerate(blocks):
        planes = width * 2**i
        for j in range(count):
            stages.append(Bottleneck(inputs, planes, 2 if i > 0 and j == 0 else 1))
            inputs = 4 * planes
    return nn.Sequential(
        nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(inputs, classes),
    )
