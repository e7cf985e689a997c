"""Step 1 candidates: orthonormalizing every kernel of a real model, batched by shape, per backend.

Run: .venv/bin/python benchmarks/step1.py [--backends tensorflow,jax,torch] [--repeats 3] [--quick]

The candidates that were measured to choose the algorithm of `keras_lsuv/orthonormal.py`, on the kernel shapes of
ResNet50 and of a GPT-2 12 x 768 block stack (each kernel as its `(max, min)` matrix, kernels of one shape drawn in
one batched call), in float32 on the backend's device except the NumPy rows:

- `numpy float64 QR`: what step 1 did before (NumPy on the host; here batched by shape), and the same in float32;
- `keras.ops.qr`: the backend's Householder QR, batched, signs of R's diagonal folded into Q;
- `CholeskyQR2`: two rounds of `G = AᵀA`, `L = cholesky(G)`, `A ← A L⁻ᵀ` (fails on ill-conditioned matrices:
  a failure is reported as such);
- `shifted CholeskyQR3`: the same with a shift `10·u·√m·‖A‖²_F` (`u` = 2⁻²⁴) added to the first Gram matrix, then
  two plain rounds (Fukaya et al., 2020): what step 1 used for large tall matrices before `haar_orthonormal`;
- `Householder reflections (blocks of 128/256/512)`: `keras_lsuv.orthonormal.haar_orthonormal`, the reflections of
  Householder QR read off the Gaussian (Stewart, 1980) and applied in blocks of matrix products; what step 1 uses,
  with blocks of 512.

Prints, per backend and model, the first call (compilation on JAX) and the median of the following calls, and the
worst `‖QᵀQ - I‖max` of each candidate. Each backend runs in its own process.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time


def resnet50_matrices():
    """The `(max, min)` matrix shape of every kernel of `keras.applications.ResNet50` (channels last)."""
    import keras

    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))
    return [_matrix(layer.kernel.shape) for layer in model.layers if hasattr(layer, "kernel")]


def gpt2_matrices(layers=12, width=768, heads=12):
    """The matrix shapes of a GPT-2 block stack: q/k/v/out projections (EinsumDense) and the 4x MLP."""
    head = width // heads
    per_block = [(width, heads, head)] * 3 + [(heads, head, width), (width, 4 * width), (4 * width, width)]
    return [_matrix(shape) for shape in per_block * layers]


def sample_matrices():
    """A few kernels of each kind: GPT-2's MLP and square output projections, ResNet50's 3x3 and 1x1 convs."""
    return [(3072, 768)] * 2 + [(768, 768)] * 2 + [(1024, 1024)] * 1 + [(4608, 512)] * 2 + [(576, 64)] * 6


def _matrix(shape):
    import math

    rows, cols = math.prod(shape[:-1]), shape[-1]
    return max(rows, cols), min(rows, cols)


def by_shape(matrices):
    return collections.Counter(matrices)


def candidates():
    import keras
    import numpy as np
    from keras import ops

    from keras_lsuv.orthonormal import _compiled_haar_orthonormal, householder_qr

    def cholesky_qr2(a):
        for _ in range(2):
            lower = ops.cholesky(ops.matmul(ops.swapaxes(a, -1, -2), a))
            a = ops.swapaxes(ops.solve_triangular(lower, ops.swapaxes(a, -1, -2), lower=True), -1, -2)
        return a

    def shifted_cholesky_qr3(a):
        rows, cols = a.shape[-2], a.shape[-1]
        squared_norm = ops.sum(ops.square(a), axis=(-2, -1), keepdims=True)
        shift = ops.eye(cols, dtype="float32") * (10 * 2.0**-24 * rows**0.5 * squared_norm)
        for shifted in (True, False, False):
            gram = ops.matmul(ops.swapaxes(a, -1, -2), a)
            lower = ops.cholesky(gram + shift if shifted else gram)
            a = ops.swapaxes(ops.solve_triangular(lower, ops.swapaxes(a, -1, -2), lower=True), -1, -2)
        return a

    def numpy_qr(dtype):
        def draw(groups, seed):
            rng = np.random.default_rng(seed)
            out = []
            for (rows, cols), count in groups.items():
                q, r = np.linalg.qr(rng.standard_normal((count, rows, cols), dtype=dtype))
                out.append(q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :])
            return out

        return draw

    def on_device(method):
        def draw(groups, seed):
            out = []
            for i, ((rows, cols), count) in enumerate(groups.items()):
                a = keras.random.normal((count, rows, cols), seed=seed + i, dtype="float32")
                out.append(ops.convert_to_numpy(method(a)))
            return out

        return draw

    return {
        "numpy float64 QR": numpy_qr("float64"),
        "numpy float32 QR": numpy_qr("float32"),
        "keras.ops.qr": on_device(householder_qr),
        "CholeskyQR2": on_device(cholesky_qr2),
        "shifted CholeskyQR3": on_device(shifted_cholesky_qr3),
        **{
            f"Householder reflections (blocks of {block})": on_device(
                lambda a, block=block: _compiled_haar_orthonormal(a, block)
            )
            for block in (128, 256, 512)
        },
    }


def worst_error(matrices):
    import numpy as np

    worst = 0.0
    for q in matrices:
        q = np.asarray(q, "float64").reshape(-1, *q.shape[-2:])
        gram = np.swapaxes(q, -1, -2) @ q
        worst = max(worst, float(np.abs(gram - np.eye(q.shape[-1])).max()))
    return worst


def worker(repeats, quick, only, chosen):
    import keras

    if quick:
        models = {"GPT-2 2x64": lambda: gpt2_matrices(2, 64, 4)}
    else:
        models = {"sample": sample_matrices, "ResNet50": resnet50_matrices, "GPT-2 12x768": gpt2_matrices}
        models = {name: factory for name, factory in models.items() if name in (only or ["sample"])}
    models = {name: factory() for name, factory in models.items()}
    for model, matrices in models.items():
        groups = by_shape(matrices)
        for name, draw in candidates().items():
            if chosen and name not in chosen:
                continue
            row = {"backend": keras.backend.backend(), "model": model, "kernels": len(matrices)}
            row["shapes"], row["candidate"] = len(groups), name
            try:
                times = []
                for i in range(1 + repeats):
                    start = time.perf_counter()
                    result = draw(groups, i)
                    times.append(time.perf_counter() - start)
                row["first"], row["median"] = times[0], statistics.median(times[1:])
                row["error"] = worst_error(result)
            except Exception as error:  # noqa: BLE001 - a failing candidate is a result to report
                row["failed"] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
            print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--quick", action="store_true", help="a tiny model, one repeat: checks the script runs")
    parser.add_argument("--models", help="comma-separated, of: sample (the default), ResNet50, GPT-2 12x768")
    parser.add_argument("--candidates", help="comma-separated subset of the candidates' names (default: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    if args.worker:
        split = lambda names: names.split(",") if names else None  # noqa: E731
        worker(repeats, args.quick, split(args.models), split(args.candidates))
        return
    print("| backend | model | kernels (shapes) | candidate | first call (s) | warm (s) | max abs(QᵀQ - I) |")
    print("|---|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        command = [sys.executable, __file__, "--worker", "--repeats", str(repeats)] + ["--quick"] * args.quick
        command += ["--models", args.models] * bool(args.models) + ["--candidates", args.candidates] * bool(
            args.candidates
        )
        env = dict(os.environ, KERAS_BACKEND=backend)
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in child.stdout:
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            cells = [r["backend"], r["model"], f"{r['kernels']} ({r['shapes']})", r["candidate"]]
            if "failed" in r:
                cells += ["failed", "", r["failed"]]
            else:
                cells += [f"{r['first']:.2f}", f"{r['median']:.2f}", f"{r['error']:.1e}"]
            print("| " + " | ".join(cells) + " |", flush=True)
        if child.wait():
            sys.exit(f"{backend} worker failed (exit status {child.returncode})")


if __name__ == "__main__":
    main()
