"""Section 1, cost vs depth: `lsuv_init` with each engine as a ratio to a warm eager forward pass.

A warm eager forward pass `model(x, training=False)` (under `torch.no_grad()` on torch), then `lsuv_init` with each
engine, as a ratio to that forward pass; median of `--repeats` calls after a first call, which is reported on its
own (tracing, JAX per-op compiles). The sub-model engine is O(depth²) and only runs on models with at most
`SUBMODEL_MAX_TARGETS` target layers.
"""

from __future__ import annotations

import functools

import harness
import models
from page import ratio, table, verdict

SUBMODEL_MAX_TARGETS = 32


def rows(config, repeats):
    """Forward, single_pass and submodel times for the conv stacks and the applications."""
    import keras

    measured = [
        (f"Conv2D x{d}", models.conv_stack(d, config["image"]), config["batch"], config["image"])
        for d in config["depths"]
    ]
    for name, batch in config["applications"].items():
        application = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3))
        measured.append((f"{name} 32x32x3", application, batch, (32, 32, 3)))
    timed = functools.partial(harness.first_and_median, repeats=repeats)
    for name, model, batch, image in measured:
        x = models.inputs(batch, image)
        row = {"model": name, "batch": batch}
        row["forward_first"], row["forward"], _ = timed(functools.partial(harness.forward, model, x))
        row["single_pass_first"], row["single_pass"], result = timed(
            functools.partial(harness.lsuv, model, x, "single_pass")
        )
        row["targets"] = len(result.records)
        _, row["rescale_only"], _ = timed(functools.partial(harness.lsuv, model, x, "single_pass", False))
        if row["targets"] <= SUBMODEL_MAX_TARGETS:
            row["submodel_first"], row["submodel"], _ = timed(functools.partial(harness.lsuv, model, x, "submodel"))
        yield row


def render(results, config):
    """The table, and the batch and sub-model limit the prose quotes."""
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
        for r in results["cost"]
    ]
    return {"cost": table(header, body), "cost-batch": config["batch"], "submodel-max-targets": SUBMODEL_MAX_TARGETS}


def targets(results):
    """single_pass within 2x a forward pass at every depth, and flat in depth; the submodel's ratios."""
    lines = []
    for backend in dict.fromkeys(r["backend"] for r in results["cost"]):
        stacks = [r for r in results["cost"] if r["backend"] == backend and r["model"].startswith("Conv2D")]
        single = [r["single_pass"] / r["forward"] for r in stacks]
        flat = single[-1] / single[0]
        sub = [f"{r['submodel'] / r['forward']:.1f}" for r in stacks if "submodel" in r]
        lines.append(
            f"- {backend}: single_pass ≤ 2.0x forward at every depth: {verdict(max(single) <= 2.0)} "
            f"(max {max(single):.2f}); deepest / shallowest ratio ≤ 1.2: {verdict(flat <= 1.2)} ({flat:.2f}); "
            f"submodel ratio by depth: {', '.join(sub)}."
        )
    return lines
