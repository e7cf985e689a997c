"""Demo: a deep MLP whose kernels are drawn by `keras_lsuv.Orthonormal`, on scikit-learn's digits.

Run: make demo   (or: KERAS_BACKEND=jax .venv/bin/python examples/demo.py)

Builds a 12-layer network with `kernel_initializer="orthonormal"`, checks that every kernel is orthonormal
(W^T W = I for tall kernels, W W^T = I for wide ones) and shows the variance of each layer's output on a batch
of real digits.
"""

import keras
import numpy as np
from sklearn.datasets import load_digits

import keras_lsuv  # noqa: F401  (registers "orthonormal")


def build_model(depth=12, width=64):
    model = keras.Sequential([keras.Input((64,))])
    for _ in range(depth):
        model.add(keras.layers.Dense(width, activation="tanh", kernel_initializer="orthonormal"))
    model.add(keras.layers.Dense(10, kernel_initializer="orthonormal"))
    return model


def main():
    x = load_digits().data.astype("float32") / 16.0
    model = build_model()
    print(f"backend: {keras.backend.backend()}")
    print(f"{'layer':<10} {'kernel':>10} {'max |gram - I|':>15} {'output variance':>16}")
    h = x[:256]
    for layer in model.layers:
        w = keras.ops.convert_to_numpy(layer.kernel)
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        h = layer(h)
        variance = float(np.var(keras.ops.convert_to_numpy(h)))
        error = np.abs(gram - np.eye(len(gram))).max()
        print(f"{layer.name:<10} {str(w.shape):>10} {error:>15.1e} {variance:>16.4f}")
        assert error < 1e-5, f"{layer.name} kernel is not orthonormal"


if __name__ == "__main__":
    main()
