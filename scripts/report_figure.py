"""Draws the `LSUVReport.plot()` figure shown in docs/guide.md.

Run: KERAS_BACKEND=jax .venv/bin/python scripts/report_figure.py   (writes docs/img/report.png; any backend)

A 10-layer relu MLP on scikit-learn's digits with one frozen layer and a softmax head, initialized twice with
LSUV: with the default `measure="preactivation"` (every processed layer converges, the frozen one is skipped) and
with `measure="output"` (the softmax output cannot reach variance 1, so the head does not converge).
"""

import argparse
import warnings
from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_lsuv  # noqa: E402


def build_model():
    hidden = [keras.layers.Dense(32, activation="relu") for _ in range(10)]
    hidden[4].trainable = False
    return keras.Sequential([keras.Input((64,)), *hidden, keras.layers.Dense(10, activation="softmax")])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/img/report.png"))
    args = parser.parse_args(argv)

    x = (load_digits().data[:256].astype("float32") - 8.0) / 8.0
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, measure in zip(axes, ("preactivation", "output"), strict=True):
        keras.backend.clear_session()  # the same layer names in both panels
        keras.utils.set_random_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the head does not converge with measure="output"
            report = keras_lsuv.lsuv_init(build_model(), x, measure=measure, seed=0, verbose=0)
        report.plot(ax=axis)
        print(report)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=80)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
