"""Section 4, the initializer: `Orthonormal` vs `keras.initializers.Orthogonal` and vs a same-size matrix product.

A draw is timed until its values are on the host (`convert_to_numpy`), after one warm-up draw of the same shape
(JAX compiles on the first call): the median of up to 15 timed draws, fewer once they take `BUDGET_SECONDS` (one for
a 4096x4096 draw, which takes seconds on 2 cores). `benchmarks/initializer.py` runs the same measurement on its own,
with the paper's SVD construction too.
"""

from __future__ import annotations

import statistics
import time

from page import table, verdict

# Timed draws stop once they add up to this many seconds (at least one): a 256x256 draw takes milliseconds and
# needs many for a stable median, a 4096x4096 one takes seconds on 2 cores.
BUDGET_SECONDS = 0.5


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


def measure(repeats, shapes, with_svd):
    """One row per shape: the median seconds of each variant, of the same-size matmul and of the Gaussian alone."""
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
        yield row


def rows(config, repeats):
    """Up to 15 draws per variant and shape, without the SVD (`--repeats` does not apply)."""
    yield from measure(15, config["initializer_shapes"], with_svd=False)


def render(results, config):
    body = [
        [
            r["backend"],
            "x".join(map(str, r["shape"])),
            f"{1e3 * r['Orthogonal']:.1f}",
            f"{1e3 * r['Orthonormal']:.1f}",
            f"{1e3 * r['matmul']:.1f}",
            f"{r['Orthonormal'] / r['Orthogonal']:.2f}",
            f"{r['Orthonormal'] / r['matmul']:.2f}",
            f"{r['gaussian'] / r['matmul']:.2f}",
        ]
        for r in results["initializer"]
    ]
    header = ["backend", "shape", "Orthogonal (ms)", "Orthonormal (ms)", "matmul (ms)"]
    header += ["Orthonormal / Orthogonal", "Orthonormal / matmul", "Gaussian alone / matmul"]
    return {"initializer": table(header, body)}


def targets(results):
    """Orthonormal never slower than Orthogonal, and within 3x of a same-size matmul."""
    lines = []
    for r in results["initializer"]:
        shape, value = "x".join(map(str, r["shape"])), r["Orthonormal"] / r["Orthogonal"]
        to_matmul = r["Orthonormal"] / r["matmul"]
        lines.append(
            f"- {r['backend']} at {shape}: Orthonormal never slower than Orthogonal: {verdict(value <= 1.0)} "
            f"({value:.2f}); within 3x of a same-size matmul: {verdict(to_matmul <= 3)} ({to_matmul:.2f})"
        )
    return lines
