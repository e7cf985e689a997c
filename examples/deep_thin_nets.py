"""Study: which initializations let plain deep thin networks train, on MNIST-1D and scikit-learn's digits.

Run (the full grid, about 20 minutes on 2 CPU cores; the numbers in docs/results.md come from this command):

    KERAS_BACKEND=jax .venv/bin/python examples/deep_thin_nets.py --results-json build/study.json --plots-dir docs/img

Quick slice (what CI runs through `make study-quick`, under 2 minutes):

    KERAS_BACKEND=jax .venv/bin/python examples/deep_thin_nets.py --quick

Networks: plain stacks (no residual connections) of `depth` thin hidden layers — Conv1D with 32 channels and
kernel 3 on MNIST-1D's 40-sample signals (the first layer has stride 2), Dense with 32 units on the 8x8 digits —
and a linear 10-way classifier trained on logits. Every network trains with the same optimizer and schedule
(SGD, momentum 0.9, cosine decay from 0.01) for a fixed number of epochs; only the initialization changes:

- `glorot_uniform`, `he_normal`, `orthogonal` (Keras) and `orthonormal` (`keras_lsuv.Orthonormal`): initializers;
- `lsuv_pre` / `lsuv_out`: `keras_lsuv.lsuv_init` with `measure="preactivation"` / `"output"` on 256 training samples;
- `batchnorm`: BatchNormalization between each hidden layer and its activation, glorot_uniform kernels.

For speed every architecture is compiled once: the runs of one architecture share one compiled model, and each run
loads its initial weights (from an uncompiled copy built with the run's initializer and seed) and resets the
optimizer state before `fit`.
"""

import argparse
import dataclasses
import functools
import json
import statistics
import time
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import ops
from mnist1d.data import get_dataset_args, make_dataset
from sklearn.datasets import load_digits

import keras_lsuv

INITIALIZATIONS = ("glorot_uniform", "he_normal", "orthogonal", "orthonormal", "lsuv_pre", "lsuv_out", "batchnorm")
LSUV_MEASURES = {"lsuv_pre": "preactivation", "lsuv_out": "output"}
WIDTH = 32
BATCH_SIZE = 100
LSUV_BATCH = 256
TIMED_STEPS = 50
LEARNING_RATE = 0.01
# The study's optimizer: a function of the learning rate (schedule).
SGD_MOMENTUM = functools.partial(keras.optimizers.SGD, momentum=0.9)


@dataclasses.dataclass
class Task:
    """A dataset, the kind of hidden layer it is trained with and the accuracy that counts as 'trained'.

    Args:
        name: `"mnist1d"` or `"digits"`.
        x_train: Training inputs, standardized.
        y_train: Training labels (0-9).
        x_test: Test inputs, standardized with the training statistics.
        y_test: Test labels.
        convolutional: Conv1D hidden layers if true, Dense ones otherwise.
        threshold: Test accuracy at which a run counts as trained (for "epochs to threshold").
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    convolutional: bool
    threshold: float


@dataclasses.dataclass
class TaskGrid:
    """What the study runs on one task: every depth x activation x initialization x seed.

    Args:
        depths: Numbers of hidden layers.
        activations: Hidden activations.
        seeds: One run per seed.
        epochs: Epochs per run.
    """

    depths: tuple[int, ...]
    activations: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int


# Sized to finish in about 20 minutes on 2 CPU cores: the Conv1D networks on MNIST-1D cost ~10x more per run than
# the Dense ones on digits, so MNIST-1D gets fewer depths, two activations and fewer epochs.
FULL_GRID = {
    "mnist1d": TaskGrid(depths=(5, 10, 20), activations=("relu", "tanh"), seeds=(0, 1, 2), epochs=6),
    "digits": TaskGrid(depths=(5, 10, 20, 30), activations=("relu", "tanh", "elu"), seeds=(0, 1, 2), epochs=10),
}
QUICK_GRID = {
    "mnist1d": TaskGrid(depths=(5,), activations=("relu",), seeds=(0,), epochs=2),
    "digits": TaskGrid(depths=(10,), activations=("tanh",), seeds=(0,), epochs=3),
}


def load_mnist1d():
    """MNIST-1D (generated locally by the `mnist1d` package): 4000 training and 1000 test signals of length 40."""
    data = make_dataset(get_dataset_args())
    mean, std = data["x"].mean(), data["x"].std()
    x_train, x_test = ((data[k] - mean) / std for k in ("x", "x_test"))
    return Task(
        "mnist1d",
        x_train.astype("float32")[..., None],
        data["y"].astype("int32"),
        x_test.astype("float32")[..., None],
        data["y_test"].astype("int32"),
        convolutional=True,
        threshold=0.6,
    )


def load_digits_task():
    """scikit-learn's 8x8 digits, flattened: 1400 training and 397 test images, split at random with seed 0."""
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x, y = digits.data[order].astype("float32"), digits.target[order].astype("int32")
    mean, std = x[:1400].mean(), x[:1400].std()
    x = (x - mean) / std
    return Task("digits", x[:1400], y[:1400], x[1400:], y[1400:], convolutional=False, threshold=0.9)


TASK_LOADERS = {"mnist1d": load_mnist1d, "digits": load_digits_task}


def build_model(task, depth, activation, batchnorm, kernel_initializer="glorot_uniform"):
    """A plain stack of `depth` thin hidden layers and a linear classifier (logits).

    With `batchnorm`, each hidden layer is linear and followed by BatchNormalization and the activation; otherwise
    the activation is fused into the layer, so that LSUV can measure before or after it.
    """
    model = keras.Sequential([keras.Input(task.x_train.shape[1:])])
    for index in range(depth):
        fused_activation = None if batchnorm else activation
        if task.convolutional:
            model.add(
                keras.layers.Conv1D(
                    WIDTH,
                    3,
                    strides=2 if index == 0 else 1,
                    padding="same",
                    activation=fused_activation,
                    kernel_initializer=kernel_initializer,
                )
            )
        else:
            model.add(keras.layers.Dense(WIDTH, activation=fused_activation, kernel_initializer=kernel_initializer))
        if batchnorm:
            model.add(keras.layers.BatchNormalization())
            model.add(keras.layers.Activation(activation))
    if task.convolutional:
        model.add(keras.layers.Flatten())
    model.add(keras.layers.Dense(10, kernel_initializer=kernel_initializer))
    return model


def initial_model(task, depth, activation, initialization, seed):
    """An uncompiled model holding the initial weights of one run (LSUV runs on it, on 256 training samples).

    Returns:
        The model, and whether LSUV converged on every layer (`None` for the other initializations).
    """
    keras.utils.set_random_seed(seed)
    if initialization == "batchnorm":
        return build_model(task, depth, activation, batchnorm=True), None
    if initialization in LSUV_MEASURES:
        model = build_model(task, depth, activation, batchnorm=False)
        with warnings.catch_warnings():  # a layer that does not converge is recorded in the run instead
            warnings.simplefilter("ignore", UserWarning)
            report = keras_lsuv.lsuv_init(
                model, task.x_train[:LSUV_BATCH], measure=LSUV_MEASURES[initialization], seed=seed, verbose=0
            )
        return model, report.converged
    return build_model(task, depth, activation, batchnorm=False, kernel_initializer=initialization), None


class CompiledArchitecture:
    """One compiled model per architecture, re-initialized for every run so that it compiles only once.

    Args:
        model: A model of the architecture (its weights are replaced at each run).
        task: The task the model is trained on.
        epochs: Epochs per run (the learning-rate schedule spans them).
        learning_rate: The initial learning rate of the cosine schedule.
        optimizer: A function of the learning-rate schedule that returns the optimizer.
    """

    def __init__(self, model, task, epochs, learning_rate=LEARNING_RATE, optimizer=SGD_MOMENTUM):
        self.model = model
        steps = epochs * int(np.ceil(len(task.x_train) / BATCH_SIZE))
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
        self.model.compile(
            optimizer=optimizer(schedule),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        self.model.optimizer.build(self.model.trainable_variables)
        self.fresh_optimizer_state = [ops.convert_to_numpy(v) for v in self.model.optimizer.variables]

    def load(self, initial):
        """Sets the weights of the uncompiled `initial` model and a fresh optimizer state (step 0, no momentum)."""
        self.model.set_weights(initial.get_weights())
        for variable, value in zip(self.model.optimizer.variables, self.fresh_optimizer_state, strict=True):
            variable.assign(value)

    def seconds_per_step(self, task):
        """Median wall time of one training step on a full batch (after warm-up), synchronized by `train_on_batch`."""
        x, y = task.x_train[:BATCH_SIZE], task.y_train[:BATCH_SIZE]
        self.model.train_on_batch(x, y)
        times = []
        for _ in range(TIMED_STEPS):
            start = time.perf_counter()
            self.model.train_on_batch(x, y)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def train_run(architecture, task, depth, activation, initialization, seed, epochs):
    """Trains one network from one initialization; returns its test-accuracy curve and timings."""
    start = time.perf_counter()
    initial, lsuv_converged = initial_model(task, depth, activation, initialization, seed)
    init_seconds = time.perf_counter() - start
    return {
        "task": task.name,
        "depth": depth,
        "activation": activation,
        "initialization": initialization,
        "seed": seed,
        **fit_run(architecture, task, initial, epochs),
        "init_seconds": init_seconds,
        "lsuv_converged": lsuv_converged,
    }


def fit_run(architecture, task, initial, epochs):
    """Trains `architecture` from the weights of `initial`; returns its test-accuracy curve, the epochs it took to
    reach the task's threshold, its final loss and the time `fit` took."""
    architecture.load(initial)
    start = time.perf_counter()
    history = architecture.model.fit(
        task.x_train,
        task.y_train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        validation_data=(task.x_test, task.y_test),
        validation_batch_size=len(task.x_test),
        verbose=0,
    )
    curve = [float(a) for a in history.history["val_accuracy"]]
    curve = [a if np.isfinite(a) else 0.0 for a in curve]
    reached = [epoch for epoch, accuracy in enumerate(curve, start=1) if accuracy >= task.threshold]
    return {
        "test_accuracy": curve[-1],
        "curve": curve,
        "epochs_to_threshold": reached[0] if reached else None,
        "final_loss": float(history.history["loss"][-1]),
        "fit_seconds": time.perf_counter() - start,
    }


def hidden_layer_variances(model, x):
    """Variance, on the batch `x`, of every hidden layer's pre-activation and output, in order.

    The pre-activation of a plain layer is its output with the fused activation switched off; in a batchnorm
    network it is the BatchNormalization output in training mode (batch statistics, as during training).

    Returns:
        Two lists (pre-activation, output), one value per hidden layer.
    """
    preactivation, output = [], []
    h = ops.convert_to_tensor(x)
    for layer in model.layers[:-1]:
        if isinstance(layer, keras.layers.BatchNormalization):
            h = layer(h, training=True)
            preactivation[-1] = float(ops.var(h))
        elif isinstance(layer, keras.layers.Activation):
            h = layer(h)
            output[-1] = float(ops.var(h))
        elif isinstance(layer, (keras.layers.Conv1D, keras.layers.Dense)):
            activation = layer.activation
            layer.activation = keras.activations.linear
            z = layer(h)
            layer.activation = activation
            h = activation(z)
            preactivation.append(float(ops.var(z)))
            output.append(float(ops.var(h)))
        else:
            h = layer(h)
    return preactivation, output


def summarize(runs, task_names):
    """Mean ± std of final test accuracy and epochs to threshold, one row per task x depth x activation x init."""
    rows = []
    keys = sorted(
        {(r["task"], r["depth"], r["activation"], r["initialization"]) for r in runs},
        key=lambda k: (task_names.index(k[0]), k[1], k[2], INITIALIZATIONS.index(k[3])),
    )
    for key in keys:
        group = [r for r in runs if (r["task"], r["depth"], r["activation"], r["initialization"]) == key]
        accuracies = [r["test_accuracy"] for r in group]
        epochs = [r["epochs_to_threshold"] for r in group if r["epochs_to_threshold"] is not None]
        rows.append(
            {
                "task": key[0],
                "depth": key[1],
                "activation": key[2],
                "initialization": key[3],
                "accuracy_mean": float(np.mean(accuracies)),
                "accuracy_std": float(np.std(accuracies)),
                "reached": len(epochs),
                "runs": len(group),
                "epochs_to_threshold_mean": float(np.mean(epochs)) if epochs else None,
            }
        )
    return rows


def accuracy_table(rows, task, threshold):
    """A markdown table: one line per depth x activation, one column per initialization.

    Each cell: mean ± std test accuracy, then the mean number of epochs to reach `threshold` over the runs that
    reached it and how many did (e.g. `3.0 (3/3)`), or `-` if none did.
    """
    lines = [
        f"**{task}** — test accuracy (mean ± std over seeds) / epochs to {threshold:.0%} test accuracy "
        "(runs that got there)",
        "",
        "| depth | activation | " + " | ".join(INITIALIZATIONS) + " |",
        "|---|---|" + "---|" * len(INITIALIZATIONS),
    ]
    configurations = sorted({(r["depth"], r["activation"]) for r in rows if r["task"] == task})
    for depth, activation in configurations:
        cells = []
        for initialization in INITIALIZATIONS:
            match = [
                r
                for r in rows
                if (r["task"], r["depth"], r["activation"], r["initialization"])
                == (task, depth, activation, initialization)
            ]
            if not match:
                cells.append("")
                continue
            r = match[0]
            epochs = f"{r['epochs_to_threshold_mean']:.1f}" if r["reached"] else "-"
            cells.append(f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} / {epochs} ({r['reached']}/{r['runs']})")
        lines.append(f"| {depth} | {activation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_time_table(step_times):
    """A markdown table of the median training-step time, plain network (any non-BN initialization) vs batchnorm."""
    lines = [
        "| task | depth | activation | plain (LSUV) ms/step | batchnorm ms/step | batchnorm / plain |",
        "|---|---|---|---|---|---|",
    ]
    for t in step_times:
        ratio = t["batchnorm"] / t["plain"]
        lines.append(
            f"| {t['task']} | {t['depth']} | {t['activation']} | {1000 * t['plain']:.2f} | "
            f"{1000 * t['batchnorm']:.2f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def plot_learning_curves(runs, task, grid, path):
    """Mean test accuracy per epoch, one panel per activation x depth, one line per initialization."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(grid.activations),
        len(grid.depths),
        figsize=(3.2 * len(grid.depths), 2.6 * len(grid.activations)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for row, activation in enumerate(grid.activations):
        for column, depth in enumerate(grid.depths):
            axis = axes[row][column]
            for initialization in INITIALIZATIONS:
                curves = [
                    r["curve"]
                    for r in runs
                    if (r["task"], r["depth"], r["activation"], r["initialization"])
                    == (task, depth, activation, initialization)
                ]
                if curves:
                    epochs = np.arange(1, len(curves[0]) + 1)
                    axis.plot(epochs, np.mean(curves, axis=0), label=initialization, marker=".")
            axis.set_title(f"{activation}, depth {depth}", fontsize=9)
            axis.set_ylim(0, 1)
            axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("epoch")
    for axis in axes[:, 0]:
        axis.set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.suptitle(f"{task}: mean test accuracy over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_layer_variances(task, depth, grid, path):
    """Variance of every hidden layer's pre-activation and output at initialization, on one batch (seed 0)."""
    import matplotlib.pyplot as plt

    x = task.x_train[:LSUV_BATCH]
    figure, axes = plt.subplots(
        len(grid.activations), 2, figsize=(10, 2.8 * len(grid.activations)), sharex=True, squeeze=False
    )
    for row, activation in enumerate(grid.activations):
        for initialization in INITIALIZATIONS:
            model, _ = initial_model(task, depth, activation, initialization, seed=0)
            preactivation, output = hidden_layer_variances(model, x)
            layers = np.arange(1, depth + 1)
            axes[row][0].plot(layers, preactivation, label=initialization, marker=".")
            axes[row][1].plot(layers, output, label=initialization, marker=".")
        for column, measured in enumerate(("pre-activation", "output")):
            axes[row][column].set_yscale("log")
            axes[row][column].set_title(f"{activation}: variance of each layer's {measured}", fontsize=9)
            axes[row][column].grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("hidden layer")
    axes[0][1].legend(fontsize=7)
    figure.suptitle(f"{task.name}, depth {depth}: variance at initialization on {len(x)} training samples")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def run_study(grids, plots_dir=None):
    """Runs every task's grid; returns every run, the summary rows, the step timings and the loaded tasks."""
    tasks = {name: TASK_LOADERS[name]() for name in grids}
    runs, step_times = [], []
    for task in tasks.values():
        grid = grids[task.name]
        for depth in grid.depths:
            for activation in grid.activations:
                start = time.perf_counter()
                plain_model = build_model(task, depth, activation, batchnorm=False)
                plain = CompiledArchitecture(plain_model, task, grid.epochs)
                batchnorm = CompiledArchitecture(build_model(task, depth, activation, True), task, grid.epochs)
                for initialization in INITIALIZATIONS:
                    architecture = batchnorm if initialization == "batchnorm" else plain
                    for seed in grid.seeds:
                        runs.append(train_run(architecture, task, depth, activation, initialization, seed, grid.epochs))
                step_times.append(
                    {
                        "task": task.name,
                        "depth": depth,
                        "activation": activation,
                        "plain": plain.seconds_per_step(task),
                        "batchnorm": batchnorm.seconds_per_step(task),
                    }
                )
                finished = runs[-len(INITIALIZATIONS) * len(grid.seeds) :]
                accuracies = "  ".join(
                    f"{i}={np.mean([r['test_accuracy'] for r in finished if r['initialization'] == i]):.2f}"
                    for i in INITIALIZATIONS
                )
                print(
                    f"{task.name} depth {depth} {activation}: {accuracies}  ({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        for task in tasks.values():
            grid = grids[task.name]
            plot_learning_curves(runs, task.name, grid, plots_dir / f"curves_{task.name}.png")
            plot_layer_variances(task, max(grid.depths), grid, plots_dir / f"variances_{task.name}.png")
    return runs, summarize(runs, list(grids)), step_times, tasks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small slice of the grid (CI)")
    parser.add_argument("--results-json", type=Path, help="write every run and the summary here")
    parser.add_argument("--plots-dir", type=Path, help="write the PNG plots here")
    args = parser.parse_args(argv)
    grids = QUICK_GRID if args.quick else FULL_GRID
    start = time.perf_counter()
    print(f"backend: {keras.backend.backend()}, grid: {grids}", flush=True)
    runs, rows, step_times, tasks = run_study(grids, args.plots_dir)
    minutes = (time.perf_counter() - start) / 60
    for name, task in tasks.items():
        print("\n" + accuracy_table(rows, name, task.threshold))
    print(f"\nTime per training step (batch of {BATCH_SIZE}, median of {TIMED_STEPS}):\n")
    print(step_time_table(step_times))
    lsuv_seconds = [r["init_seconds"] for r in runs if r["initialization"] in LSUV_MEASURES]
    print(f"\nlsuv_init wall time per run: median {statistics.median(lsuv_seconds):.2f}s, max {max(lsuv_seconds):.2f}s")
    unconverged = [r for r in runs if r["lsuv_converged"] is False]
    print(f"LSUV runs that did not converge within tolerance: {len(unconverged)} of {len(lsuv_seconds)}")
    print(f"\nstudy wall time: {minutes:.1f} min ({len(runs)} runs)")
    if args.results_json is not None:
        args.results_json.parent.mkdir(parents=True, exist_ok=True)
        grid = {name: dataclasses.asdict(g) for name, g in grids.items()}
        summary = {"grid": grid, "minutes": minutes, "rows": rows, "step_times": step_times}
        args.results_json.write_text(json.dumps({**summary, "runs": runs}, indent=1))
    return runs, rows


if __name__ == "__main__":
    main()
