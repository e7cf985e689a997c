"""Section 7, the Keras 3 peer `anyinit` (empirical mode) on the first-call section's models, warm and first call.

`anyinit.initialize(model, "empirical", x)` measures real batches, as LSUV does. Its warm time is measured here, in
each backend's shared process beside the model's forward pass and our `lsuv_init`; its first call in fresh
processes of its own, beside section 0's (`first_call.modes`). It is compared with ours only where it measures every
layer: its report says, per layer, whether it was measured, and which weights it left unscaled. An optional
dependency, like the PyTorch peer: without it (`pip install anyinit==0.4.0`) the section is skipped.
"""

from __future__ import annotations

import statistics

import harness
from page import table, verdict

from sections import first_call

INSTALL = "pip install anyinit==0.4.0"


def rows(config, repeats):
    """Per first-call model: the warm forward pass, anyinit and our `lsuv_init`, and what anyinit measured."""
    if not harness.anyinit_installed():
        yield {"missing": INSTALL}
        return
    for case in config["first_call"]:
        yield _row(case, *first_call.build(config, case), repeats)


def _row(case, model, x, repeats):
    row = {"case": case}
    row["forward"] = harness.first_and_median(lambda: harness.forward(model, x), repeats)[1]
    _, row["anyinit"], report = harness.first_and_median(lambda: harness.anyinit(model, x), repeats)
    row["layers"] = len(report.layers)
    row["measured"] = sum(layer.measured is not None for layer in report.layers)
    row["unscaled"] = len(report.unscaled)
    row["lsuv"] = harness.first_and_median(lambda: harness.lsuv(model, x, "single_pass"), repeats)[1]
    return row


def _first_calls(results, backend, case):
    """The median ratios of anyinit's and our first calls over the model's first forward call (fresh processes)."""
    times = first_call.times(results).get((backend, case), {})
    if not times.get("anyinit"):
        return None
    return {mode: statistics.median(first_call.ratios(times, mode)) for mode in ("anyinit", "lsuv")}


def _measures_every_layer(row):
    return row["measured"] == row["layers"] and not row["unscaled"]


def render(results, config):
    measured = [r for r in results["anyinit"] if "missing" not in r]
    if not measured:
        missing = next((r["missing"] for r in results["anyinit"]), INSTALL)
        return {"anyinit": f"Skipped: the `anyinit` package is not installed (`{missing}`)."}
    header = ["backend", "model", "layers anyinit measures", "forward (ms)", "anyinit / fwd", "ours / fwd"]
    header += ["anyinit 1st / fwd 1st", "ours 1st / fwd 1st"]
    body = []
    for r in measured:
        measured = f"{r['measured']} of {r['layers']}" + (f" ({r['unscaled']} weights unscaled)" * bool(r["unscaled"]))
        first = _first_calls(results, r["backend"], r["case"])
        firsts = [f"{first[mode]:.2f}" for mode in ("anyinit", "lsuv")] if first else ["not run"] * 2
        warm = [f"{r[mode] / r['forward']:.2f}" for mode in ("anyinit", "lsuv")]
        body.append([r["backend"], r["case"], measured, f"{1e3 * r['forward']:.1f}", *warm, *firsts])
    return {"anyinit": table(header, body)}


def targets(results):
    """Ours faster than anyinit, warm and first call, on each model where anyinit measures every layer."""
    lines = []
    for r in results["anyinit"]:
        if "missing" in r or not _measures_every_layer(r):
            continue
        line = (
            f"- {r['backend']} on {r['case']}, where anyinit measures every layer: faster than anyinit warm: "
            f"{verdict(r['lsuv'] < r['anyinit'])} ({r['lsuv']:.3f} s vs {r['anyinit']:.3f} s)"
        )
        first = _first_calls(results, r["backend"], r["case"])
        if first:
            line += (
                f"; first call: {verdict(first['lsuv'] < first['anyinit'])} ({first['lsuv']:.2f}x vs "
                f"{first['anyinit']:.2f}x the first forward)"
            )
        lines.append(line)
    return lines
