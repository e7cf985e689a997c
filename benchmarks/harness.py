"""What every benchmark section shares: the timed calls, the timer, host-read and forward-pass counting, processes
per backend, and the machine and load the numbers were measured on.

Imports no other file of `benchmarks/`, so that the tests can use `counted_host_reads` (`benchmarks.harness`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def first_and_median(call, repeats):
    """Times `call()` once (the first call), then `repeats` more times.

    Returns:
        The first call's seconds, the median of the others, and the last call's result.
    """
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:]), result


def forward(model, x):
    """One eager forward pass, gradient recording off (torch), values (each output of a model with several) fetched to
    the host."""
    import keras

    from keras_lsuv.inference import inference_mode

    with inference_mode():
        return keras.tree.map_structure(keras.ops.convert_to_numpy, model(x, training=False))


def lsuv(model, x, engine, orthonormal=True, center=False):
    """`lsuv_init` with `engine`, seed 0, forced, silent."""
    import keras_lsuv

    return keras_lsuv.lsuv_init(
        model, x, engine=engine, orthonormal=orthonormal, center=center, seed=0, force=True, verbose=0
    )


def anyinit_installed():
    """Whether the Keras 3 peer `anyinit` (an optional dependency) can be imported here."""
    try:
        import anyinit  # noqa: F401
    except ImportError:
        return False
    return True


def anyinit(model, x):
    """The peer `anyinit` in its empirical mode on `model` with the batch `x`, seed 0; returns its report."""
    import anyinit

    return anyinit.initialize(model, "empirical", x, seed=0)


@contextlib.contextmanager
def counted_host_reads():
    """Counts the values read back to the host (`keras.ops.convert_to_numpy`, which LSUV uses) inside the block.

    Yields:
        A list that gets the shape of each value read, in order (`()` for a value without one).
    """
    from keras import ops

    convert, reads = ops.convert_to_numpy, []

    def counted(x):
        reads.append(tuple(getattr(x, "shape", ())))
        return convert(x)

    ops.convert_to_numpy = counted
    try:
        yield reads
    finally:
        ops.convert_to_numpy = convert


@contextlib.contextmanager
def counted_passes(model, batch):
    """Counts the forward passes of `model` over `batch` samples (calls of its `call`) inside the block.

    `Operation.__call__` looks `call` up at call time, so an instance attribute counts them; calls on other batch
    sizes (a build on one sample) are left out.

    Yields:
        A list that gets one entry per pass.
    """
    import keras

    call, passes = model.call, []

    def counted(inputs, *args, **kwargs):
        if keras.tree.flatten(inputs)[0].shape[0] == batch:
            passes.append(batch)
        return call(inputs, *args, **kwargs)

    model.call = counted
    try:
        yield passes
    finally:
        del model.call


def run_process(script, backend, *arguments):
    """Runs `script` with `arguments` under KERAS_BACKEND=`backend`; returns the JSON rows it printed.

    Keras fixes the backend per process, so each backend is measured in processes of its own.
    """
    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run([sys.executable, script, *arguments], env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{backend} {' '.join(arguments)} failed:\n{result.stderr}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def load_note(parallel):
    """What else ran on the machine: the load average now (at the end of the run), and whether backends overlapped."""
    one, five, fifteen = os.getloadavg()
    overlapped = " The backends' processes ran at the same time (`--parallel`)." if parallel else ""
    return (
        f"Load average at the end of the run: {one:.1f} / {five:.1f} / {fifteen:.1f} over 1 / 5 / 15 minutes, on "
        f"{os.cpu_count()} cores (the benchmark's own processes count in it; more means other jobs shared the "
        f"machine and inflated absolute times). Only the ratios, measured side by side in one process, are "
        f"meaningful.{overlapped}"
    )


def machine(gpu):
    """The CPU model, core count, Python and library versions of this machine."""
    import importlib.metadata

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("keras", "tensorflow-cpu", "jax", "torch")
    )
    device = "with a GPU (see `scripts/which_device.py`)" if gpu else "CPU only"
    return f"{cpu}, {os.cpu_count()} cores, {device}; Python {platform.python_version()}; {versions}."
