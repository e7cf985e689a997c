"""Section 8, layers called several times per forward pass: full `lsuv_init`, plain and with `center=True`, and its
first call, against the model's forward pass.

The models (`models.py`, sizes in the config's `multi_call`): keras.io's Perceiver, whose cross-attention and
transformer modules are built once and called once per iteration; keras-hub's `AlbertBackbone`, one transformer
layer called along the chain; a siamese tower on two inputs; a `TimeDistributed` CNN, each convolution called once
per frame; a residual MLP sub-model called twice in a row. In the backend's shared process: a warm forward pass
(`harness.forward`, median of `--repeats` after a first call) and full `lsuv_init` (`harness.lsuv`, orthonormal
redraw included), plain and with `center=True`, each call from the same starting weights, timed the same way, each
beside a forward pass of its own (the ratio divides the medians of those pairs: the load drifts); the forward
passes one LSUV call made (`harness.counted_passes`); the targets, and how many of them one forward pass calls
several times. Each mode of a model has `limit` seconds for its calls: a call that runs out is stopped
(`lsuv_init` restores the weights) and the row says "did not finish". `run.py --multi-call-first CASE MODE` runs
`probe` in a fresh process: the first forward pass or the first plain `lsuv_init` of the process, as in section 0.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import statistics
import time

import harness
import models
from page import table, verdict

# The modes timed warm: `harness.lsuv`'s `center`.
MODES = {"plain": False, "center": True}
FIRST_MODES = ("forward", "lsuv")
# The targets: full LSUV within 5x a warm forward pass (plain and centered); its first call within 5x the
# model's first forward call.
TARGET = 5.0


class DidNotFinish(Exception):
    """A timed call ran out of its case's seconds."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raises `DidNotFinish` in the block once `seconds` have passed (a SIGALRM timer, the main thread only)."""

    def stop(signum, frame):
        raise DidNotFinish

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def build(config, case):
    """The model of `case` (from the current random seed) and its batch."""
    factory, arguments, batch_factory, batch_arguments = config["multi_call"]["cases"][case]
    return getattr(models, factory)(*arguments), getattr(models, batch_factory)(*batch_arguments)


def fresh_cases(config):
    """The cases whose first calls are timed in fresh processes: the config's `fresh`, or every case."""
    return config["multi_call"]["fresh"] or list(config["multi_call"]["cases"])


def batch_size(x):
    import keras

    return keras.tree.flatten(x)[0].shape[0]


def calls_per_pass(model, x, layers):
    """How many times one forward pass calls each of `layers` (their `call`, which `TimeDistributed` calls directly)."""
    counts = dict.fromkeys(map(id, layers), 0)

    def counting(layer, call):
        def counted(*args, **kwargs):
            counts[id(layer)] += 1
            return call(*args, **kwargs)

        return counted

    for layer in layers:
        layer.call = counting(layer, layer.call)
    try:
        harness.forward(model, x)
    finally:
        for layer in layers:
            del layer.call
    return list(counts.values())


def timed_lsuv(model, x, center, repeats, limit):
    """LSUV's first call, then `repeats` more, each from the weights the model had before the first and right after a
    forward pass timed beside it (the load of a shared machine drifts), within `limit` seconds in all.

    Returns:
        The first call's seconds (`None` if it did not finish), the median of the later calls that finished (`None`
        if none did), the median of the forward passes beside those, how many finished, the forward passes of the
        first call, and its report.
    """
    start_weights = model.get_weights()
    deadline = time.perf_counter() + limit
    times, forwards, passes, report = [], [], None, None
    for i in range(1 + repeats):
        model.set_weights(start_weights)
        start = time.perf_counter()
        harness.forward(model, x)
        forward = time.perf_counter() - start
        start = time.perf_counter()
        try:
            with harness.counted_passes(model, batch_size(x)) as counted, time_limit(deadline - start):
                result = harness.lsuv(model, x, "single_pass", center=center)
        except DidNotFinish:
            break
        times.append(time.perf_counter() - start)
        forwards.append(forward)
        if i == 0:
            passes, report = len(counted), result
    model.set_weights(start_weights)
    warm = times[1:]
    if not warm:
        return (times[0] if times else None), None, None, 0, passes, report
    return times[0], statistics.median(warm), statistics.median(forwards[1:]), len(warm), passes, report


def rows(config, repeats):
    """Per model: the warm forward pass, then warm full LSUV plain and centered, and the targets' calls per pass."""
    import keras

    limit = config["multi_call"]["limit"]
    for case in config["multi_call"]["cases"]:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model, x = build(config, case)
        row = {"model": case, "batch": batch_size(x), "limit": limit}
        row["forward_first"], row["forward"], _ = harness.first_and_median(
            functools.partial(harness.forward, model, x), repeats
        )
        for mode, center in MODES.items():
            first, warm, forward, count, passes, report = timed_lsuv(model, x, center, repeats, limit)
            row.update({f"{mode}_first": first, mode: warm, f"{mode}_forward": forward})
            row.update({f"{mode}_repeats": count, f"{mode}_passes": passes})
            if report is not None:
                row[f"{mode}_converged"] = report.converged
            if report is not None and "targets" not in row:
                layers = [r.layer for r in report.records if r.layer is not None and not r.skipped]
                calls = calls_per_pass(model, x, layers)
                row.update(targets=len(calls), multi_call_targets=sum(c > 1 for c in calls), max_calls=max(calls))
            if count < repeats:  # a call was stopped, maybe in the engine's clean-up: the next mode gets a new model
                keras.utils.set_random_seed(0)
                model, x = build(config, case)
        yield row


def probe(config, case, mode):
    """Prints the seconds of the first `mode` call (forward or plain LSUV) on the case's fresh model, as a JSON row;
    `None` if it did not finish within the config's `limit`."""
    import keras

    keras.utils.set_random_seed(0)
    model, x = build(config, case)
    call = {"forward": harness.forward, "lsuv": lambda m, b: harness.lsuv(m, b, "single_pass")}[mode]
    start, seconds = time.perf_counter(), None
    with contextlib.suppress(DidNotFinish), time_limit(config["multi_call"]["limit"]):
        call(model, x)
        seconds = time.perf_counter() - start
    row = {"section": "multi_call", "backend": keras.backend.backend(), "case": case, "first": mode}
    print(json.dumps({**row, "seconds": seconds}), flush=True)


def warm_rows(results):
    return [r for r in results["multi_call"] if "first" not in r]


def first_calls(results):
    """`{(backend, case): (forward seconds, LSUV seconds, ratios)}`, the processes paired in run order (a process
    that did not finish has `None`, and so has its ratio)."""
    found = {}
    for r in results["multi_call"]:
        if "first" in r:
            found.setdefault((r["backend"], r["case"]), {}).setdefault(r["first"], []).append(r["seconds"])
    return {
        key: (
            t["forward"],
            t["lsuv"],
            [None if s is None else s / f for f, s in zip(t["forward"], t["lsuv"], strict=True)],
        )
        for key, t in found.items()
    }


def first_ratio(results, backend, case):
    """The median of LSUV's first call over the forward's in fresh processes, or `None` (not run, or unfinished)."""
    _, _, ratios = first_calls(results).get((backend, case), (None, None, [None]))
    return None if None in ratios else statistics.median(ratios)


def warm_ratio(row, mode):
    """`mode`'s warm LSUV over the forward passes timed beside it, or `None` if no warm call finished."""
    return None if row.get(mode) is None else row[mode] / row[f"{mode}_forward"]


def ratio_text(row, mode):
    if row.get(mode) is not None:
        return f"{warm_ratio(row, mode):.2f}"
    if row.get(f"{mode}_first") is not None:
        return f"1st call only: {row[f'{mode}_first'] / row['forward']:.1f}"
    return f"did not finish in {row['limit']:g} s"


def render(results, config):
    """The warm table and the first-call table, and the limit the prose quotes."""
    header = ["backend", "model", "targets", "called several times", "forward (ms)", "plain / fwd", "passes"]
    header += ["center=True / fwd", "passes (center)", "LSUV 1st / fwd 1st (fresh)"]
    body = []
    for r in warm_rows(results):
        first = first_ratio(results, r["backend"], r["model"])
        body.append(
            [r["backend"], r["model"], r.get("targets", "?"), r.get("multi_call_targets", "?")]
            + [f"{1e3 * r['forward']:.0f}", f"**{ratio_text(r, 'plain')}**", r["plain_passes"] or "–"]
            + [f"**{ratio_text(r, 'center')}**", r["center_passes"] or "–"]
            + [f"**{first:.2f}**" if first is not None else "not run / did not finish"]
        )
    first_header = ["backend", "model", "processes", "forward 1st (s)", "LSUV 1st (s)", "LSUV 1st / forward 1st"]
    first_body = []
    for (backend, case), (forward, lsuv, ratios) in first_calls(results).items():
        done = [x for x in lsuv if x is not None]
        first_body.append(
            [backend, case, len(ratios), f"{statistics.median(forward):.2f}"]
            + [f"{statistics.median(done):.2f}" if done else "did not finish", _spread(ratios)]
        )
    return {
        "multi-call": table(header, body),
        "multi-call-first": table(first_header, first_body),
        "multi-call-limit": f"{config['multi_call']['limit']:g}",
    }


def _spread(ratios):
    done = [r for r in ratios if r is not None]
    if len(done) < len(ratios):
        return f"{len(ratios) - len(done)} of {len(ratios)} did not finish"
    return f"{statistics.median(done):.2f} ({min(done):.2f}–{max(done):.2f})"


def targets(results):
    """Full LSUV within `TARGET` warm forward passes, plain and centered; its first call within `TARGET` first
    forward calls; per backend and model."""
    lines = []
    for r in warm_rows(results):
        values = {mode: warm_ratio(r, mode) for mode in MODES}
        first = first_ratio(results, r["backend"], r["model"])
        texts = [
            f"{verdict(v is not None and v <= TARGET)} ({'did not finish' if v is None else f'{v:.2f}'})"
            for v in (*values.values(), first)
        ]
        lines.append(
            f"- {r['backend']} on {r['model']}: full LSUV ≤ {TARGET:g}x one warm forward: plain {texts[0]}, "
            f"center=True {texts[1]}; first call ≤ {TARGET:g}x the first forward: {texts[2]}"
        )
    return lines
