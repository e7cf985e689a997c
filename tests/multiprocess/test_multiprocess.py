"""LSUV run by 2 processes on localhost, each with its own shard: one global LSUV, or the same error everywhere.

The module starts two `worker.py` processes (JAX: `keras.distribution.initialize` and `DataParallel` over
2 processes × 2 CPU devices; TensorFlow: `MultiWorkerMirroredStrategy` with 2 workers), each under `timeout -k`
and killed by process group in a `finally`, so that a hang fails the test instead of blocking CI. The workers run
every case of `cases.py`; the tests compare the two processes' weights with each other (bit for bit) and with one
process running on the concatenated shards, and re-measure the layers on the concatenated batch.

Run by `make multiprocess`, once with KERAS_BACKEND=jax and once with KERAS_BACKEND=tensorflow.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

import cases
import keras
import numpy as np
import pytest
import zoo

import keras_lsuv

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(
    BACKEND not in ("jax", "tensorflow"), reason="Keras runs several processes on JAX and TensorFlow only"
)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
TIMEOUT_S = 240  # one worker's whole run; about 30 s on 2 idle CPU cores
TOLERANCE = 0.1  # lsuv_init's default: |variance - 1| < 0.1


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both workers' weights (`{key: array}`) and results (`{"cases": ...}`), after both have finished."""
    out = tmp_path_factory.mktemp(f"multiprocess_{BACKEND}")
    ports = [free_port() for _ in range(cases.PROCESSES if BACKEND == "tensorflow" else 1)]
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    env.pop("TF_CONFIG", None)
    if BACKEND == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    workers = []
    with contextlib.ExitStack() as logs:
        try:
            for process in range(cases.PROCESSES):
                log = logs.enter_context(open(out / f"log_{process}.txt", "w"))
                command = [sys.executable, WORKER, "--process-id", str(process), "--out", str(out)]
                command += ["--ports", ",".join(map(str, ports))]
                # JAX catches SIGTERM: `-k` follows it with SIGKILL. A session of its own lets the finally kill the
                # worker and `timeout` together, by process group.
                workers.append(
                    subprocess.Popen(
                        ["timeout", "-k", "10", str(TIMEOUT_S), *command],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )
            codes = [worker.wait(timeout=TIMEOUT_S + 30) for worker in workers]
        finally:
            for worker in workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
    if any(codes):
        tails = "\n".join(
            f"--- process {p} (exit {code}):\n" + (out / f"log_{p}.txt").read_text()[-3000:]
            for p, code in enumerate(codes)
        )
        pytest.fail(f"a worker failed or timed out (124 or 137: killed after {TIMEOUT_S} s):\n{tails}")
    weights = [dict(np.load(out / f"process_{p}.npz")) for p in range(cases.PROCESSES)]
    results = [json.loads((out / f"process_{p}.json").read_text()) for p in range(cases.PROCESSES)]
    return weights, results


def case_weights(weights, name):
    return [weights[f"{name}/{j}"] for j in range(sum(key.startswith(f"{name}/") for key in weights))]


def single_process_reference(case, **overrides):
    """The same model and options, one process, on the concatenation of every process's shard."""
    model = cases.model_for(case)
    keras_lsuv.lsuv_init(model, cases.concatenated(case["sizes"]), **{"seed": 0, "verbose": 0, **case["options"]})
    return cases.weights_of(model)


def assert_same_in_every_process(runs, name):
    weights, _ = runs
    first = case_weights(weights[0], name)
    assert first, f"no weights for case {name}"
    for other in weights[1:]:
        for a, b in zip(first, case_weights(other, name), strict=True):
            np.testing.assert_array_equal(a, b)  # replicated weights must be the same bits everywhere
    return first


def assert_layers_reach_unit_variance(weights, case):
    """Re-measures every layer's pre-activation variance (with `residual`, every merge's output variance instead of
    its branch's) on the global batch with the processes' weights."""
    model = cases.model_for(case)
    model.set_weights(weights)
    x = cases.concatenated(case["sizes"])
    outputs = zoo.preactivations(model, x)
    assert len(outputs) == 5
    merges = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    for merge, variance in zoo.output_variances(model, x, merges).items():
        assert abs(variance - 1.0) < TOLERANCE, f"{merge.name}: {variance}"
    branches = {"hidden_1", "hidden_3"} if merges else set()
    for layer, variance in zoo.pooled_variances(outputs).items():
        assert layer.name in branches or abs(variance - 1.0) < TOLERANCE, f"{layer.name}: {variance}"
        if case["options"].get("center"):  # the means are global too: zero per channel on the global batch
            np.testing.assert_allclose(zoo.channel_means(layer, outputs[layer]), 0.0, atol=1e-4, err_msg=layer.name)


GLOBAL_CASES = [name for name, case in cases.CASES.items() if case["options"].get("seed", 0) == 0]


@pytest.mark.parametrize("name", [name for name in GLOBAL_CASES if name != "unequal_shards"])
def test_processes_end_with_the_lsuv_of_the_global_batch(runs, name):
    if name not in runs[1][0]["cases"]:
        pytest.skip("a keras.distribution case (JAX)")
    assert_global_lsuv(runs, name)


def test_shards_of_different_sizes(runs):
    if BACKEND == "tensorflow":  # each process measures its own shard: statistics are merged by count
        assert_global_lsuv(runs, "unequal_shards")
        return
    # Under keras.distribution the shards form one global batch, as in fit: they must be the same size.
    errors = [result["cases"]["unequal_shards"]["error"] for result in runs[1]]
    assert errors == [errors[0]] * cases.PROCESSES
    assert "every process must pass the same number of LSUV samples" in errors[0]
    assert "process 0: 40, process 1: 88" in errors[0]


def assert_global_lsuv(runs, name):
    case = cases.CASES[name]
    assert [result["cases"][name]["error"] for result in runs[1]] == [None] * cases.PROCESSES
    weights = assert_same_in_every_process(runs, name)
    for got, expected in zip(weights, single_process_reference(case), strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    if case["options"].get("measure", "preactivation") == "preactivation":
        assert_layers_reach_unit_variance(weights, case)
    assert all(result["cases"][name]["converged"] for result in runs[1])
    curvatures = [result["cases"][name]["curvature"] for result in runs[1]]
    if case["options"].get("center") or case["options"].get("residual"):  # every process notes the same
        assert curvatures[0] > 0 and curvatures == [curvatures[0]] * cases.PROCESSES, curvatures
    else:
        assert curvatures == [None] * cases.PROCESSES


def test_without_a_seed_one_process_draws_it_for_all(runs):
    case = cases.CASES["seed_none"]
    weights = assert_same_in_every_process(runs, "seed_none")
    seeded = single_process_reference(case, seed=0)
    assert max(np.abs(a - b).max() for a, b in zip(weights, seeded, strict=True)) > 0.01  # a random draw, not 0
    assert_layers_reach_unit_variance(weights, case)


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ("nan", r"^LSUV batch of process 1 \(of 2\): The LSUV batch contains NaN or Inf"),
        ("empty", r"^LSUV batch of process 1 \(of 2\): The LSUV batch is empty"),
        ("wrong_shape", r"^LSUV batch of process 1 \(of 2\): The LSUV batch does not match the model's input"),
        ("overflow", r"LSUV: the output variance of layer 'hidden_0' \(Dense\) overflowed float32"),  # in the run
    ],
)
def test_a_bad_shard_in_one_process_fails_in_every_process(runs, failure, message):
    _, results = runs  # both workers finished: nothing hung
    errors = [result["cases"][failure]["error"] for result in results]
    assert errors[0] is not None and re.search(message, errors[0]), errors[0]
    assert errors == [errors[0]] * cases.PROCESSES
    assert all(result["cases"][failure]["restored"] for result in results)


def test_callback_in_fit_gives_the_global_lsuv(runs):
    _, results = runs
    errors = {result["cases"]["fit"]["error"] for result in results}
    if errors != {None}:
        assert BACKEND == "tensorflow", errors  # on JAX, fit must run
        pytest.skip(f"Keras 3's fit fails under MultiWorkerMirroredStrategy: {errors.pop()}")
    weights = assert_same_in_every_process(runs, "fit")  # SGD(0.0): the weights after fit are LSUV's
    for got, expected in zip(weights, single_process_reference(cases.FIT), strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
