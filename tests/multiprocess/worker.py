"""One process of a multi-process LSUV run on localhost; `test_multiprocess.py` starts two of them.

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/multiprocess/worker.py --process-id I --ports P --out DIR
    KERAS_BACKEND=tensorflow python tests/multiprocess/worker.py --process-id I --ports P0,P1 --out DIR

Runs every case of `cases.py` on this process's shard and writes the weights and errors to DIR/process_I.npz and
DIR/process_I.json.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--ports", required=True, help="the coordinator's port (JAX) or every worker's (TF)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    backend = os.environ["KERAS_BACKEND"]
    ports = args.ports.split(",")
    if backend == "tensorflow":
        workers = [f"localhost:{port}" for port in ports]
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": args.process_id}}
        )

    import keras

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(os.path.dirname(here))]  # cases.py, and this checkout's keras_lsuv
    import cases

    import keras_lsuv

    if backend == "jax":
        keras.distribution.initialize(
            job_addresses=f"localhost:{ports[0]}", num_processes=cases.PROCESSES, process_id=args.process_id
        )
        # Numpy inputs are this process's own shard: fit must not split them again.
        data_parallel = keras.distribution.DataParallel(
            devices=keras.distribution.list_devices(), auto_shard_dataset=False
        )
        keras.distribution.set_distribution(data_parallel)
        scopes = {
            "data_parallel": data_parallel.scope,
            "model_parallel": model_parallel(keras).scope,
            "none": without_distribution,
        }
    else:
        import tensorflow as tf

        scopes = {"data_parallel": tf.distribute.MultiWorkerMirroredStrategy().scope}
    scope = scopes["data_parallel"]

    weights, results = {}, {"cases": {}}

    for name, case in cases.CASES.items():
        if case.get("distribution", "data_parallel") not in scopes:
            continue  # ModelParallel and no distribution: JAX only
        case_scope = scopes[case.get("distribution", "data_parallel")]
        x = cases.shard(args.process_id, case["sizes"][args.process_id])
        with case_scope():
            model = cases.model_for(case)
        options = {"seed": 0, "verbose": 0, **case["options"]}
        start = time.perf_counter()
        # Outside the scope (TF: LSUV finds the strategy through the model's variables; JAX: the distribution set
        # with set_distribution), but inside the scope for ModelParallel and once for DataParallel.
        inside = name == "zero_bias" or case_scope is not scope
        try:
            with case_scope() if inside else contextlib.nullcontext():
                report = keras_lsuv.lsuv_init(model, x, **options)
        except ValueError as error:
            results["cases"][name] = {"error": str(error)}
            continue
        results["cases"][name] = {
            "seconds": time.perf_counter() - start,
            "converged": report.converged,
            "curvature": report.curvature,
            "error": None,
        }
        for j, w in enumerate(cases.weights_of(model)):
            weights[f"{name}/{j}"] = w

    for failure in cases.FAILURES:
        x = cases.bad_shard(failure) if args.process_id == 1 else cases.shard(args.process_id)
        with scope():
            model = cases.make_model()
        before = cases.weights_of(model)
        start = time.perf_counter()
        try:
            keras_lsuv.lsuv_init(model, x, seed=0, verbose=0)
            error = None
        except ValueError as raised:
            error = str(raised)
        after = cases.weights_of(model)
        results["cases"][failure] = {
            "seconds": time.perf_counter() - start,
            "error": error,
            "restored": all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)),
        }

    results["cases"]["fit"] = run_fit(args.process_id, scope, weights)
    np.savez(os.path.join(args.out, f"process_{args.process_id}.npz"), **weights)
    with open(os.path.join(args.out, f"process_{args.process_id}.json"), "w") as f:
        json.dump(results, f)
    print(f"process {args.process_id}: done", flush=True)


@contextlib.contextmanager
def without_distribution():
    """No keras.distribution: each process's model lives on its own devices (JAX)."""
    import keras

    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)


def model_parallel(keras):
    """Hidden kernels split over a "model" axis of each process's 2 devices; the batch axis spans the processes."""
    devices = keras.distribution.list_devices()  # process 0's devices first
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden_.*kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False)


def run_fit(process_id, scope, weights):
    """`fit` with `LSUVCallback` and a zero learning rate: the weights after one epoch are LSUV's."""
    import cases
    import keras

    import keras_lsuv

    keras.config.disable_traceback_filtering()  # name Keras's own frames if its fit fails
    x = cases.shard(process_id, cases.FIT["sizes"][process_id])
    y = np.zeros((len(x), 10), "float32")
    try:
        with scope():
            model = cases.make_model(cases.FIT["bias"])
            model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
            callback = keras_lsuv.LSUVCallback(x, seed=0, verbose=0)
            model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[callback])
    except Exception as error:  # Keras's own fit under MultiWorkerMirroredStrategy (reported, and skipped by the test)
        frames = [f"{frame.name}" for frame in traceback.extract_tb(error.__traceback__) if "keras" in frame.filename]
        first_line = str(error).splitlines()[0] if str(error) else ""
        return {"error": f"{type(error).__name__} in {' > '.join(frames[-3:])}: {first_line[:200]}"}
    for j, w in enumerate(cases.weights_of(model)):
        weights[f"fit/{j}"] = w
    return {"error": None, "converged": callback.report.converged}


if __name__ == "__main__":
    main()
