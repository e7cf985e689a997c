"""Section 0, first calls: `lsuv_init`'s first call in a fresh process against the model's own first forward call.

A user runs LSUV once per training run, in a fresh process, so its first call (tracing, compilation, the backend's
first use of each op and shape) is the one they pay. `run.py --first-call CASE MODE` runs `probe` in a process of its
own: it builds the case's model (seed 0) and times one call, the forward pass (`harness.forward`) or `lsuv_init`
(`harness.lsuv`), or on the small models the peer `anyinit` (section 7), the first of the process after the imports
and the model's construction. Each case and mode runs in `PROCESSES` fresh processes per backend (`--quick`: one);
the table gives the medians, and the spread of the ratio over the pairs of processes (the i-th LSUV process against
the i-th forward one).
"""

from __future__ import annotations

import json
import statistics
import time

import harness
import models
from page import table, verdict

MODES = ("forward", "lsuv")
PROCESSES = 3
# The target: LSUV's first call within 3x the model's own first forward call.
TARGET = 3.0


def cases(config):
    """The names of the cases of `config`: its small models, then its real models (unless `first_call_real` is
    false: `--gpu`, where fresh processes of the GPU sizes would not fit a device session)."""
    real = config["real_models"] if config.get("first_call_real", True) else []
    return list(config["first_call"]) + [models.real_label(*entry) for entry in real]


def modes(config, case):
    """The calls timed in fresh processes for `case`: the forward pass and `lsuv_init`, and on the small models
    anyinit's too where it is installed (section 7, `anyinit_peer.py`)."""
    peer = case in config["first_call"] and harness.anyinit_installed()
    return MODES + (("anyinit",) if peer else ())


def probe(config, case, mode):
    """Prints the seconds of the first `mode` call on the case's fresh model, as a JSON row."""
    import keras

    keras.utils.set_random_seed(0)
    model, x = build(config, case)
    call = {"forward": harness.forward, "lsuv": _lsuv, "anyinit": harness.anyinit}[mode]
    start = time.perf_counter()
    call(model, x)
    seconds = time.perf_counter() - start
    row = {"section": "first_call", "backend": keras.backend.backend(), "case": case, "mode": mode, "seconds": seconds}
    print(json.dumps(row), flush=True)


def _lsuv(model, x):
    return harness.lsuv(model, x, "single_pass")


def build(config, case):
    """The model of `case` and its batch, built from the current random seed."""
    if case in config["first_call"]:
        kind, arguments, batch, shape = config["first_call"][case]
        return getattr(models, kind)(*arguments), models.inputs(batch, shape)
    for real in config["real_models"]:
        if models.real_label(*real) == case:
            return models.real_model(*real)
    raise ValueError(f"no first-call case {case!r}")


def times(results):
    """`{(backend, case): {mode: [seconds of each process, in run order]}}`."""
    found = {}
    for r in results["first_call"]:
        found.setdefault((r["backend"], r["case"]), {}).setdefault(r["mode"], []).append(r["seconds"])
    return found


def ratios(case_times, mode):
    """`mode`'s first calls over the forward pass's, process by process (the i-th against the i-th)."""
    return [other / fwd for fwd, other in zip(case_times["forward"], case_times[mode], strict=True)]


def summary(results):
    """`{(backend, case): (forward seconds, LSUV seconds, ratios)}`: the processes' times, paired in run order."""
    return {
        key: (case_times["forward"], case_times["lsuv"], ratios(case_times, "lsuv"))
        for key, case_times in times(results).items()
    }


def render(results, config):
    header = ["backend", "model", "processes", "forward 1st (s)", "LSUV 1st (s)", "LSUV 1st / forward 1st", "spread"]
    body = []
    for (backend, case), (forward, lsuv, ratios) in summary(results).items():
        median = statistics.median(ratios)
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}"
        body.append(
            [backend, case, len(ratios), f"{statistics.median(forward):.2f}", f"{statistics.median(lsuv):.2f}"]
            + [f"**{median:.2f}**", spread]
        )
    processes = min((len(ratios) for _, _, ratios in summary(results).values()), default=PROCESSES)
    return {"first-call": table(header, body), "first-call-processes": str(processes)}


def targets(results):
    """LSUV's first call within `TARGET` times the model's own first forward call, per backend and model."""
    return [
        f"- {backend} first call ≤ {TARGET:g}x the first forward on {case}: {verdict(statistics.median(r) <= TARGET)} "
        f"({statistics.median(r):.2f})"
        for (backend, case), (_, _, r) in summary(results).items()
    ]
