"""The Python blocks of README.md, docs/index.md and docs/guide.md run as written, on the current backend.

Convention: the ```` ```python ```` blocks of a page run in page order in one namespace, as one script would.
A block that cannot run on its own (it needs a package, a server or data the tests do not have) is preceded,
on the line right above its fence, by the HTML comment `<!-- not run: why -->`: invisible on GitHub and in the
built docs, and skipped here. Blocks in other languages (```` ```bash ````, plain ```` ``` ````) are not run.
"""

import contextlib
import io
import re
import warnings
from pathlib import Path

import keras
import pytest
import zoo

ROOT = Path(__file__).resolve().parent.parent
NOT_RUN = re.compile(r"<!-- not run: \S.* -->")


def python_blocks(path):
    """`(line, source)` of each ```python block of `path` meant to run (`line`: its first, from 1); checks markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, start = [], None
    for number, line in enumerate(lines):
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            marker = lines[start - 1].strip() if start else ""
            if marker.startswith("<!-- not run"):
                assert NOT_RUN.fullmatch(marker), f"{path.name}:{start}: a not-run marker needs a reason: {marker}"
            else:
                blocks.append((start + 2, "\n".join(lines[start + 1 : number])))
            start = None
    assert start is None, f"{path.name}: unclosed ```python block at line {start + 1}"
    return blocks


def run_page(path, tmp_path, monkeypatch):
    """Runs the page's blocks in one namespace from `tmp_path`; returns the namespace and what they printed."""
    pytest.importorskip("sklearn")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(ROOT / path)
    assert blocks, f"{path} has no runnable block"
    namespace, printed = {"__name__": "__docs__"}, io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.filterwarnings("error", message="LSUV", category=UserWarning)  # e.g. a layer not converging
        for line, source in blocks:
            # Leading newlines: a traceback names the page's own line numbers.
            exec(compile("\n" * (line - 1) + source, str(path), "exec"), namespace)
    return namespace, printed.getvalue()


def assert_unit_preactivations(model, x):
    measured = zoo.preactivation_variances(model, x)
    assert len(measured) == 11
    for layer, variance in measured.items():
        assert abs(variance - 1.0) < 0.1, f"{layer.name}: pre-activation variance {variance}"


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_quick_start_runs_and_learns(page, tmp_path, monkeypatch):
    namespace, printed = run_page(page, tmp_path, monkeypatch)
    lsuv, report = namespace["lsuv"], namespace["report"]
    assert lsuv.report.converged and report.converged and len(report.records) == 11
    assert str(lsuv.report) in printed and "test accuracy:" in printed
    model, x_test, y_test = namespace["model"], namespace["x_test"], namespace["y_test"]
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy > 0.5  # 10 classes: chance is 0.1
    assert isinstance(namespace["layer"].kernel_initializer, namespace["keras_lsuv"].Orthonormal)


def test_guide_runs(tmp_path, monkeypatch):
    namespace, printed = run_page("docs/guide.md", tmp_path, monkeypatch)
    lsuv, report, model = namespace["lsuv"], namespace["report"], namespace["model"]
    assert lsuv.report.converged and str(lsuv.report) in printed
    # `model` is the one the "As a function" block initialized; the plot block saved its figure.
    assert report.converged
    assert_unit_preactivations(model, namespace["x_train"][:256])
    assert (tmp_path / "lsuv.png").stat().st_size > 0


def test_not_run_markers_need_a_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- not run: needs a server -->\n```python\nraise SystemExit\n```\n```python\nx = 1\n```\n")
    assert python_blocks(page) == [(6, "x = 1")]
    page.write_text("<!-- not run -->\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="needs a reason"):
        python_blocks(page)


def teardown_module():
    keras.backend.clear_session()
