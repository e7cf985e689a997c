"""Study: residual networks without normalization (and a plain relu conv stack) by initialization and learning rate.

Run (the full grid, about 8 minutes per backend on 2 CPU cores; docs/results.md quotes one run per backend):

    KERAS_BACKEND=jax .venv/bin/python examples/residual_nets.py --results-json build/residual_jax.json

The stream variance of the real models (keras.applications ResNet50 and a GPT-2 stack) after plain and residual-aware
LSUV, about 2 minutes more:

    KERAS_BACKEND=jax .venv/bin/python examples/residual_nets.py --real-models-only

Quick slice (what CI runs through `make study-quick`): `--quick`.

Networks, each trained with SGD (momentum 0.9, cosine decay from the learning rate) for a fixed number of epochs:

- `resnet`: 8 blocks `relu(x + conv(relu(conv(x))))` of Conv2D(16, 3), no normalization, on scikit-learn's digits
  as 8x8 images;
- `conv_stack`: 16 plain Conv2D(16, 3) relu layers on the same images;
- `transformer`: 4 pre-LN blocks (MultiHeadAttention 2x16, a relu FFN of 64), written with `x + ...`, on a
  synthetic task: the most frequent of 8 tokens in a sequence of 16 (one-hot in, a Dense embedding);
- `gpt2` (where keras-hub is installed): keras-hub's `GPT2Backbone` at 4 blocks of 32 (2 heads, a gelu FFN of 64,
  no dropout), its residual additions inside its blocks' `call`, on the same task as token ids, mean-pooled.

Initializations: `glorot_uniform` (Keras's default; for `gpt2`, keras-hub's own: normal with deviation 0.02),
`keras_lsuv.lsuv_init` plain (`lsuv`), with `center=True`
(`lsuv_center`), with `residual="stream"` (`lsuv_stream`, residual networks only) and with both
(`lsuv_stream_center`), and the Keras 3 peer `anyinit`
0.4.0 in its `empirical` and `analytic` modes (`anyinit_empirical`, `anyinit_analytic`; skipped when the package is
not installed: `pip install anyinit==0.4.0`). Every LSUV and anyinit run uses 256 training samples and the run's
seed. For each network and seed 0, the variance of the residual stream after each block is measured at
initialization (the output of every addition).
"""

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np
from deep_thin_nets import CompiledArchitecture, Task, fit_run, load_digits_task

import keras_lsuv

LSUV_OPTIONS = {
    "lsuv": {},
    "lsuv_center": {"center": True},
    "lsuv_stream": {"residual": "stream"},
    "lsuv_stream_center": {"residual": "stream", "center": True},
}
ANYINIT_MODES = {"anyinit_empirical": "empirical", "anyinit_analytic": "analytic"}
INITIALIZATIONS = ("glorot_uniform", *LSUV_OPTIONS, *ANYINIT_MODES)
LSUV_BATCH = 256
HAS_ANYINIT = importlib.util.find_spec("anyinit") is not None


@dataclasses.dataclass
class Grid:
    """What the study runs: every network x learning rate x initialization x seed.

    Args:
        networks: The networks (keys of `NETWORKS`).
        learning_rates: Initial learning rates.
        seeds: One run per seed.
        epochs: Epochs per run.
        initializations: The initializations compared (those of anyinit only where it is installed).
    """

    networks: tuple[str, ...]
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int
    initializations: tuple[str, ...] = INITIALIZATIONS


FULL_GRID = Grid(("resnet", "conv_stack", "transformer"), (0.005, 0.02), (0, 1, 2), epochs=10)
QUICK_GRID = Grid(("resnet",), (0.02,), (0,), epochs=2, initializations=("lsuv", "lsuv_stream"))


def digit_images():
    """scikit-learn's digits as 8x8x1 images (the split and scaling of `deep_thin_nets.load_digits_task`)."""
    task = load_digits_task()
    images = {name: getattr(task, name).reshape(-1, 8, 8, 1) for name in ("x_train", "x_test")}
    return dataclasses.replace(task, name="digits_images", convolutional=True, **images)


def majority_task(length=16, vocabulary=8, train=2000, test=500):
    """Sequences of `length` uniform random tokens (one-hot); the label is the most frequent token (the lowest on a
    tie). Generated with seed 0."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocabulary, size=(train + test, length))
    labels = np.array([np.bincount(row, minlength=vocabulary).argmax() for row in tokens], dtype="int32")
    x = np.eye(vocabulary, dtype="float32")[tokens]
    return Task("majority", x[:train], labels[:train], x[train:], labels[train:], convolutional=False, threshold=0.9)


def resnet(task, blocks=8, width=16):
    """Post-activation residual blocks without normalization: `relu(x + conv(relu(conv(x))))`."""
    inputs = keras.Input(task.x_train.shape[1:])
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    for _ in range(blocks):
        h = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        h = keras.layers.Conv2D(width, 3, padding="same")(h)
        x = keras.layers.Activation("relu")(keras.layers.Add()([x, h]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def conv_stack(task, depth=16, width=16):
    """A plain stack of `depth` relu convolutions, global average pooling and a linear classifier."""
    model = keras.Sequential([keras.Input(task.x_train.shape[1:])])
    for _ in range(depth):
        model.add(keras.layers.Conv2D(width, 3, padding="same", activation="relu"))
    model.add(keras.layers.GlobalAveragePooling2D())
    model.add(keras.layers.Dense(10))
    return model


def transformer(task, blocks=4, width=32, heads=2):
    """Pre-LN transformer blocks written with `x + ...` (no `Add` layers), mean-pooled into a linear classifier."""
    inputs = keras.Input(task.x_train.shape[1:])
    x = keras.layers.Dense(width)(inputs)
    for _ in range(blocks):
        h = keras.layers.LayerNormalization()(x)
        x = x + keras.layers.MultiHeadAttention(heads, width // heads)(h, h)
        h = keras.layers.Dense(2 * width, activation="relu")(keras.layers.LayerNormalization()(x))
        x = x + keras.layers.Dense(width)(h)
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(x))
    return keras.Model(inputs, keras.layers.Dense(int(task.y_train.max()) + 1)(x))


def majority_ids_task():
    """`majority_task` with token ids in place of one-hot vectors (for a model with a token embedding)."""
    task = majority_task()
    ids = {name: getattr(task, name).argmax(-1).astype("int32") for name in ("x_train", "x_test")}
    return dataclasses.replace(task, name="majority_ids", **ids)


def gpt2(task, blocks=4, width=32, heads=2):
    """keras-hub's `GPT2Backbone` (pre-LN `TransformerDecoder` blocks, their residual additions inside the blocks'
    `call`), built from its config at `blocks` x `width`, without dropout, mean-pooled into a linear classifier."""
    import keras_hub

    length = task.x_train.shape[1]
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=int(task.x_train.max()) + 1,
        num_layers=blocks,
        num_heads=heads,
        hidden_dim=width,
        intermediate_dim=2 * width,
        dropout=0.0,
        max_sequence_length=length,
    )
    ids = keras.Input((length,), dtype="int32")
    hidden = backbone({"token_ids": ids, "padding_mask": keras.ops.ones_like(ids)})
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    return keras.Model(ids, keras.layers.Dense(int(task.y_train.max()) + 1)(pooled))


# Each network: its builder, its task, and whether it has residual connections.
NETWORKS = {"resnet": (resnet, digit_images, True), "conv_stack": (conv_stack, digit_images, False)}
NETWORKS["transformer"] = (transformer, majority_task, True)
if importlib.util.find_spec("keras_hub") is not None:
    NETWORKS["gpt2"] = (gpt2, majority_ids_task, True)


def initialize(build, task, initialization, seed):
    """A fresh network of `build`, initialized; returns it and whether the initializer reported success."""
    keras.utils.set_random_seed(seed)
    model = build(task)
    batch = task.x_train[:LSUV_BATCH]
    if initialization in LSUV_OPTIONS:
        with warnings.catch_warnings():  # a layer that does not converge is recorded in the run instead
            warnings.simplefilter("ignore", UserWarning)
            report = keras_lsuv.lsuv_init(model, batch, seed=seed, verbose=0, **LSUV_OPTIONS[initialization])
        return model, report.converged
    if initialization in ANYINIT_MODES:
        import anyinit

        report = anyinit.initialize(model, ANYINIT_MODES[initialization], batch, seed=seed)
        try:
            report.assert_healthy()
        except AssertionError:
            return model, False
        return model, True
    return model, None


def stream_variances(model, x):
    """The variance of the output of every addition of the model's graph (the residual stream after each block), in
    graph order, measured in a plain forward pass; for a model whose additions are inside its blocks' `call`
    (keras-hub's GPT-2), the output of each block."""
    blocks = [layer for layer in model._flatten_layers() if type(layer).__name__ == "TransformerDecoder"]
    if blocks:
        return block_output_variances(model, x, blocks)
    additions = [op for op in model.operations if type(op).__name__ == "Add"]
    probe = keras.Model(model.inputs[0], [op.output for op in additions])
    return [float(np.var(keras.ops.convert_to_numpy(output))) for output in probe(x, training=False)]


def block_output_variances(model, x, blocks):
    """The variance of each block's output (the stream after its second addition) in a plain forward pass, read by
    an instance-level `call` on each block, removed afterwards."""
    variances = []

    def recorded(call):
        def record(*args, **kwargs):
            output = call(*args, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
            variances.append(float(np.var(keras.ops.convert_to_numpy(hidden))))
            return output

        return record

    for block in blocks:
        vars(block)["call"] = recorded(block.call)
    try:
        model(x, training=False)
    finally:
        for block in blocks:
            vars(block).pop("call", None)
    return variances


def dead_channels(model, x):
    """The fraction of the relu convolutions' output channels that are zero on every sample and position of `x`."""
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    outputs = keras.Model(model.inputs[0], [layer.output for layer in convolutions])(x, training=False)
    dead = [np.all(keras.ops.convert_to_numpy(output) <= 0, axis=(0, 1, 2)) for output in outputs]
    return float(np.mean(np.concatenate(dead)))


def run_study(grid):
    """Every network x learning rate x initialization x seed; returns the runs and, for seed 0 at initialization,
    the stream variances of the residual networks and the dead channels of the others."""
    runs, streams = [], {}
    initializations = [i for i in grid.initializations if HAS_ANYINIT or i not in ANYINIT_MODES]
    for name in grid.networks:
        build, load, residual = NETWORKS[name]
        task = load()
        for initialization in initializations:
            if initialization.startswith("lsuv_stream") and not residual:
                continue
            model, _ = initialize(build, task, initialization, seed=0)
            batch = task.x_train[:LSUV_BATCH]
            streams[(name, initialization)] = (
                stream_variances(model, batch) if residual else dead_channels(model, batch)
            )
        for learning_rate in grid.learning_rates:
            start = time.perf_counter()
            architecture = CompiledArchitecture(build(task), task, grid.epochs, learning_rate)
            for initialization in initializations:
                if initialization.startswith("lsuv_stream") and not residual:
                    continue
                for seed in grid.seeds:
                    began = time.perf_counter()
                    model, converged = initialize(build, task, initialization, seed)
                    init_seconds = time.perf_counter() - began
                    result = fit_run(architecture, task, model, grid.epochs)
                    runs.append(
                        {
                            "network": name,
                            "learning_rate": learning_rate,
                            "initialization": initialization,
                            "seed": seed,
                            "init_seconds": init_seconds,
                            "converged": converged,
                            **result,
                        }
                    )
            finished = [r for r in runs if (r["network"], r["learning_rate"]) == (name, learning_rate)]
            accuracies = "  ".join(
                f"{i}={np.mean([r['test_accuracy'] for r in finished if r['initialization'] == i]):.3f}"
                for i in initializations
                if any(r["initialization"] == i for r in finished)
            )
            print(f"{name} lr {learning_rate}: {accuracies}  ({time.perf_counter() - start:.0f}s)", flush=True)
    return runs, streams


def accuracy_table(runs):
    """A markdown table: one row per network x initialization, one column per learning rate (mean ± std accuracy)."""
    rates = sorted({r["learning_rate"] for r in runs})
    lines = [
        "| network | initialization | " + " | ".join(f"lr {rate:g}" for rate in rates) + " |",
        "|---|---|" + "---|" * len(rates),
    ]
    for network in dict.fromkeys(r["network"] for r in runs):
        for initialization in INITIALIZATIONS:
            cells = []
            for rate in rates:
                group = [
                    r["test_accuracy"]
                    for r in runs
                    if (r["network"], r["initialization"], r["learning_rate"]) == (network, initialization, rate)
                ]
                cells.append(f"{np.mean(group):.3f} ± {np.std(group):.3f}" if group else "")
            if any(cells):
                lines.append(f"| {network} | {initialization} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stream_table(streams):
    """A markdown table of the residual stream's variance after each block (residual networks), or the fraction of
    dead relu channels (plain ones), at initialization, one row per network x initialization."""
    lines = ["| network | initialization | at initialization (seed 0) |", "|---|---|---|"]
    for (network, initialization), values in streams.items():
        if isinstance(values, float):
            cell = f"{values:.0%} of the relu channels dead on the batch"
        else:
            where = "block" if network == "gpt2" else "addition"  # keras-hub's blocks: read at each block's output
            cell = f"stream variance after each {where}: " + ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {network} | {initialization} | {cell} |")
    return "\n".join(lines)


def real_model_streams():
    """The stream variance after each addition of keras.applications ResNet50 (128x128, batch 16) and a GPT-2 stack
    (12 x 768, 8 x 128 token ids), after plain and residual-aware LSUV (seed 0); a markdown table, and the time of
    each `lsuv_init` call."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import models  # the benchmarks' real models

    lines = ["| model | LSUV | seconds | stream variance after each addition |", "|---|---|---|---|"]
    for name, arguments, batch in (("ResNet50", (128,), 16), ("GPT-2", (12, 768, 12, 128), 8)):
        for label, options in (("plain", {}), ("residual='stream'", {"residual": "stream"})):
            model, x = models.real_model(name, arguments, batch)
            start = time.perf_counter()
            keras_lsuv.lsuv_init(model, x, seed=0, verbose=0, **options)
            seconds = time.perf_counter() - start
            values = ", ".join(f"{v:.2f}" for v in stream_variances(model, x))
            lines.append(f"| {name} | {label} | {seconds:.1f} | {values} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small slice of the grid (CI)")
    parser.add_argument("--real-models-only", action="store_true", help="only the real models' stream variances")
    parser.add_argument("--networks", help="comma-separated networks to run (default: all of the grid)")
    parser.add_argument("--initializations", help="comma-separated initializations (default: all of the grid)")
    parser.add_argument("--results-json", type=Path, help="write every run and the tables here")
    args = parser.parse_args(argv)
    if args.real_models_only:
        print(real_model_streams())
        return None
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.networks:
        grid = dataclasses.replace(grid, networks=tuple(args.networks.split(",")))
    if args.initializations:
        grid = dataclasses.replace(grid, initializations=tuple(args.initializations.split(",")))
    print(f"backend: {keras.backend.backend()}, grid: {grid}, anyinit: {HAS_ANYINIT}", flush=True)
    start = time.perf_counter()
    runs, streams = run_study(grid)
    minutes = (time.perf_counter() - start) / 60
    print("\n" + accuracy_table(runs) + "\n\n" + stream_table(streams))
    seconds = {
        i: statistics.median(r["init_seconds"] for r in runs if r["initialization"] == i)
        for i in INITIALIZATIONS
        if any(r["initialization"] == i for r in runs)
    }
    print("\nmedian initialization seconds: " + ", ".join(f"{i} {s:.2f}" for i, s in seconds.items()))
    print(f"study wall time: {minutes:.1f} min ({len(runs)} runs)")
    if args.results_json is not None:
        args.results_json.parent.mkdir(parents=True, exist_ok=True)
        streams_json = {f"{network}/{initialization}": v for (network, initialization), v in streams.items()}
        args.results_json.write_text(json.dumps({"minutes": minutes, "streams": streams_json, "runs": runs}, indent=1))
    return runs


if __name__ == "__main__":
    main()
