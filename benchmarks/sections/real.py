"""Section 2, real models: a GPT-2 block stack and ResNet50 (`models.py`): forward, full LSUV, rescale only, step 1
alone, and how many times one rescale-only `lsuv_init` reads values back to the host.

Each read makes an accelerator wait for the host; on a CPU, where a read costs nothing, the engine reads once per
layer. The models are large for a 2-core CPU, so each time is the call after a first (warm-up) one, not a median.
"""

from __future__ import annotations

import functools

import harness
import models
from page import ratio, table, verdict

# The targets: full LSUV within 2x a forward pass on these (`--real-models all`).
TARGET_MODELS = ("GPT-2 12x768, 32x128 tokens", "ResNet50 128x128, batch 64")


def rows(config, repeats):
    """Forward, full LSUV, rescale only (and its host reads) and step 1 alone, one timed call each."""
    import keras

    from keras_lsuv.orthonormal import redraw_orthonormal
    from keras_lsuv.targets import find_targets

    timed = functools.partial(harness.first_and_median, repeats=1)
    for name, arguments, batch in config["real_models"]:
        keras.backend.clear_session()
        model, x = models.real_model(name, arguments, batch)
        label = models.real_label(name, arguments, batch)
        targets = [t for t in find_targets(model) if not t.skip_reason]

        def step1(targets=targets):
            redraw_orthonormal(targets, seed=0)
            keras.ops.convert_to_numpy(targets[-1].kernels[-1])  # waits for the asynchronous dispatch (JAX)

        row = {"model": label, "batch": batch, "targets": len(targets)}
        row["forward_first"], row["forward"], _ = timed(functools.partial(harness.forward, model, x))
        row["lsuv_first"], row["lsuv"], _ = timed(functools.partial(harness.lsuv, model, x, "single_pass"))
        with harness.counted_host_reads() as reads:  # a Python call per read: nothing against a layer's time
            _, row["rescale_only"], _ = timed(functools.partial(harness.lsuv, model, x, "single_pass", False))
        row["reads"] = len(reads) // 2  # two identical calls
        row["step1_first"], row["step1"], _ = timed(step1)
        yield row


def render(results, config):
    header = ["backend", "model", "targets", "forward (s)", "forward 1st (s)", "full LSUV / fwd", "LSUV 1st / fwd"]
    header += ["rescale only / fwd", "host reads (rescale)", "step 1 alone / fwd", "step 1 1st (s)", "full LSUV (s)"]
    body = [
        [r["backend"], r["model"], r["targets"], f"{r['forward']:.2f}", f"{r['forward_first']:.2f}"]
        + [ratio(r, k) for k in ("lsuv", "lsuv_first", "rescale_only")]
        + [r["reads"], ratio(r, "step1"), f"{r['step1_first']:.2f}", f"{r['lsuv']:.2f}"]
        for r in results["real"]
    ]
    return {"real": table(header, body)}


def targets(results):
    """Full LSUV within 2x a forward pass on the target batches, where they were measured."""
    lines = []
    for backend in dict.fromkeys(r["backend"] for r in results["real"]):
        for model in TARGET_MODELS:
            row = next((r for r in results["real"] if r["backend"] == backend and r["model"] == model), None)
            if row is None:
                lines.append(f"- {backend} full LSUV ≤ 2x forward on {model}: not measured (`--real-models all`)")
                continue
            value = row["lsuv"] / row["forward"]
            lines.append(f"- {backend} full LSUV ≤ 2x forward on {model}: {verdict(value <= 2)} ({value:.2f})")
    return lines
