"""How many merges `residual="stream"` solves on keras.applications ConvNeXtTiny and InceptionResNetV2, and the
stream's variance measured after each solved merge in a plain forward pass (inference and the pass `fit` runs).

    KERAS_BACKEND=jax PYTHONPATH=$PWD python scripts/check_branch_layers.py [convnext|inception|both]

Both are built with `weights=None` at the smallest input they accept; a batch of 32 normal images. Not a test (the
InceptionResNetV2 build takes about a minute on 2 CPU cores): the tests use small models of the same layer classes.
"""

import sys
import time

import keras
import numpy as np

import keras_lsuv


def merge_outputs(model, x, operations, training):
    """The variance of each operation's output in one plain forward pass, through an instance-level `call`."""
    found = {}

    def wrap(operation, original):
        def call(*args, **kwargs):
            output = original(*args, **kwargs)
            found[operation] = float(np.var(keras.ops.convert_to_numpy(output).astype("float64")))
            return output

        return call

    for operation in operations:
        vars(operation)["call"] = wrap(operation, operation.call)
    try:
        model(x, training=training)
    finally:
        for operation in operations:
            vars(operation).pop("call")
    return found


def check(name, build, shape):
    start = time.perf_counter()
    model = build(weights=None, input_shape=shape, include_top=True, classes=10, classifier_activation=None)
    built = time.perf_counter() - start
    x = np.random.default_rng(0).normal(size=(32, *shape)).astype("float32")
    start = time.perf_counter()
    report = keras_lsuv.lsuv_init(model, x, residual="stream", seed=0, verbose=0)
    took = time.perf_counter() - start
    merges = report.merges
    solved = [m for m in merges if not m.skipped]
    converged = [m for m in solved if m.converged]
    print(f"{name} {shape}: built in {built:.1f} s, LSUV in {took:.1f} s")
    print(
        f"  merges found {len(merges)} ({sorted({m.class_name for m in merges})}), solved {len(solved)}, converged "
        f"{len(converged)}"
    )
    reasons = sorted({m.reason.split(":")[0] for m in merges if m.skipped})
    print(f"  skipped for: {reasons}")
    inference = merge_outputs(model, x, [m.operation for m in solved], training=False)
    training = merge_outputs(model, x, [m.operation for m in solved], training=True)
    for m in solved:
        measured, in_training = inference[m.operation], training[m.operation]
        print(
            f"  {m.name:10s} scale {m.scale:10.4g} reported {m.final_variance:.4f} measured {measured:.4f} in "
            f"training {in_training:.4f} {'ok' if m.converged else m.reason}"
        )


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "both"
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}")
    if which in ("convnext", "both"):
        check("ConvNeXtTiny", keras.applications.ConvNeXtTiny, (32, 32, 3))
    if which in ("inception", "both"):
        check("InceptionResNetV2", keras.applications.InceptionResNetV2, (75, 75, 3))
