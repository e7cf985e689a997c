"""Section 6, memory: the peak resident memory of `lsuv_init` relative to a forward pass, each in a fresh process.

Not measured in the process the other sections share: `run.py --memory-probe MODE` runs `probe` for each of
`MODES` in a process of its own per backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import harness
import models
from page import table, verdict

MODES = ("forward", "lsuv")


def probe(config, mode):
    """Prints the peak resident memory above the built model during the first `mode` call, as a JSON row.

    The peak (VmHWM) is reset through `/proc/self/clear_refs` just before the call, so that the imports and the
    model's construction do not count, and the resident memory at that point is subtracted from it.
    """
    import keras

    def rss(field):
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field))) * 1024

    model = models.conv_stack(config["memory_depth"], config["image"])
    x = models.inputs(config["batch"], config["image"])
    call = (lambda: harness.forward(model, x)) if mode == "forward" else (lambda: harness.lsuv(model, x, "single_pass"))
    Path("/proc/self/clear_refs").write_text("5")
    before = rss("VmRSS:")
    call()
    row = {
        "section": "memory",
        "mode": mode,
        "backend": keras.backend.backend(),
        "before": before,
        "peak": rss("VmHWM:"),
    }
    print(json.dumps(row), flush=True)


def by_backend(results):
    """`{backend: (its rows by mode, the forward pass's peak increase, LSUV's)}`, increases in bytes."""
    modes = {}
    for r in results["memory"]:
        modes.setdefault(r["backend"], {})[r["mode"]] = r
    return {backend: (rows, *(rows[m]["peak"] - rows[m]["before"] for m in MODES)) for backend, rows in modes.items()}


def render(results, config):
    """The table, and the stack's depth, batch and activation size the prose quotes."""
    body = []
    for backend, (modes, fwd, init) in by_backend(results).items():
        totals = [f"{modes[m][k] / 2**20:.0f}" for m in MODES for k in ("before", "peak")]
        body.append([backend, f"{fwd / 2**20:.1f}", f"{init / 2**20:.1f}", f"{init / max(fwd, 1):.2f}", *totals])
    header = ["backend", "forward peak increase (MiB)", "LSUV peak increase (MiB)", "LSUV / forward"]
    header += ["forward: RSS before (MiB)", "forward: peak (MiB)", "LSUV: RSS before (MiB)", "LSUV: peak (MiB)"]
    height, width = config["image"][:2]
    return {
        "memory": table(header, body),
        "memory-depth": config["memory_depth"],
        "memory-batch": config["batch"],
        "activation-mib": f"{config['batch'] * height * width * 16 * 4 / 2**20:.0f}",
    }


def targets(results):
    """LSUV's peak memory increase within 1.5x a forward pass's."""
    return [
        f"- {backend} LSUV peak memory increase ≤ 1.5x forward's: {verdict(init / max(fwd, 1) <= 1.5)} "
        f"({init / max(fwd, 1):.2f})"
        for backend, (_, fwd, init) in by_backend(results).items()
    ]
