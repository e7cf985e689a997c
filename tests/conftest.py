"""Shared test set-up: one Keras backend per process, chosen by KERAS_BACKEND."""

import importlib.util

# With TensorFlow and torch both installed, torch must be imported first (as in Keras's own conftest).
if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401

import keras
import pytest


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def clear_keras_session():
    # Fresh layer names and global state per test; skipping the full garbage collection saves ~1 s a test on TF.
    keras.backend.clear_session(free_memory=False)


@pytest.fixture
def policy(request):
    """The global dtype policy `request.param` for one test (parametrize it with indirect=True)."""
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")
