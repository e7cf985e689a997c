"""Prints the device Keras computes on, and checks that LSUV's kernels and outputs live there.

Run: KERAS_BACKEND=jax python scripts/which_device.py   (exits 1 when the backend sees no GPU)
"""

import sys

import keras
import numpy as np

import keras_lsuv


def device_of(tensor):
    # Each framework names a tensor's device its own way; Keras has no portable accessor.
    backend = keras.backend.backend()
    if backend == "jax":
        return ",".join(str(d) for d in tensor.devices())
    if backend == "torch":
        return str(tensor.device)
    return tensor.device


def main():
    model = keras.Sequential(
        [keras.Input((32, 32, 3))]
        + [keras.layers.Conv2D(16, 3, padding="same", activation="relu") for _ in range(8)]
        + [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    )
    x = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype("float32")
    report = keras_lsuv.lsuv_init(model, x, seed=0, verbose=0)
    kernel = model.layers[0].kernel.value
    output = model(x[:2])
    devices = {device_of(kernel), device_of(output)}
    print(
        f"{keras.backend.backend()}: kernel on {device_of(kernel)}, output on {device_of(output)}, "
        f"LSUV converged: {report.converged}"
    )
    on_gpu = all("cuda" in d.lower() or "gpu" in d.lower() for d in devices)
    print(f"{keras.backend.backend()}: {'GPU' if on_gpu else 'NOT ON A GPU'}")
    return 0 if on_gpu and report.converged else 1


if __name__ == "__main__":
    sys.exit(main())
