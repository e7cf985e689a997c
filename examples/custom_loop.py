"""`lsuv_init` before your own training loop (the same code on TensorFlow, JAX and PyTorch).

Run: KERAS_BACKEND=torch .venv/bin/python examples/custom_loop.py   (any backend)

Call `lsuv_init` once, on a batch of real training inputs, after building the model and before the first update.
The loop below uses `train_on_batch`, which runs one optimizer step on every backend; a loop written with
`tf.GradientTape`, `jax.grad` or `torch.autograd` works the same way after `lsuv_init`.
"""

import keras
import numpy as np

import keras_lsuv


def make_data(rng, n):
    """A toy regression: y = sin(x . w) for 16-dimensional Gaussian x and a fixed direction w."""
    x = rng.normal(size=(n, 16)).astype("float32")
    w = np.linspace(-1.0, 1.0, 16, dtype="float32")
    return x, np.sin(x @ w)[:, None].astype("float32")


def main():
    """Initializes an 8-layer ReLU MLP with LSUV, trains it 60 steps; returns the report and the losses."""
    rng = np.random.default_rng(0)
    x_train, y_train = make_data(rng, 2048)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((16,))] + [keras.layers.Dense(64, activation="relu") for _ in range(8)] + [keras.layers.Dense(1)]
    )

    report = keras_lsuv.lsuv_init(model, x_train[:256], seed=0, verbose=2)

    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    losses = []
    for step in range(60):
        batch = rng.integers(0, len(x_train), size=64)
        loss = model.train_on_batch(x_train[batch], y_train[batch])
        losses.append(float(loss))
        if step % 20 == 0:
            print(f"step {step:3d}  loss {loss:.4f}")
    print(f"mean loss, first 10 steps {np.mean(losses[:10]):.4f}, last 10 steps {np.mean(losses[-10:]):.4f}")
    return report, losses


if __name__ == "__main__":
    main()
