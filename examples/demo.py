"""Demo: LSUV on a deep, thin MLP, on scikit-learn's digits.

Run: make demo   (or: KERAS_BACKEND=jax .venv/bin/python examples/demo.py)

`lsuv_init` redraws the kernels of a 20-layer tanh network orthonormally and rescales them layer by layer until
every pre-activation has unit variance on a real batch; the per-layer table shows each layer's variance after
the orthonormal draw ("initial var", shrinking with depth) and after rescaling. Then the same network trains
with plain SGD, once from Keras's default initialization and once with `LSUVCallback` in `fit`.
"""

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_lsuv


def build_model(depth=20, width=32):
    model = keras.Sequential([keras.Input((64,))])
    for _ in range(depth):
        model.add(keras.layers.Dense(width, activation="tanh"))
    model.add(keras.layers.Dense(10, activation="softmax"))
    return model


def main():
    digits = load_digits()
    x = (digits.data.astype("float32") - 8.0) / 8.0
    y = digits.target.astype("int32")
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    print(f"backend: {keras.backend.backend()}\n")

    print("1. lsuv_init on a 20-layer tanh MLP (batch of 256 training digits):")
    report = keras_lsuv.lsuv_init(build_model(), x_train[:256], seed=0, verbose=2)
    assert report.converged

    print("\n2. The same, as a callback in fit(), against Keras's default initialization (SGD, 10 epochs):")
    for name, callbacks in [
        ("glorot_uniform", []),
        ("LSUV", [keras_lsuv.LSUVCallback(x_train[:256], seed=0, verbose=0)]),
    ]:
        keras.utils.set_random_seed(0)
        model = build_model()
        model.compile(
            optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        model.fit(x_train, y_train, epochs=10, batch_size=32, verbose=0, callbacks=callbacks)
        _, accuracy = model.evaluate(x_test, y_test, verbose=0)
        print(f"   {name:<15} test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
