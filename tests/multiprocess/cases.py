"""What the multi-process tests run: the model, each process's shard and the options of every case.

Imported by the workers (one per process) and by the test that compares them with a single-process run on the
concatenated shards, so both sides build exactly the same models and data.
"""

import keras
import numpy as np

PROCESSES = 2
FEATURES = 16

# Each case: the options of `lsuv_init`, whether the biases are non-zero, the shard size of each process and, on
# JAX, the distribution (DataParallel unless named; ModelParallel: batch axis over the processes, model axis over
# each process's 2 devices; none: a model of each process's own, whose statistics are merged).
CASES = {
    "nonzero_bias": {"options": {}, "bias": True, "sizes": (64, 64)},
    "zero_bias": {"options": {}, "bias": False, "sizes": (64, 64)},
    "output": {"options": {"measure": "output"}, "bias": True, "sizes": (64, 64)},
    "submodel": {"options": {"engine": "submodel"}, "bias": True, "sizes": (64, 64)},
    "unequal_shards": {"options": {}, "bias": True, "sizes": (40, 88)},
    "seed_none": {"options": {"seed": None}, "bias": True, "sizes": (64, 64)},
    "model_parallel": {"options": {}, "bias": True, "sizes": (64, 64), "distribution": "model_parallel"},
    "not_distributed": {"options": {}, "bias": True, "sizes": (40, 88), "distribution": "none"},
    "centered": {"options": {"center": True}, "bias": True, "sizes": (64, 64)},
    "residual": {"options": {"residual": "stream"}, "bias": True, "sizes": (64, 64), "residual": True},
}
# `fit` with `LSUVCallback` on each process's shard.
FIT = {"options": {}, "bias": True, "sizes": (64, 64)}
# Cases where process 1's shard is bad: every process must raise the same ValueError, weights unchanged. The first
# three fail the batch check; "overflow" is finite but makes the first layer's statistics Inf in process 1 only.
FAILURES = ("nan", "empty", "wrong_shape", "overflow")


def make_model(bias=True, residual=False):
    """4 × Dense(32, relu) + Dense(10), seeded, so that every process and the reference build the same weights.

    With `residual`, hidden layers 1 and 3 are branches added to the outputs of hidden layers 0 and 2 (a Functional
    model with two merges, `add_1` and `add_3`)."""
    bias_initializer = keras.initializers.RandomNormal(stddev=0.5, seed=7) if bias else "zeros"
    layers = [keras.Input((FEATURES,))]
    for i in range(4):
        layers.append(
            keras.layers.Dense(
                32,
                activation="relu",
                kernel_initializer=keras.initializers.GlorotUniform(seed=i),
                bias_initializer=bias_initializer,
                name=f"hidden_{i}",
            )
        )
    layers.append(keras.layers.Dense(10, kernel_initializer=keras.initializers.GlorotUniform(seed=9), name="head"))
    if not residual:
        return keras.Sequential(layers)
    x = layers[0]
    for i in range(4):
        h = layers[i + 1](x)
        x = keras.layers.Add(name=f"add_{i}")([x, h]) if i % 2 else h
    return keras.Model(layers[0], layers[5](x))


def model_for(case):
    """The model of a case."""
    return make_model(case["bias"], case.get("residual", False))


def shard(process, size=64):
    """Process `process`'s own samples: a different seed and mean per process, as different hosts' data would be."""
    rng = np.random.default_rng(process)
    return rng.normal(loc=0.5 * process, size=(size, FEATURES)).astype("float32")


def bad_shard(failure):
    x = shard(1)
    if failure == "nan":
        x[3, 5] = np.nan
        return x
    if failure == "empty":
        return x[:0]
    if failure == "overflow":
        return x * np.float32(1e30)
    return x[:, :-1]  # wrong_shape


def concatenated(sizes):
    return np.concatenate([shard(process, size) for process, size in enumerate(sizes)])


def weights_of(model):
    return [np.array(keras.ops.convert_to_numpy(w)) for w in model.weights]
