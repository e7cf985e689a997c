"""LSUV on a Transformer encoder block (`MultiHeadAttention`), on generated sequences.

Run: KERAS_BACKEND=jax .venv/bin/python examples/transformer_block.py   (any backend)

`MultiHeadAttention` computes its query, key, value and output projections with `EinsumDense` layers; `lsuv_init`
finds and rescales each of them, and the feed-forward `Dense` layers, in the order the forward pass reaches them.
"""

import keras
import numpy as np

import keras_lsuv

SEQUENCE_LENGTH = 12
FEATURES = 32


def transformer_classifier(heads=4):
    """One post-norm encoder block (attention + feed-forward, each with a residual add) and a 2-way classifier."""
    inputs = keras.Input((SEQUENCE_LENGTH, FEATURES))
    attended = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=FEATURES // heads)(inputs, inputs)
    h = keras.layers.LayerNormalization()(keras.layers.Add()([inputs, attended]))
    feed_forward = keras.layers.Dense(4 * FEATURES, activation="gelu")(h)
    feed_forward = keras.layers.Dense(FEATURES)(feed_forward)
    h = keras.layers.LayerNormalization()(keras.layers.Add()([h, feed_forward]))
    pooled = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))


def make_data(rng, n):
    """Random sequences; the label says whether the first and last tokens point the same way."""
    x = rng.normal(size=(n, SEQUENCE_LENGTH, FEATURES)).astype("float32")
    y = (np.sum(x[:, 0] * x[:, -1], axis=-1) > 0).astype("int32")
    return x, y


def main():
    """Initializes the block with LSUV and trains it for 2 epochs; returns the report and the training history."""
    rng = np.random.default_rng(0)
    x_train, y_train = make_data(rng, 512)
    keras.utils.set_random_seed(0)
    model = transformer_classifier()
    report = keras_lsuv.lsuv_init(model, x_train[:128], seed=0, verbose=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0)
    print(f"training loss per epoch: {[round(v, 4) for v in history.history['loss']]}")
    return report, history


if __name__ == "__main__":
    main()
