"""Orthonormal vs keras.initializers.Orthogonal (and the paper's SVD construction): draw time per backend.

Run: .venv/bin/python benchmarks/initializer.py [--repeats 15] [--backends tensorflow,jax,torch] [--no-svd]
     [--shapes 256x256,1024x1024]

Each backend runs in its own process (Keras fixes the backend per process). A draw is timed until its values
are on the host (convert_to_numpy), after one warm-up draw of the same shape (JAX compiles on the first call).
Prints the median time per draw and the ratio of each variant to `Orthogonal`, measured in the same process, and
the ratio of `Orthonormal` to one same-size float32 matrix product (`same_size_matmul`), also timed until on the
host.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(256, 256), (1024, 1024), (4096, 4096), (3, 3, 512, 512)]


def svd_orthonormal(shape, seed):
    """The paper's construction: U (or V^T) of the SVD of a Gaussian matrix."""
    import math

    import keras

    rows, cols = math.prod(shape[:-1]), shape[-1]
    gaussian = keras.random.normal((rows, cols), seed=seed, dtype="float32")
    u, _, vt = keras.ops.svd(gaussian, full_matrices=False)
    return keras.ops.reshape(u if rows >= cols else vt, shape)


def same_size_matmul(shape):
    """One float32 matrix product of the kernel's `(m, n)` matrix (m >= n) by an `(n, n)` one: 2·m·n² flops.

    A dense orthonormalization of the same matrix costs 1.3-2.7 times that many flops.
    """
    import math

    import keras

    rows, cols = math.prod(shape[:-1]), shape[-1]
    rows, cols = max(rows, cols), min(rows, cols)
    a = keras.random.normal((rows, cols), seed=0, dtype="float32")
    b = keras.random.normal((cols, cols), seed=1, dtype="float32")
    return lambda _: keras.ops.matmul(a, b)


# Timed draws stop once they add up to this many seconds (at least one): a 256x256 draw takes milliseconds and
# needs many for a stable median, a 4096x4096 one takes seconds on 2 cores.
BUDGET_SECONDS = 0.5


def gaussian(shape):
    """The Gaussian draw alone (`keras.random.normal` of the kernel's shape, float32): part of every QR-based draw."""
    import keras

    return keras.random.normal(shape, seed=0, dtype="float32")


def median_seconds(draw, shape, repeats):
    """The median time of up to `repeats` draws (fewer once they take `BUDGET_SECONDS`), after a warm-up draw."""
    import keras

    keras.ops.convert_to_numpy(draw(shape))  # warm-up (compilation on JAX)
    times = []
    while len(times) < repeats and (not times or sum(times) < BUDGET_SECONDS):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(draw(shape))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(repeats, shapes, with_svd):
    import keras

    import keras_lsuv

    variants = {
        "Orthogonal": keras.initializers.Orthogonal(seed=0),
        "Orthonormal": keras_lsuv.Orthonormal(seed=0),
    }
    if with_svd:
        variants["SVD (paper)"] = lambda shape: svd_orthonormal(shape, seed=0)
    for shape in shapes:
        row = {"backend": keras.backend.backend(), "shape": list(shape)}
        for name, draw in variants.items():
            row[name] = median_seconds(draw, shape, repeats)
        row["matmul"] = median_seconds(same_size_matmul(shape), shape, repeats)
        row["gaussian"] = median_seconds(gaussian, shape, repeats)
        print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="at most this many timed draws per variant and shape")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat: checks the script runs")
    parser.add_argument("--no-svd", action="store_true", help="skip the (slow) SVD construction")
    parser.add_argument("--shapes", help="comma-separated shapes such as 256x256,3x3x64x64 (default: the four above)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = [(64, 64), (3, 3, 16, 16)] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    repeats = 1 if args.quick else args.repeats
    if args.worker:
        worker(repeats, shapes, not args.no_svd)
        return
    rows = []
    for backend in args.backends.split(","):
        command = [sys.executable, __file__, "--worker", "--repeats", str(repeats)]
        command += ["--quick"] * args.quick + ["--no-svd"] * args.no_svd + ["--shapes", args.shapes] * bool(args.shapes)
        env = dict(os.environ, KERAS_BACKEND=backend)
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode:
            sys.exit(f"{backend} worker failed:\n{result.stderr}")
        rows += [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    names = [k for k in rows[0] if k not in ("backend", "shape", "matmul", "gaussian")]
    header = "| backend | shape | " + " | ".join(f"{n} (ms)" for n in names) + " | matmul (ms)"
    header += " | " + " | ".join(f"{n} / Orthogonal" for n in names[1:]) + " | Orthonormal / matmul |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(names) + 1))
    for row in rows:
        times = " | ".join(f"{1e3 * row[n]:.1f}" for n in names) + f" | {1e3 * row['matmul']:.1f}"
        ratios = " | ".join(f"{row[n] / row['Orthogonal']:.2f}" for n in names[1:])
        ratios += f" | {row['Orthonormal'] / row['matmul']:.2f}"
        print(f"| {row['backend']} | {'x'.join(map(str, row['shape']))} | {times} | {ratios} |")


if __name__ == "__main__":
    main()
