"""Study: the initializations of deep nets without normalization under SGD with and without clipping, Adam and AdamW.

The third part of docs/results.md. Run (the full grid on JAX, about 45 minutes on 2 shared CPU cores):

    KERAS_BACKEND=jax .venv/bin/python examples/optimizers.py --results-json build/optimizers_jax.json

Quick slice (what CI runs through `make study-quick`): `--quick`. The tables of saved runs, merged:
`--tables-from build/optimizers_jax.json ...`.

Networks, tasks and initializations are those of `examples/residual_nets.py` (`resnet`, `conv_stack`,
`transformer`; `glorot_uniform`, `lsuv`, `lsuv_center`, `lsuv_stream`, `lsuv_stream_center` on the residual networks
only, and `anyinit` where it is installed), with one deep thin net of `examples/deep_thin_nets.py` (`dense_stack`: 20
relu Dense(32) layers on the flattened digits), trained as there (cosine decay from the learning rate over the run,
batch 100, 10 epochs, seeds 0, 1, 2), with four optimizers, each at a few learning rates:

- `sgd_clip`: SGD, momentum 0.9, `global_clipnorm=10` (the starting gradient norm is 6.6 to 9.6 on these networks);
- `sgd`: the same without clipping (the optimizer of the second part);
- `adam`: Adam with Keras's defaults;
- `adamw`: AdamW with Keras's defaults (weight decay 0.004).

On JAX, the curvature of the training loss at initialization (seed 0) is measured for every network x
initialization: the top eigenvalue of its Hessian by power iteration with Hessian-vector products. Heavy-ball SGD
with momentum 0.9 is stable on a quadratic only while lr x eigenvalue < 2 (1 + 0.9) = 3.8. Beside it, the lower
bound that `report.curvature` measures (`keras_lsuv.stability.kernel_curvature`, along every kernel), for every
start; `--curvature-only` measures both and trains nothing (7 minutes on 2 shared CPU cores).
"""

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import keras
import numpy as np
import residual_nets
from deep_thin_nets import SGD_MOMENTUM, CompiledArchitecture, build_model, fit_run, load_digits_task
from residual_nets import ANYINIT_MODES, HAS_ANYINIT, INITIALIZATIONS, LSUV_BATCH, initialize

from keras_lsuv.stability import kernel_curvature

MOMENTUM = 0.9
OPTIMIZERS = {
    "sgd_clip": functools.partial(keras.optimizers.SGD, momentum=MOMENTUM, global_clipnorm=10),
    "sgd": SGD_MOMENTUM,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
}
# The second part's networks, and one of the first part's deep thin nets: 20 relu Dense(32) layers on the flattened
# digits (plain LSUV 0.82, Keras's default 0.11 there).
NETWORKS = {
    **residual_nets.NETWORKS,
    "dense_stack": (
        functools.partial(build_model, depth=20, activation="relu", batchnorm=False),
        load_digits_task,
        False,
    ),
}
# A learning rate counts as robust when its mean accuracy is within this of the best learning rate's.
ROBUST_MARGIN = 0.02


@dataclasses.dataclass
class Grid:
    """What the study runs: every network x optimizer x learning rate x initialization x seed.

    Args:
        networks: The networks (keys of `NETWORKS`).
        learning_rates: The initial learning rates of each optimizer (keys of `OPTIMIZERS`).
        seeds: One run per seed.
        epochs: Epochs per run.
        initializations: The initializations compared (those of anyinit only where it is installed; the
            `lsuv_stream` ones on residual networks only).
        curvature_samples: Training samples of the curvature's loss (`None`: all of them).
        curvature_iterations: Power iterations of the curvature.
    """

    networks: tuple[str, ...]
    learning_rates: dict[str, tuple[float, ...]]
    seeds: tuple[int, ...]
    epochs: int
    initializations: tuple[str, ...] = INITIALIZATIONS
    curvature_samples: int | None = None
    curvature_iterations: int = 20


FULL_GRID = Grid(
    ("resnet", "conv_stack", "transformer", "dense_stack"),
    {"sgd_clip": (0.005, 0.01, 0.02), "sgd": (0.01,), "adam": (3e-4, 1e-3, 3e-3), "adamw": (1e-3, 3e-3)},
    (0, 1, 2),
    epochs=10,
)
QUICK_GRID = Grid(
    ("resnet",),
    {"sgd_clip": (0.02,), "adam": (1e-3,)},
    (0,),
    epochs=2,
    initializations=("lsuv", "lsuv_center"),
    curvature_samples=200,
    curvature_iterations=5,
)


def initializations_of(grid, network):
    """The grid's initializations that apply to `network` (and are installed)."""
    residual = NETWORKS[network][2]
    return [
        initialization
        for initialization in grid.initializations
        if (HAS_ANYINIT or initialization not in ANYINIT_MODES)
        and (residual or not initialization.startswith("lsuv_stream"))
    ]


def top_hessian_eigenvalue(model, x, y, iterations, seed=0):
    """The top eigenvalue of the Hessian of the mean cross-entropy of `model` on `(x, y)` with respect to its
    trainable weights, by power iteration from a random direction (JAX only: `jax.jvp` of `jax.grad`)."""
    import jax

    trainable = [variable.value for variable in model.trainable_variables]
    non_trainable = [variable.value for variable in model.non_trainable_variables]
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(weights, x, y):
        logits, _ = model.stateless_call(weights, non_trainable, x, training=True)
        return cross_entropy(y, logits)

    @jax.jit
    def hessian_times(direction, weights, x, y):  # arguments, not constants: XLA would fold the forward pass
        return jax.jvp(lambda w: jax.grad(loss)(w, x, y), (weights,), (direction,))[1]

    rng = np.random.default_rng(seed)
    direction = [rng.standard_normal(w.shape).astype("float32") for w in trainable]
    eigenvalue = None
    for _ in range(iterations):
        norm = np.sqrt(sum(float(np.sum(d**2)) for d in direction))
        direction = [d / norm for d in direction]
        product = [np.asarray(p) for p in hessian_times(direction, trainable, x, y)]
        eigenvalue = sum(float(np.sum(d * p)) for d, p in zip(direction, product, strict=True))
        direction = product
    return eigenvalue


def curvatures(grid, network, task):
    """The top Hessian eigenvalue at initialization (seed 0) of every initialization of `network`."""
    build = NETWORKS[network][0]
    count = grid.curvature_samples or len(task.x_train)
    x, y = task.x_train[:count], task.y_train[:count]
    rows = []
    for initialization in initializations_of(grid, network):
        start = time.perf_counter()
        model, _ = initialize(build, task, initialization, seed=0)
        eigenvalue = top_hessian_eigenvalue(model, x, y, grid.curvature_iterations)
        # What `report.curvature` measures (with `center=True` or `residual=`), on the LSUV batch, for every start.
        kernels = [v for v in model.trainable_variables if len(v.shape) >= 2 and not v.path.endswith("bias")]
        along = kernel_curvature(model, task.x_train[:LSUV_BATCH], kernels)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "network": network,
                "initialization": initialization,
                "eigenvalue": eigenvalue,
                "samples": count,
                "along_kernels": along,
            }
        )
        print(
            f"curvature {network} {initialization}: {eigenvalue:.1f} (SGD limit lr {3.8 / eigenvalue:.4f}), along "
            f"the kernels {along:.3g} ({seconds:.0f}s)",
            flush=True,
        )
    return rows


def run_study(grid, results_json=None):
    """Every network x optimizer x learning rate x initialization x seed, and on JAX the curvature at
    initialization; writes what has run to `results_json` after every run. Returns the runs and the curvatures."""
    runs, curvature_rows = [], []

    def save():
        if results_json is not None:
            results = {"backend": keras.backend.backend(), "grid": dataclasses.asdict(grid)}
            results_json.write_text(json.dumps({**results, "curvatures": curvature_rows, "runs": runs}, indent=1))

    if results_json is not None:
        results_json.parent.mkdir(parents=True, exist_ok=True)
    for network in grid.networks:
        build, load, _ = NETWORKS[network]
        task = load()
        if keras.backend.backend() == "jax":
            curvature_rows += curvatures(grid, network, task)
            save()
        for optimizer, learning_rates in grid.learning_rates.items():
            for learning_rate in learning_rates:
                compiled = CompiledArchitecture(build(task), task, grid.epochs, learning_rate, OPTIMIZERS[optimizer])
                for initialization in initializations_of(grid, network):
                    for seed in grid.seeds:
                        began = time.perf_counter()
                        model, converged = initialize(build, task, initialization, seed)
                        result = fit_run(compiled, task, model, grid.epochs)
                        run = {
                            "network": network,
                            "optimizer": optimizer,
                            "learning_rate": learning_rate,
                            "initialization": initialization,
                            "seed": seed,
                            "converged": converged,
                            "run_seconds": time.perf_counter() - began,
                            **result,
                        }
                        runs.append(run)
                        save()
                        print(
                            f"{network} {optimizer} lr {learning_rate:g} {initialization} seed {seed}: "
                            f"accuracy {run['test_accuracy']:.3f}, loss {run['final_loss']:.3g} "
                            f"({run['run_seconds']:.1f}s)",
                            flush=True,
                        )
    return runs, curvature_rows


def mean_accuracies(runs, network, optimizer, initialization):
    """`{learning_rate: (mean, std, runs)}` of the test accuracy over seeds."""
    groups = {}
    for r in runs:
        if (r["network"], r["optimizer"], r["initialization"]) == (network, optimizer, initialization):
            groups.setdefault(r["learning_rate"], []).append(r["test_accuracy"])
    return {rate: (float(np.mean(a)), float(np.std(a)), len(a)) for rate, a in sorted(groups.items())}


def present(runs, key):
    """The values of `runs[key]` in their first-seen order."""
    return list(dict.fromkeys(r[key] for r in runs))


def optimizers_of(runs):
    """The optimizers of `runs`, in the order of `OPTIMIZERS`."""
    return [optimizer for optimizer in OPTIMIZERS if any(r["optimizer"] == optimizer for r in runs)]


def best_table(runs):
    """A markdown table, one row per network x initialization, one column per optimizer: the best mean accuracy
    over the learning rates (± its std over seeds), the learning rate reaching it, and every learning rate whose
    mean is within `ROBUST_MARGIN` of it."""
    optimizers = optimizers_of(runs)
    lines = [
        "| network | initialization | " + " | ".join(optimizers) + " |",
        "|---|---|" + "---|" * len(optimizers),
    ]
    for network in present(runs, "network"):
        for initialization in INITIALIZATIONS:
            cells = []
            for optimizer in optimizers:
                means = mean_accuracies(runs, network, optimizer, initialization)
                if not means:
                    cells.append("")
                    continue
                best_rate = max(means, key=lambda rate: means[rate][0])
                best, std, _ = means[best_rate]
                robust = [f"{rate:g}" for rate, (mean, _, _) in means.items() if mean >= best - ROBUST_MARGIN]
                cells.append(f"{best:.3f} ± {std:.3f} at {best_rate:g} ({', '.join(robust)})")
            if any(cells):
                lines.append(f"| {network} | {initialization} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(runs, network):
    """A markdown table of one network: one row per initialization, one column per optimizer x learning rate (mean ±
    std accuracy over seeds)."""
    columns = sorted({(r["optimizer"], r["learning_rate"]) for r in runs if r["network"] == network})
    order = optimizers_of(runs)
    columns.sort(key=lambda column: (order.index(column[0]), column[1]))
    lines = [
        "| initialization | " + " | ".join(f"{optimizer} {rate:g}" for optimizer, rate in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for initialization in INITIALIZATIONS:
        cells = []
        for optimizer, rate in columns:
            mean, std, _ = mean_accuracies(runs, network, optimizer, initialization).get(rate, (None, None, 0))
            cells.append("" if mean is None else f"{mean:.3f} ± {std:.3f}")
        if any(cells):
            lines.append(f"| {initialization} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curvature_table(curvature_rows):
    """A markdown table of the top Hessian eigenvalue at initialization and heavy-ball SGD's stability limit."""
    limit = 2 * (1 + MOMENTUM)
    lines = [
        f"| network | initialization | top Hessian eigenvalue λ | SGD stable below lr {limit:g}/λ "
        "| along the kernels |",
        "|---|---|---|---|---|",
    ]
    for row in curvature_rows:
        eigenvalue = row["eigenvalue"]
        along = "–" if row.get("along_kernels") is None else f"{row['along_kernels']:.3g}"
        lines.append(
            f"| {row['network']} | {row['initialization']} | {eigenvalue:.1f} | {limit / eigenvalue:.4f} | {along} |"
        )
    return "\n".join(lines)


def tables(runs, curvature_rows):
    """The markdown tables of the study: best learning rate per optimizer, every learning rate per network, and the
    curvature at initialization."""
    parts = []
    if runs:
        parts += ["Best mean accuracy over the learning rates, at lr (learning rates within 0.02 of it):"]
        parts += [best_table(runs)]
    for network in present(runs, "network"):
        parts += [f"{network}: mean ± std accuracy at every learning rate", sweep_table(runs, network)]
    if curvature_rows:
        parts += ["Curvature at initialization (seed 0):", curvature_table(curvature_rows)]
    return "\n\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small slice of the grid (CI)")
    parser.add_argument("--networks", help="comma-separated networks to run (default: all of the grid)")
    parser.add_argument("--initializations", help="comma-separated initializations (default: all of the grid)")
    parser.add_argument("--optimizers", help="comma-separated optimizers to run (default: all of the grid)")
    parser.add_argument("--results-json", type=Path, help="write every run here (after each run)")
    parser.add_argument("--tables-from", type=Path, nargs="+", help="only print the tables of saved results")
    parser.add_argument("--curvature-only", action="store_true", help="only the curvature at initialization (JAX)")
    args = parser.parse_args(argv)
    if args.tables_from:
        saved = [json.loads(path.read_text()) for path in args.tables_from]
        for backend in dict.fromkeys(s["backend"] for s in saved):  # one backend's runs at a time
            same = [s for s in saved if s["backend"] == backend]
            print(
                f"backend: {backend}\n\n"
                + tables([r for s in same for r in s["runs"]], [c for s in same for c in s["curvatures"]])
            )
        return None
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.networks:
        grid = dataclasses.replace(grid, networks=tuple(args.networks.split(",")))
    if args.initializations:
        grid = dataclasses.replace(grid, initializations=tuple(args.initializations.split(",")))
    if args.optimizers:
        rates = {name: grid.learning_rates[name] for name in args.optimizers.split(",")}
        grid = dataclasses.replace(grid, learning_rates=rates)
    if args.curvature_only:
        grid = dataclasses.replace(grid, learning_rates={})
    print(f"backend: {keras.backend.backend()}, grid: {grid}, anyinit: {HAS_ANYINIT}", flush=True)
    start = time.perf_counter()
    runs, curvature_rows = run_study(grid, args.results_json)
    minutes = (time.perf_counter() - start) / 60
    print("\n" + tables(runs, curvature_rows))
    print(f"\nstudy wall time: {minutes:.1f} min ({len(runs)} runs)")
    return runs, curvature_rows


if __name__ == "__main__":
    main()
