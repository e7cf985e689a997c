"""The small examples in examples/ run under the current backend and do what their docstrings say."""

import importlib.util
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def classes_of(report):
    return [record.class_name for record in report.records if not record.skipped]


def test_callback_fit_converges_and_learns_digits():
    report, accuracy = load_example("callback_fit").main()
    assert report.converged and classes_of(report) == ["Dense"] * 11
    assert accuracy > 0.5


def test_custom_loop_converges_and_reduces_the_loss():
    report, losses = load_example("custom_loop").main()
    assert report.converged and len(report.records) == 9
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_transformer_block_rescales_every_attention_projection():
    report, history = load_example("transformer_block").main()
    assert report.converged
    assert classes_of(report).count("EinsumDense") == 4 and classes_of(report).count("Dense") == 3
    assert np.all(np.isfinite(history.history["loss"]))


def test_functional_resnet_rescales_convolutions_and_shortcuts():
    report, history = load_example("functional_resnet").main()
    assert report.converged
    assert classes_of(report).count("Conv2D") == 8 and classes_of(report).count("Dense") == 1
    assert np.all(np.isfinite(history.history["loss"]))
