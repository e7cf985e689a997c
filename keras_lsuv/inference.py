"""A context for eager forward passes that only read outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras


@contextlib.contextmanager
def inference_mode() -> Iterator[None]:
    """Disables gradient recording where the backend records it eagerly.

    Only torch records an autograd graph during an eager forward pass; Keras
    offers no portable switch for that, so this is torch-specific by necessity.
    TensorFlow and JAX record nothing outside a tape or a `grad` transform.
    """
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            yield
    else:
        yield
