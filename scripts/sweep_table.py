"""Renders the "Models tested" table of docs/guide.md from the results of the full sweep (`make sweep`).

Run: .venv/bin/python scripts/sweep_table.py build/sweep docs/guide.md

Reads every `*.json` under the results folder (one per backend, written by tests/sweep/test_sweep.py with
`LSUV_SWEEP=full LSUV_SWEEP_RESULTS=...`) and replaces what lies between the page's `<!-- sweep table -->` and
`<!-- end of sweep table -->` markers. One row per model, or per group of backends where the backends differ.
"""

import argparse
import json
from pathlib import Path

START, END = "<!-- sweep table -->", "<!-- end of sweep table -->"
BACKENDS = ("tensorflow", "jax", "torch")
SHORT = {"tensorflow": "TF", "jax": "JAX", "torch": "torch"}


def load(folder):
    """`{(case, backend): {"source", "limits", "init": entry, "fit": entry}}` from every JSON file of `folder`."""
    cases = {}
    for path in sorted(Path(folder).glob("*.json")):
        for entry in json.loads(path.read_text(encoding="utf-8")):
            found = cases.setdefault((entry["case"], entry["backend"]), {})
            found.update(source=entry["source"], limits=entry["limits"], **{entry["test"]: entry})
    return cases


def outcome(entry, test):
    """What the table says of one test: nothing when it passed."""
    if entry is None:
        return f"{test}: not run"
    if entry["outcome"] == "passed":
        return ""
    if entry["outcome"] == "skipped":
        return f"{test} skipped: {entry['reason']}"
    if entry["outcome"] == "xfailed":
        return f"**{test} fails (known defect, xfail)**: {entry['xfail']}"
    if entry["outcome"] == "xpassed":
        return f"**{test} passes but is marked xfail**: remove the mark"
    return f"**{test} FAILED**: {entry.get('error', '')}"


def cells(found):
    """The targets, converged, kernel params reached and notes cells of one model on one backend."""
    init = found.get("init")
    reached = "–" if init is None or init.get("coverage") is None else f"{init['coverage']:.1%}"
    if init is None or "targets" not in init:
        targets = converged = "–"
    else:
        targets = str(init["targets"])
        converged = f"{init['converged']} / {init['measured']}"
        if init["unmeasured"]:
            skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(init["unmeasured"].items()))
            converged += f" ({skipped}: skipped)"
    notes = [found["limits"]] if found["limits"] else []
    if init and init.get("untargeted"):
        weights = ", ".join(f"{name} ({count})" for name, count in sorted(init["untargeted"].items()))
        notes.append(f"weights that are no target's: {weights}")
    notes += [text for text in (outcome(init, "lsuv_init"), outcome(found.get("fit"), "fit")) if text]
    return targets, converged, reached, "; ".join(notes)


def table(cases):
    """The markdown table: a row per model and group of backends with the same cells, in the sweep's order."""
    order = list(dict.fromkeys(case for case, _ in cases))
    rows = [
        "| Model | Source | Backend | Targets | Converged / measured | Kernel params reached | Notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in order:
        groups = {}
        for backend in BACKENDS:
            if (case, backend) in cases:
                groups.setdefault(cells(cases[case, backend]), []).append(backend)
        source = next(cases[case, b]["source"] for b in BACKENDS if (case, b) in cases)
        for (targets, converged, reached, notes), backends in groups.items():
            where = "all" if len(backends) == len(BACKENDS) else ", ".join(SHORT[b] for b in backends)
            notes = notes.replace("|", "/")
            rows.append(f"| {case} | {source} | {where} | {targets} | {converged} | {reached} | {notes} |")
    return "\n".join(rows)


def summary(cases):
    """One line per backend: how many tests passed, failed on a known defect, were skipped or failed."""
    lines = []
    for backend in BACKENDS:
        counts = {}
        for (_, where), found in cases.items():
            if where == backend:
                for test in ("init", "fit"):
                    if test in found:
                        counts[found[test]["outcome"]] = counts.get(found[test]["outcome"], 0) + 1
        if counts:
            models = sum(where == backend for _, where in cases)
            listed = ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
            lines.append(f"- {SHORT[backend]}: {models} models, tests: {listed}.")
    return "\n".join(lines)


def render(page, cases):
    text = page.read_text(encoding="utf-8")
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"{page}: the markers {START} and {END} are missing")
    page.write_text(f"{head}{START}\n{table(cases)}\n\n{summary(cases)}\n{END}{tail}", encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the folder of the sweep's JSON results")
    parser.add_argument("page", type=Path, help="the page holding the table's markers")
    args = parser.parse_args(argv)
    cases = load(args.results)
    if not cases:
        raise SystemExit(f"no results under {args.results}")
    render(args.page, cases)
    print(f"{args.page}: the table of {len(cases)} model runs rendered")


if __name__ == "__main__":
    main()
