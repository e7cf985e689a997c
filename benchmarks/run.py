"""LSUV cost per backend: time and memory relative to a forward pass, the PyTorch peer, BN overhead, initializer.

Run: .venv/bin/python benchmarks/run.py [--quick | --gpu] [--backends tensorflow,jax,torch] [--repeats 3]
[--sections multi_call,first_call]

Measures every section of `sections/` on each backend, in processes of its own (Keras fixes the backend per process;
every ratio divides two times measured in the same process), prints docs/benchmarks.md with the results between its
markers (`page.py`), and writes the page and the results beside it (docs/benchmarks.json). `--output` names another
page to write (the results go beside it); `--quick` and `--gpu` write nothing unless given `--output`. The sizes
are in `configs.py`, the models in `models.py`, the timing and the processes in `harness.py`. The sections, in the
page's order: 0. first calls in fresh processes (`first_call.py`), 1. cost vs depth (`cost.py`), 2. real models
(`real.py`), 3. the PyTorch `lsuv` package (`peer.py`, `peer_resnet.py`), 4. the initializer (`initializer.py`),
5. training overhead (`training.py`), 6. memory (`memory.py`), 7. the Keras 3 peer `anyinit` (`anyinit_peer.py`),
8. layers called several times per pass (`multi_call.py`). `--sections` runs only the named sections (the names of
`sections.SECTIONS`) and prints their tables, figures and target lines; it writes nothing (a page needs every
section).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import configs
import harness
import page
from sections import SECTIONS, SHARED, first_call, memory, multi_call

PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def worker(config, repeats, sections):
    """Runs the shared sections among `sections` in this process's backend; prints one JSON row per result, tagged
    with its section."""
    import keras

    for name, section in SHARED.items():
        if name not in sections:
            continue
        for row in section.rows(config, repeats):
            print(json.dumps({"section": name, "backend": keras.backend.backend(), **row}), flush=True)


def measure(backend, flags, config, first_calls, sections):
    """The rows of `sections` on `backend`: the shared sections in one process, each memory mode in one of its own,
    each case's first forward and first LSUV call in `first_calls` fresh processes each (alternated), and so for the
    multi-call models in the config's number of processes."""
    processes = [["--worker"]] if set(sections) & set(SHARED) else []
    if "memory" in sections:
        processes += [["--memory-probe", mode] for mode in memory.MODES]
    if "first_call" in sections:
        cases = first_call.cases(config)
        processes += [
            ["--first-call", case, mode]
            for _ in range(first_calls)
            for case in cases
            for mode in first_call.modes(config, case)
        ]
    if "multi_call" in sections:
        processes += [
            ["--multi-call-first", case, mode]
            for _ in range(config["multi_call"]["processes"])
            for case in multi_call.fresh_cases(config)
            for mode in multi_call.FIRST_MODES
        ]
    flags = [*flags, "--sections", ",".join(sections)]
    return [row for arguments in processes for row in harness.run_process(__file__, backend, *arguments, *flags)]


def render(document):
    """docs/benchmarks.md with `document`'s run, targets and sections filled in between its markers."""
    run, results, config = document["run"], document["results"], document["config"]
    values = {"run": f"`{run['command']}` in {run['minutes']:.1f} minutes on {run['machine']}", "load": run["load"]}
    lines = [line for section in SECTIONS.values() if hasattr(section, "targets") for line in section.targets(results)]
    values["targets"] = "\n".join(lines)
    for section in SECTIONS.values():
        values.update(section.render(results, config))
    return page.fill(PAGE.read_text(), values)


def render_sections(document, sections):
    """The generated parts of `sections` alone, each under its marker's name, and their target lines."""
    results, config = document["results"], document["config"]
    parts = [
        f"Run: `{document['run']['command']}` in {document['run']['minutes']:.1f} minutes",
        document["run"]["load"],
    ]
    for name in sections:
        section = SECTIONS[name]
        parts += [f"<!-- {marker} -->\n\n{value}" for marker, value in section.render(results, config).items()]
    lines = [
        line for name in sections if hasattr(SECTIONS[name], "targets") for line in SECTIONS[name].targets(results)
    ]
    return "\n\n".join([*parts, "Targets:\n\n" + "\n".join(lines)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--quick", action="store_true", help="tiny models, one repeat: checks the script runs")
    parser.add_argument("--gpu", action="store_true", help="the GPU sizes of the real models (writes nothing)")
    parser.add_argument("--parallel", action="store_true", help="run the backends' processes at the same time")
    parser.add_argument(
        "--real-models", choices=("targets", "all"), default="targets", help="all: the target batches too"
    )
    parser.add_argument("--output", help="markdown file to write (default docs/benchmarks.md, none with --quick)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated sections to run (default all); writes nothing"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", choices=memory.MODES, help=argparse.SUPPRESS)
    parser.add_argument("--first-call", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--multi-call-first", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"no section {sorted(unknown)}; the sections: {', '.join(SECTIONS)}")
    partial = set(sections) != set(SECTIONS)
    if partial and args.output:
        parser.error("--output needs every section (a page holds them all)")
    config = configs.QUICK if args.quick else configs.GPU if args.gpu else configs.FULL
    if args.real_models == "all":
        config = {**config, "real_models": config["real_models"] + configs.TARGET_BATCHES}
    repeats = 1 if args.quick else args.repeats
    if args.worker:
        worker(config, repeats, sections)
        return
    if args.memory_probe:
        memory.probe(config, args.memory_probe)
        return
    if args.first_call:
        first_call.probe(config, *args.first_call)
        return
    if args.multi_call_first:
        multi_call.probe(config, *args.multi_call_first)
        return
    start = time.perf_counter()
    flags = ["--quick"] * args.quick + ["--gpu"] * args.gpu + ["--repeats", str(repeats)]
    flags += ["--real-models", args.real_models]
    backends = args.backends.split(",")
    results = {name: [] for name in SECTIONS}
    with concurrent.futures.ThreadPoolExecutor(len(backends) if args.parallel else 1) as pool:
        first_calls = 1 if args.quick else first_call.PROCESSES
        for rows in pool.map(lambda backend: measure(backend, flags, config, first_calls, sections), backends):
            for row in rows:
                results[row.pop("section")].append(row)
    run = {
        "command": "python benchmarks/run.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "minutes": (time.perf_counter() - start) / 60,
        "machine": harness.machine(args.gpu),
        "load": harness.load_note(args.parallel),
    }
    document = {"run": run, "config": config, "results": results}
    if partial:
        print(render_sections(document, sections))
        return
    text = render(document)
    print(text)
    output = args.output or (None if args.quick or args.gpu else PAGE)
    if output:
        Path(output).write_text(text)
        Path(output).with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
