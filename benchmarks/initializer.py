"""Orthonormal vs keras.initializers.Orthogonal (and the paper's SVD construction): draw time per backend.

Run: .venv/bin/python benchmarks/initializer.py [--repeats 15] [--backends tensorflow,jax,torch] [--no-svd]
     [--shapes 256x256,1024x1024]

Each backend runs in its own process (Keras fixes the backend per process). A draw is timed until its values
are on the host (convert_to_numpy), after one warm-up draw of the same shape (JAX compiles on the first call).
Prints the median time per draw and the ratio of each variant to `Orthogonal`, measured in the same process, and
the ratio of `Orthonormal` to one same-size float32 matrix product (`same_size_matmul`), also timed until on the
host. The page's section 4 (`sections/initializer.py`, which holds the measurement) is this without the SVD.
"""

from __future__ import annotations

import argparse
import json

import configs
import harness
from sections import initializer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="at most this many timed draws per variant and shape")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat: checks the script runs")
    parser.add_argument("--no-svd", action="store_true", help="skip the (slow) SVD construction")
    parser.add_argument("--shapes", help="comma-separated shapes such as 256x256,3x3x64x64 (default: the four above)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = (configs.QUICK if args.quick else configs.FULL)["initializer_shapes"]
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    repeats = 1 if args.quick else args.repeats
    if args.worker:
        for row in initializer.measure(repeats, shapes, not args.no_svd):
            print(json.dumps(row), flush=True)
        return
    flags = ["--repeats", str(repeats)] + ["--quick"] * args.quick + ["--no-svd"] * args.no_svd
    flags += ["--shapes", args.shapes] * bool(args.shapes)
    rows = [
        row
        for backend in args.backends.split(",")
        for row in harness.run_process(__file__, backend, "--worker", *flags)
    ]
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
