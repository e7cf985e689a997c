"""LSUV cost per backend: time and memory relative to a forward pass, the PyTorch peer, BN overhead, initializer.

Run: .venv/bin/python benchmarks/run.py [--quick | --gpu] [--backends tensorflow,jax,torch] [--repeats 3]

Prints a markdown report and writes it to docs/benchmarks.md (`--output`; `--quick` writes nothing unless
`--output` is given). Each backend runs in its own process (Keras fixes the backend per process), and every ratio
divides two times measured in that same process. Sections:

1. Cost vs depth: a warm eager forward pass `model(x, training=False)` (under `torch.no_grad()` on torch), then
   `lsuv_init` with each engine, as a ratio to that forward pass; median of `--repeats` calls after a first call,
   which is reported on its own (tracing, JAX per-op compiles). The sub-model engine is O(depth²) and only runs on
   models with at most `SUBMODEL_MAX_TARGETS` target layers.
2. Real models (`real_models.py`): a GPT-2 block stack and ResNet50: forward, full LSUV, rescale only, step 1 alone,
   and how many times one rescale-only `lsuv_init` reads values back to the host (each read makes an accelerator
   wait for the host; on a CPU, where a read costs nothing, the engine reads once per layer).
3. The PyTorch peer, the `lsuv` package by the paper's first author, on the same Conv2d/ReLU stack and on a torch
   ResNet50 (torch process only). Install it with `.venv/bin/pip install -c requirements/constraints.txt lsuv`;
   without it the section is skipped with a message.
4. Initializer: `benchmarks/initializer.py`'s Orthonormal vs `keras.initializers.Orthogonal` (without the SVD) and
   vs one same-size float32 matrix product.
5. Training overhead: time per warm `train_on_batch` step of a conv net after LSUV vs the same net with
   BatchNormalization after every conv.
6. Memory: peak resident memory of `lsuv_init` relative to a forward pass, each in a fresh process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import initializer
import real_models

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = "tensorflow,jax,torch"
SUBMODEL_MAX_TARGETS = 32
FULL = {
    "depths": [8, 32, 128],
    "batch": 64,
    "image": (32, 32, 8),
    "applications": {},  # name: batch size, on 32x32x3 inputs, e.g. {"MobileNetV2": 8}
    # (name, model factory arguments, batch): GPT-2 (layers, width, heads, tokens per sequence); ResNet50 (image).
    # The small batches of issue 9's table; its target batches (GPT-2 32x128 tokens, ResNet50 batch 64) take too
    # long for the run on a shared 2-core machine: `--real-models all` adds them.
    "real_models": [("GPT-2", (12, 768, 12, 128), 4), ("ResNet50", (128,), 16)],
    "peer_resnet": {"image": 64, "batch": 8, "blocks": (3, 4, 6, 3), "width": 64},
    "peer_depths": [8, 16],
    "train_depth": 16,
    "train_steps": 3,
    "memory_depth": 32,
    "initializer_shapes": initializer.SHAPES,
}
TARGET_BATCHES = [("GPT-2", (12, 768, 12, 128), 32), ("ResNet50", (128,), 64)]
# scripts/gpu_bench.sh: the GPU sizes (GPT-2 medium 24 x 1024 at 8 x 512 tokens, ResNet50 224² batch 64).
GPU = {
    **FULL,
    "real_models": [("GPT-2", (24, 1024, 16, 512), 8), ("ResNet50", (224,), 64)],
    "peer_resnet": {"image": 224, "batch": 64, "blocks": (3, 4, 6, 3), "width": 64},
}
QUICK = {
    "depths": [2, 4],
    "batch": 4,
    "image": (8, 8, 3),
    "applications": {},
    "real_models": [("GPT-2", (2, 64, 4, 16), 2)],
    "peer_resnet": {"image": 32, "batch": 2, "blocks": (1, 1, 1, 1), "width": 8},
    "peer_depths": [2, 4],
    "train_depth": 2,
    "train_steps": 1,
    "memory_depth": 4,
    "initializer_shapes": [(64, 64), (3, 3, 16, 16)],
}


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


def conv_stack(depth, image, batch_norm=False):
    """`depth` Conv2D(16, 3, relu) layers (or Conv2D, BatchNormalization, ReLU), pooled to 10 logits if BN."""
    import keras

    layers = [keras.Input(image)]
    for _ in range(depth):
        if batch_norm:
            layers += [
                keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
            ]
        else:
            layers.append(keras.layers.Conv2D(16, 3, padding="same", activation="relu"))
    return keras.Sequential(layers)


def classifier(depth, image, batch_norm):
    """`conv_stack` followed by global average pooling and a 10-way Dense, compiled with SGD."""
    import keras

    model = keras.Sequential(
        [conv_stack(depth, image, batch_norm), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    )
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def inputs(batch, image):
    import numpy as np

    return np.random.default_rng(0).normal(size=(batch, *image)).astype("float32")


def forward(model, x):
    """One eager forward pass, gradient recording off (torch), values fetched to the host."""
    import keras

    from keras_lsuv.inference import inference_mode

    with inference_mode():
        return keras.ops.convert_to_numpy(model(x, training=False))


def lsuv(model, x, engine, orthonormal=True):
    import keras_lsuv

    return keras_lsuv.lsuv_init(model, x, engine=engine, orthonormal=orthonormal, seed=0, force=True, verbose=0)


@contextlib.contextmanager
def counted_host_reads():
    """Counts the values read back to the host (`keras.ops.convert_to_numpy`, which LSUV uses) inside the block.

    Yields:
        A list that gets one item per read.
    """
    from keras import ops

    convert, reads = ops.convert_to_numpy, []

    def counted(x):
        reads.append(1)
        return convert(x)

    ops.convert_to_numpy = counted
    try:
        yield reads
    finally:
        ops.convert_to_numpy = convert


def cost_rows(config, repeats):
    """Section 1: forward, single_pass and submodel times for the conv stacks and the applications."""
    import keras

    models = [
        (f"Conv2D x{d}", conv_stack(d, config["image"]), config["batch"], config["image"]) for d in config["depths"]
    ]
    for name, batch in config["applications"].items():
        application = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3))
        models.append((f"{name} 32x32x3", application, batch, (32, 32, 3)))
    for name, model, batch, image in models:
        x = inputs(batch, image)
        row = {"model": name, "batch": batch}
        row["forward_first"], row["forward"], _ = first_and_median(functools.partial(forward, model, x), repeats)
        row["single_pass_first"], row["single_pass"], result = first_and_median(
            functools.partial(lsuv, model, x, "single_pass"), repeats
        )
        row["targets"] = len(result.records)
        _, row["rescale_only"], _ = first_and_median(functools.partial(lsuv, model, x, "single_pass", False), repeats)
        if row["targets"] <= SUBMODEL_MAX_TARGETS:
            row["submodel_first"], row["submodel"], _ = first_and_median(
                functools.partial(lsuv, model, x, "submodel"), repeats
            )
        yield row


def real_rows(config, repeats):
    """Section 2: forward, full LSUV, rescale only and step 1 alone on GPT-2 and ResNet50, one timed call each.

    The models are large for a 2-core CPU, so each time is the call after a first (warm-up) one, not a median.
    """
    import keras

    from keras_lsuv.orthonormal import redraw_orthonormal
    from keras_lsuv.targets import find_targets

    for name, arguments, batch in config["real_models"]:
        keras.backend.clear_session()
        if name == "GPT-2":
            layers, width, _, tokens = arguments
            model, x = real_models.gpt2(*arguments), real_models.token_ids(batch, tokens)
            label = f"GPT-2 {layers}x{width}, {batch}x{tokens} tokens"
        else:
            (image,) = arguments
            model, x = real_models.resnet50(image), inputs(batch, (image, image, 3))
            label = f"ResNet50 {image}x{image}, batch {batch}"
        targets = [t for t in find_targets(model) if not t.skip_reason]

        def step1(targets=targets):
            redraw_orthonormal(targets, seed=0)
            keras.ops.convert_to_numpy(targets[-1].kernels[-1])  # waits for the asynchronous dispatch (JAX)

        row = {"model": label, "batch": batch, "targets": len(targets)}
        row["forward_first"], row["forward"], _ = first_and_median(functools.partial(forward, model, x), 1)
        row["lsuv_first"], row["lsuv"], _ = first_and_median(functools.partial(lsuv, model, x, "single_pass"), 1)
        with counted_host_reads() as reads:  # a Python call per read: nothing against a layer's time
            _, row["rescale_only"], _ = first_and_median(functools.partial(lsuv, model, x, "single_pass", False), 1)
        row["reads"] = len(reads) // 2  # two identical calls
        row["step1_first"], row["step1"], _ = first_and_median(step1, 1)
        yield row


def peer_resnet_rows(config, repeats):
    """Section 3: the `lsuv` package on a torch ResNet50 and ours on Keras's, same images and batch (torch only)."""
    try:
        import lsuv as peer
    except ImportError:
        yield {"missing": "pip install -c requirements/constraints.txt lsuv"}
        return
    import keras
    import torch

    setup = config["peer_resnet"]
    image, batch = setup["image"], setup["batch"]
    model = real_models.torch_resnet50(setup["blocks"], setup["width"]).eval()
    x = torch.from_numpy(inputs(batch, (3, image, image)))

    def run_forward():
        with torch.no_grad():
            model(x)

    row = {"model": f"ResNet50 {image}x{image}" if setup["blocks"] == (3, 4, 6, 3) else "small ResNet", "batch": batch}
    row["forward_first"], row["forward"], _ = first_and_median(run_forward, 1)
    start = time.perf_counter()
    peer.lsuv_with_singlebatch(model, x, verbose=False)  # one call: it re-runs the model for every layer
    row["peer"] = time.perf_counter() - start
    if setup["blocks"] == (3, 4, 6, 3):
        keras.backend.clear_session()
        ours, x = real_models.resnet50(image), inputs(batch, (image, image, 3))
        _, row["ours_forward"], _ = first_and_median(functools.partial(forward, ours, x), 1)
        _, row["ours"], _ = first_and_median(functools.partial(lsuv, ours, x, "single_pass"), 1)
    yield row


def peer_rows(config, repeats):
    """Section 3: the `lsuv` package on an equivalent torch Conv2d/ReLU stack, NCHW, under no_grad for forward."""
    try:
        import lsuv as peer
    except ImportError:
        yield {"missing": "pip install -c requirements/constraints.txt lsuv"}
        return
    import torch

    height, width, channels = config["image"]
    x = torch.from_numpy(inputs(config["batch"], (channels, height, width)))
    for depth in config["peer_depths"]:
        layers = []
        for i in range(depth):
            layers += [torch.nn.Conv2d(channels if i == 0 else 16, 16, 3, padding=1), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers).eval()

        def run_forward(m=model):
            with torch.no_grad():
                m(x)

        row = {"model": f"Conv2d x{depth}", "batch": config["batch"]}
        row["forward_first"], row["forward"], _ = first_and_median(run_forward, repeats)
        row["peer_first"], row["peer"], _ = first_and_median(
            lambda m=model: peer.lsuv_with_singlebatch(m, x, verbose=False), repeats
        )
        yield row


def initializer_rows(config, repeats):
    """Section 4: `benchmarks/initializer.py`'s worker (one JSON row per shape), without the SVD.

    The median of up to 15 timed draws, fewer once they take half a second (`initializer.BUDGET_SECONDS`): one
    for a 4096x4096 draw, which takes seconds on 2 cores.
    """
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        initializer.worker(15, config["initializer_shapes"], with_svd=False)
    yield from (json.loads(line) for line in printed.getvalue().splitlines())


def training_rows(config, repeats):
    """Section 5: warm `train_on_batch` time of the LSUV-initialized net and of the BN net."""
    import numpy as np

    x = inputs(config["batch"], config["image"])
    y = np.arange(config["batch"]) % 10
    row = {"model": f"Conv2D x{config['train_depth']}", "batch": config["batch"]}
    for variant in ("lsuv", "bn"):
        model = classifier(config["train_depth"], config["image"], batch_norm=variant == "bn")
        if variant == "lsuv":
            lsuv(model, x, "single_pass")
        model.train_on_batch(x, y)  # builds the optimizer, traces the train function

        def steps(m=model):
            for _ in range(config["train_steps"]):
                m.train_on_batch(x, y)

        row[variant] = first_and_median(steps, repeats)[1] / config["train_steps"]
    yield row


def memory_probe(config, mode):
    """Section 6, in a fresh process: the peak resident memory above the built model during the first `mode` call.

    The peak (VmHWM) is reset through `/proc/self/clear_refs` just before the call, so that the imports and the
    model's construction do not count, and the resident memory at that point is subtracted from it.
    """
    import keras

    def rss(field):
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field))) * 1024

    model = conv_stack(config["memory_depth"], config["image"])
    x = inputs(config["batch"], config["image"])
    call = (lambda: forward(model, x)) if mode == "forward" else (lambda: lsuv(model, x, "single_pass"))
    Path("/proc/self/clear_refs").write_text("5")
    before = rss("VmRSS:")
    call()
    row = {"mode": mode, "backend": keras.backend.backend(), "before": before, "peak": rss("VmHWM:")}
    print(json.dumps(row), flush=True)


SECTIONS = {
    "cost": cost_rows,
    "real": real_rows,
    "peer": peer_rows,
    "peer_resnet": peer_resnet_rows,
    "initializer": initializer_rows,
    "training": training_rows,
}


def worker(config, repeats):
    """Runs every section in this process's backend; prints one JSON row per result, tagged with its section."""
    import keras

    for section, rows in SECTIONS.items():
        if section.startswith("peer") and keras.backend.backend() != "torch":
            continue
        for row in rows(config, repeats):
            print(json.dumps({"section": section, "backend": keras.backend.backend(), **row}), flush=True)


def run_process(backend, *arguments):
    """Runs this script with `arguments` under KERAS_BACKEND=`backend`; returns its JSON rows."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    command = [sys.executable, __file__, *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{backend} {' '.join(arguments)} failed:\n{result.stderr}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def ratio(row, key, base="forward"):
    return f"{row[key] / row[base]:.2f}" if key in row else "not run"


def cost_section(rows):
    header = ["backend", "model", "targets", "batch", "forward (ms)", "forward 1st (ms)"]
    header += ["single_pass / fwd", "single_pass 1st / fwd", "rescale only / fwd", "submodel / fwd"]
    header += ["submodel 1st / fwd"]
    body = [
        [
            r["backend"],
            r["model"],
            r["targets"],
            r["batch"],
            f"{1e3 * r['forward']:.0f}",
            f"{1e3 * r['forward_first']:.0f}",
        ]
        + [ratio(r, k) for k in ("single_pass", "single_pass_first", "rescale_only", "submodel", "submodel_first")]
        for r in rows
    ]
    return table(header, body)


def real_section(rows):
    header = ["backend", "model", "targets", "forward (s)", "forward 1st (s)", "full LSUV / fwd", "LSUV 1st / fwd"]
    header += ["rescale only / fwd", "host reads (rescale)", "step 1 alone / fwd", "step 1 1st (s)", "full LSUV (s)"]
    body = [
        [r["backend"], r["model"], r["targets"], f"{r['forward']:.2f}", f"{r['forward_first']:.2f}"]
        + [ratio(r, k) for k in ("lsuv", "lsuv_first", "rescale_only")]
        + [r["reads"], ratio(r, "step1"), f"{r['step1_first']:.2f}", f"{r['lsuv']:.2f}"]
        for r in rows
    ]
    return table(header, body)


def peer_resnet_section(rows):
    if any("missing" in r for r in rows):
        return f"Skipped: the `lsuv` package is not installed (`{rows[0]['missing']}`)."
    header = ["model", "batch", "torch forward (s)", "`lsuv` peer (s)", "peer / its fwd"]
    header += ["Keras forward (s)", "ours (s)", "ours / Keras fwd", "ours / peer"]
    body = []
    for r in rows:
        mine = [f"{r['ours_forward']:.2f}", f"{r['ours']:.2f}", ratio(r, "ours", "ours_forward")] if "ours" in r else []
        mine = mine + [ratio(r, "ours", "peer")] if mine else ["not run"] * 4
        body.append([r["model"], r["batch"], f"{r['forward']:.2f}", f"{r['peer']:.2f}", ratio(r, "peer"), *mine])
    return table(header, body)


def peer_section(peer_rows_, cost_rows_):
    if any("missing" in r for r in peer_rows_):
        return f"Skipped: the `lsuv` package is not installed (`{peer_rows_[0]['missing']}`)."
    ours = {r["model"]: r for r in cost_rows_ if r["backend"] == "torch"}
    header = [
        "model",
        "forward (ms)",
        "lsuv (peer) / fwd",
        "peer 1st / fwd",
        "ours single_pass / fwd",
        "ours submodel / fwd",
    ]
    body = []
    for r in peer_rows_:
        mine = ours.get(r["model"].replace("Conv2d", "Conv2D"), {})
        mine_ratios = [ratio(mine, k) if mine else "not run" for k in ("single_pass", "submodel")]
        body.append([r["model"], f"{1e3 * r['forward']:.1f}", ratio(r, "peer"), ratio(r, "peer_first"), *mine_ratios])
    return table(header, body)


def initializer_section(rows):
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
        for r in rows
    ]
    header = ["backend", "shape", "Orthogonal (ms)", "Orthonormal (ms)", "matmul (ms)"]
    return table(header + ["Orthonormal / Orthogonal", "Orthonormal / matmul", "Gaussian alone / matmul"], body)


def training_section(rows):
    body = [
        [
            r["backend"],
            r["model"],
            r["batch"],
            f"{1e3 * r['lsuv']:.0f}",
            f"{1e3 * r['bn']:.0f}",
            f"{r['bn'] / r['lsuv']:.2f}",
        ]
        for r in rows
    ]
    return table(["backend", "model", "batch", "LSUV step (ms)", "BN step (ms)", "BN / LSUV"], body)


def memory_section(rows):
    by_backend = {}
    for r in rows:
        by_backend.setdefault(r["backend"], {})[r["mode"]] = r
    body = []
    for backend, modes in by_backend.items():
        fwd, init = (modes[m]["peak"] - modes[m]["before"] for m in ("forward", "lsuv"))
        totals = [f"{modes[m][k] / 2**20:.0f}" for m in ("forward", "lsuv") for k in ("before", "peak")]
        body.append([backend, f"{fwd / 2**20:.1f}", f"{init / 2**20:.1f}", f"{init / max(fwd, 1):.2f}", *totals])
    header = ["backend", "forward peak increase (MiB)", "LSUV peak increase (MiB)", "LSUV / forward"]
    header += ["forward: RSS before (MiB)", "forward: peak (MiB)", "LSUV: RSS before (MiB)", "LSUV: peak (MiB)"]
    return table(header, body)


def targets_section(rows):
    """The issue's targets, checked against the measured rows."""
    lines = []
    for backend in dict.fromkeys(r["backend"] for r in rows["cost"]):
        stacks = [r for r in rows["cost"] if r["backend"] == backend and r["model"].startswith("Conv2D")]
        single = [r["single_pass"] / r["forward"] for r in stacks]
        flat = single[-1] / single[0]
        sub = [f"{r['submodel'] / r['forward']:.1f}" for r in stacks if "submodel" in r]
        lines.append(
            f"- {backend}: single_pass ≤ 2.0x forward at every depth: {verdict(max(single) <= 2.0)} "
            f"(max {max(single):.2f}); deepest / shallowest ratio ≤ 1.2: {verdict(flat <= 1.2)} ({flat:.2f}); "
            f"submodel ratio by depth: {', '.join(sub)}."
        )
    for backend in dict.fromkeys(r["backend"] for r in rows["real"]):
        for model in ("GPT-2 12x768, 32x128 tokens", "ResNet50 128x128, batch 64"):
            row = next((r for r in rows["real"] if r["backend"] == backend and r["model"] == model), None)
            if row is None:
                lines.append(f"- {backend} full LSUV ≤ 2x forward on {model}: not measured (`--real-models all`)")
                continue
            value = row["lsuv"] / row["forward"]
            lines.append(f"- {backend} full LSUV ≤ 2x forward on {model}: {verdict(value <= 2)} ({value:.2f})")
    for r in rows["peer_resnet"]:
        if "ours" in r:
            lines.append(
                f"- torch, {r['model']} batch {r['batch']}: our full LSUV faster than the `lsuv` peer: "
                f"{verdict(r['ours'] < r['peer'])} ({r['ours']:.1f} s vs {r['peer']:.1f} s)"
            )
    for r in rows["initializer"]:
        shape, value = "x".join(map(str, r["shape"])), r["Orthonormal"] / r["Orthogonal"]
        to_matmul = r["Orthonormal"] / r["matmul"]
        lines.append(
            f"- {r['backend']} at {shape}: Orthonormal never slower than Orthogonal: {verdict(value <= 1.0)} "
            f"({value:.2f}); within 3x of a same-size matmul: {verdict(to_matmul <= 3)} ({to_matmul:.2f})"
        )
    by_backend = {}
    for r in rows["memory"]:
        by_backend.setdefault(r["backend"], {})[r["mode"]] = r
    for backend, modes in by_backend.items():
        fwd, init = (modes[m]["peak"] - modes[m]["before"] for m in ("forward", "lsuv"))
        value = init / max(fwd, 1)
        lines.append(f"- {backend} LSUV peak memory increase ≤ 1.5x forward's: {verdict(value <= 1.5)} ({value:.2f})")
    return "\n".join(lines)


def load_note():
    """What else ran on the machine: the load average at the end of the run, and whether backends overlapped."""
    one, five, fifteen = os.getloadavg()
    parallel = " The backends' processes ran at the same time (`--parallel`)." if "--parallel" in sys.argv else ""
    return (
        f"Load average at the end of the run: {one:.1f} / {five:.1f} / {fifteen:.1f} over 1 / 5 / 15 minutes, on "
        f"{os.cpu_count()} cores (the benchmark's own processes count in it; more means other jobs shared the "
        f"machine and inflated absolute times). Only the ratios, measured side by side in one process, are "
        f"meaningful.{parallel}"
    )


def verdict(met):
    return "**met**" if met else "**missed**"


def machine(gpu=False):
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


def report(rows, config, command, seconds):
    """The markdown page: method, machine, then one table per section."""
    return f"""# Benchmarks

Generated by `{command}` in {seconds / 60:.1f} minutes on {machine(config is GPU)}
Every ratio divides two times measured in the same process; "1st" is the first call in that process (tracing,
JAX per-op compilation), the other columns the median of the following calls. Timings on a shared 2-core machine
are noisy: read ratios to ±10–20 %. {load_note()}

## Targets

{targets_section(rows)}

## 1. Cost vs depth

A warm eager forward pass `model(x, training=False)` (under `torch.no_grad()` on torch, output fetched to the
host), and `lsuv_init(model, x, engine=..., force=True)` (orthonormal redraw included) on a fresh model, as ratios
to it. Conv stacks: `Conv2D(16, 3, padding="same", activation="relu")` on 32x32x8 inputs. The sub-model engine,
O(depth²), only runs on models with at most {SUBMODEL_MAX_TARGETS} target layers ("not run" otherwise).

Conv stacks use batch {config["batch"]}; the applications a smaller batch (column "batch") to keep the run short.
The orthonormal redraw (step 1) is a fixed cost per model, independent of the batch. "rescale only" is
`lsuv_init(..., orthonormal=False)`: step 2 alone, the engine's own cost.

{cost_section(rows["cost"])}

## 2. Real models

A GPT-2 backbone (`benchmarks/real_models.py`: keras-hub's `GPT2Backbone` cannot be installed beside the pinned
`tensorflow-cpu`, so the same block stack is built from `keras.layers`) and `keras.applications.ResNet50(weights=None)`,
at the small batches of issue 9's table (`--real-models all` adds its target batches, GPT-2 32x128 tokens and
ResNet50 batch 64: about 4 more minutes on 2 cores). Forward is a warm eager pass as above; "full
LSUV" is `lsuv_init` with its defaults (after a first call, reported as "1st"); "step 1 alone" is
`redraw_orthonormal` over every target (the orthonormal draw of all kernels, batched by shape), "1st" its first
call (JAX compiles the draw once per matrix shape). These models are large for 2 cores, so each time is one call
after a first one, not a median. "host reads" counts the values one rescale-only `lsuv_init` reads back to the
host: on a GPU each makes the device wait; on a CPU, where a read costs nothing, the engine reads once per layer
(on a GPU, where the model is fresh, twice per pass).

{real_section(rows["real"])}

## 3. Against the PyTorch `lsuv` package

[`lsuv`](https://pypi.org/project/lsuv/) (by the paper's first author) on the equivalent `nn.Sequential` of
`Conv2d(16, 3, padding=1)` / `ReLU` in NCHW, as a ratio to its own forward pass under `torch.no_grad()`. It
re-runs the whole model for every layer and every rescale. Our ratios are from the torch rows of section 1.

{peer_section(rows["peer"], rows["cost"])}

On a ResNet50: the peer on a hand-written torchvision `resnet50` (`benchmarks/real_models.py`; torchvision itself
does not install beside the pinned CPU torch) and ours on `keras.applications.ResNet50` on the torch backend, same
image size and batch, one call each after a first forward pass (the peer's single call re-runs the whole model for
every layer and rescale, so the batch is kept small).

{peer_resnet_section(rows["peer_resnet"])}

## 4. Orthonormal initializer

`benchmarks/initializer.py`, without its SVD variant: the median time of up to 15 draws (as many as fit in half a
second, at least one) after a warm-up draw of the same shape, values fetched to the host, and of a same-size
float32 matrix product, timed the same way (the kernel's `(m, n)` matrix, `m >= n`, times an `(n, n)` one: a dense
orthonormalization costs 1.3–2.7 times its flops). "Gaussian alone" is `keras.random.normal` of the kernel's shape,
which every QR-based draw starts with: it is a fixed part of the 3x budget against the matmul.

{initializer_section(rows["initializer"])}

## 5. Training overhead of BatchNormalization

Median time per warm `train_on_batch` step (SGD) of the conv stack + global average pooling + Dense(10), after
LSUV, vs the same net with `Conv2D(use_bias=False)`, `BatchNormalization`, `ReLU` blocks.

{training_section(rows["training"])}

## 6. Memory

A forward pass and `lsuv_init` (single_pass) each run once in a fresh process per backend, on the
depth-{config["memory_depth"]} conv stack, batch {config["batch"]} (one activation is
{config["batch"] * config["image"][0] * config["image"][1] * 16 * 4 / 2**20:.0f} MiB). Just before the call the
process's peak resident set is reset (`echo 5 > /proc/self/clear_refs`), so imports and model construction do not
count; the figure is the peak (`VmHWM` in `/proc/self/status`) during the call minus the resident set (`VmRSS`)
just before it. Both calls are first calls, so tracing and JAX compilation memory is included in both. RSS counts
whole pages and allocator caches, so small figures are coarse.

{memory_section(rows["memory"])}
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default=BACKENDS)
    parser.add_argument("--quick", action="store_true", help="tiny models, one repeat: checks the script runs")
    parser.add_argument("--gpu", action="store_true", help="the GPU sizes of the real models (writes nothing)")
    parser.add_argument("--parallel", action="store_true", help="run the backends' processes at the same time")
    parser.add_argument(
        "--real-models", choices=("targets", "all"), default="targets", help="all: the target batches too"
    )
    parser.add_argument("--output", help="markdown file to write (default docs/benchmarks.md, none with --quick)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", choices=("forward", "lsuv"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = QUICK if args.quick else GPU if args.gpu else FULL
    if args.real_models == "all":
        config = {**config, "real_models": config["real_models"] + TARGET_BATCHES}
    repeats = 1 if args.quick else args.repeats
    if args.worker:
        worker(config, repeats)
        return
    if args.memory_probe:
        memory_probe(config, args.memory_probe)
        return
    start = time.perf_counter()
    flags = ["--quick"] * args.quick + ["--gpu"] * args.gpu + ["--repeats", str(repeats)]
    flags += ["--real-models", args.real_models]
    rows = {section: [] for section in [*SECTIONS, "memory"]}

    def measure(backend):
        measured = run_process(backend, "--worker", *flags)
        return measured + [
            {"section": "memory", **row}
            for mode in ("forward", "lsuv")
            for row in run_process(backend, "--memory-probe", mode, *flags)
        ]

    backends = args.backends.split(",")
    with concurrent.futures.ThreadPoolExecutor(len(backends) if args.parallel else 1) as pool:
        for measured in pool.map(measure, backends):
            for row in measured:
                rows[row.pop("section")].append(row)
    command = "python benchmarks/run.py" + "".join(f" {a}" for a in sys.argv[1:])
    page = report(rows, config, command, time.perf_counter() - start)
    print(page)
    output = args.output or (None if args.quick or args.gpu else ROOT / "docs" / "benchmarks.md")
    if output:
        Path(output).write_text(page)


if __name__ == "__main__":
    main()
