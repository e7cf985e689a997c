"""LSUV as a callback in `fit`: a 10-layer tanh MLP on scikit-learn's digits.

Run: KERAS_BACKEND=jax .venv/bin/python examples/callback_fit.py   (any backend)

`LSUVCallback` runs `lsuv_init` in `on_train_begin`, on the batch you give it, before the first training step; its
report (one line per layer) is kept in `callback.report`.
"""

import keras
from sklearn.datasets import load_digits

import keras_lsuv


def main():
    """Trains the MLP for 3 epochs with LSUV; returns the LSUV report and the test accuracy."""
    digits = load_digits()
    x = (digits.data.astype("float32") - 8.0) / 8.0
    y = digits.target.astype("int32")
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(32, activation="tanh") for _ in range(10)]
        + [keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    lsuv = keras_lsuv.LSUVCallback(x_train[:256], seed=0, verbose=2)
    model.fit(x_train, y_train, epochs=3, batch_size=50, callbacks=[lsuv], verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy after 3 epochs: {accuracy:.3f}")
    return lsuv.report, accuracy


if __name__ == "__main__":
    main()
