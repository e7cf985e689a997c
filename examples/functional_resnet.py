"""LSUV on a functional ResNet-style CNN with residual adds, on generated images.

Run: KERAS_BACKEND=tensorflow .venv/bin/python examples/functional_resnet.py   (any backend)

`lsuv_init` rescales every convolution, including the 1x1 projection shortcuts, each on the input it receives in
one forward pass through the graph, so a layer after an `Add` is scaled on the sum it actually sees.
"""

import keras
import numpy as np

import keras_lsuv


def residual_block(x, filters, stride):
    """Two 3x3 convolutions and a shortcut (a strided 1x1 convolution when the shape changes), added."""
    h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", activation="relu")(x)
    h = keras.layers.Conv2D(filters, 3, padding="same")(h)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride)(x)
    return keras.layers.Activation("relu")(keras.layers.Add()([h, shortcut]))


def small_resnet(classes=4):
    """A stem, three residual blocks (16, 32, 32 filters) and a global-average-pooled classifier on 16x16 RGB."""
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    for filters, stride in [(16, 1), (32, 2), (32, 1)]:
        h = residual_block(h, filters, stride)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(h))


def make_data(rng, n):
    """Noisy images whose class is the quadrant holding a bright 6x6 square."""
    x = rng.normal(scale=0.5, size=(n, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 4, size=n).astype("int32")
    for image, label in zip(x, y, strict=True):
        row, column = divmod(int(label), 2)
        image[8 * row + 1 : 8 * row + 7, 8 * column + 1 : 8 * column + 7] += 2.0
    return x, y


def main():
    """Initializes the ResNet with LSUV in `fit` (callback) and trains it 2 epochs; returns report and history."""
    rng = np.random.default_rng(0)
    x_train, y_train = make_data(rng, 256)
    keras.utils.set_random_seed(0)
    model = small_resnet()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    lsuv = keras_lsuv.LSUVCallback(x_train[:128], seed=0, verbose=2)
    history = model.fit(x_train, y_train, epochs=2, batch_size=64, callbacks=[lsuv], verbose=0)
    print(f"training accuracy per epoch: {[round(v, 3) for v in history.history['accuracy']]}")
    return lsuv.report, history


if __name__ == "__main__":
    main()
