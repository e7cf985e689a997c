"""The models the benchmark measures, and their inputs: conv stacks, an MLP, a small transformer, a GPT-2 block
stack, ResNet50, torch twins, and models whose layers are called several times per forward pass (a Perceiver, a
tiny ALBERT, a siamese tower, a `TimeDistributed` CNN, a shared residual MLP).

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


def perceiver(patches, patch_width, latent, width, heads, blocks, iterations, classes=10):
    """keras.io's Perceiver (`perceiver_image_classification`) on `patches` x `patch_width` inputs (the example's
    patches, flattened), without its data augmentation: a learned `latent` x `width` array, a cross-attention module
    and a transformer module of `blocks` blocks (`heads` x `width` attention, a 2-layer GELU FFN of `width`), each built
    once and called once per each of `iterations` iterations, then average pooling and a 2-layer head."""
    import keras
    from keras import layers

    def ffn(units):
        hidden = [layers.Dense(u, activation="gelu") for u in units[:-1]]
        return keras.Sequential([*hidden, layers.Dense(units[-1]), layers.Dropout(0.1)])

    def cross_attention():
        latent_input = keras.Input((latent, width), name="latent_array")
        data_input = keras.Input((patches, width), name="data_array")
        latent_array = layers.LayerNormalization(epsilon=1e-6)(latent_input)
        data_array = layers.LayerNormalization(epsilon=1e-6)(data_input)
        query = layers.Dense(width)(latent_array)
        key = layers.Dense(width)(data_array)
        value = layers.Dense(width)(data_array)
        attended = layers.Attention(use_scale=True, dropout=0.1)([query, key, value])
        attended = layers.LayerNormalization(epsilon=1e-6)(layers.Add()([attended, latent_array]))
        outputs = layers.Add()([ffn([width, width])(attended), attended])
        return keras.Model({"latent_array": latent_input, "data_array": data_input}, outputs)

    def transformer():
        inputs = keras.Input((latent, width))
        x0 = inputs
        for _ in range(blocks):
            x1 = layers.LayerNormalization(epsilon=1e-6)(x0)
            x2 = layers.Add()([layers.MultiHeadAttention(heads, width, dropout=0.1)(x1, x1), x0])
            x3 = ffn([width, width])(layers.LayerNormalization(epsilon=1e-6)(x2))
            x0 = layers.Add()([x3, x2])
        return keras.Model(inputs, x0)

    class Perceiver(keras.Model):
        def __init__(self):
            super().__init__()
            self.latent_array = self.add_weight(shape=(latent, width), initializer="random_normal")
            self.projection = layers.Dense(width)
            self.position_embedding = layers.Embedding(patches, width)
            self.cross_attention = cross_attention()
            self.transformer = transformer()
            self.pooling = layers.GlobalAveragePooling1D()
            self.head = ffn([width, classes])

        def call(self, inputs):
            encoded = self.projection(inputs) + self.position_embedding(keras.ops.arange(patches))
            latent_array = keras.ops.expand_dims(self.latent_array, 0)
            for _ in range(iterations):
                latent_array = self.cross_attention({"latent_array": latent_array, "data_array": encoded})
                latent_array = self.transformer(latent_array)
            return self.head(self.pooling(latent_array))

    return Perceiver()  # built by its first call, as in the example


def albert_tiny(layers, hidden, heads, vocabulary, sequence_length):
    """keras-hub's `AlbertBackbone` with one group: one transformer layer of `hidden` (`heads` heads, FFN 4x)
    called `layers` times along the chain, on `sequence_length` tokens of a `vocabulary`."""
    from keras_hub.models import AlbertBackbone

    return AlbertBackbone(
        vocabulary_size=vocabulary,
        num_layers=layers,
        num_heads=heads,
        embedding_dim=hidden // 2,
        hidden_dim=hidden,
        intermediate_dim=4 * hidden,
        num_groups=1,
        max_sequence_length=sequence_length,
    )


def albert_inputs(batch, sequence_length, vocabulary):
    """ALBERT's inputs: uniform random token ids (seed 0), one segment, no padding."""
    import numpy as np

    return {
        "token_ids": token_ids(batch, sequence_length, vocabulary),
        "segment_ids": np.zeros((batch, sequence_length), "int32"),
        "padding_mask": np.ones((batch, sequence_length), "int32"),
    }


def siamese(image, filters, embedding):
    """One tower (`filters`-channel Conv2D relu layers, pooling, a Dense `embedding`) applied to two `image` inputs;
    a 2-layer head on `|a - b|` and `a * b`."""
    import keras
    from keras import layers

    tower_input = keras.Input(image)
    x = tower_input
    for count in filters:
        x = layers.Conv2D(count, 3, padding="same", activation="relu")(x)
    tower = keras.Model(tower_input, layers.Dense(embedding)(layers.GlobalAveragePooling2D()(x)), name="tower")
    left, right = keras.Input(image, name="left"), keras.Input(image, name="right")
    a, b = tower(left), tower(right)
    merged = layers.Concatenate()([keras.ops.abs(a - b), a * b])
    hidden = layers.Dense(embedding, activation="relu")(merged)
    return keras.Model({"left": left, "right": right}, layers.Dense(1)(hidden))


def pair_inputs(batch, image):
    """The siamese model's two inputs: standard normal batches (seeds 0 and 1)."""
    import numpy as np

    left, right = (np.random.default_rng(seed).normal(size=(batch, *image)).astype("float32") for seed in (0, 1))
    return {"left": left, "right": right}


def time_distributed_cnn(frames, image, filters, classes=10):
    """`TimeDistributed` Conv2D relu layers of `filters` channels over `frames` frames of `image` (each convolution
    called once per frame), pooling over space and time, a 2-layer head."""
    import keras
    from keras import layers

    inputs = keras.Input((frames, *image))
    x = inputs
    for count in filters:
        x = layers.TimeDistributed(layers.Conv2D(count, 3, padding="same", activation="relu"))(x)
    x = layers.GlobalAveragePooling1D()(layers.TimeDistributed(layers.GlobalAveragePooling2D())(x))
    x = layers.Dense(filters[-1], activation="relu")(x)
    return keras.Model(inputs, layers.Dense(classes)(x))


def shared_mlp(blocks, width, calls, classes=10):
    """A projection to `width`, one sub-model of `blocks` residual MLP blocks (`Dense(width, relu)`, `Dense(width)`,
    added to the block's input) called `calls` times in a row, and a `Dense(classes)` head."""
    import keras
    from keras import layers

    block_input = keras.Input((width,))
    x = block_input
    for _ in range(blocks):
        x = layers.Add()([x, layers.Dense(width)(layers.Dense(width, activation="relu")(x))])
    shared = keras.Model(block_input, x, name="shared_blocks")
    inputs = keras.Input((width,))
    x = layers.Dense(width)(inputs)
    for _ in range(calls):
        x = shared(x)
    return keras.Model(inputs, layers.Dense(classes)(x))
