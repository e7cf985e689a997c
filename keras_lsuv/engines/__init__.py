"""LSUV engines: how the forward pass reaches each layer's output.

Each engine rescales the kernels of `targets` in place and gives each target's record, keyed by the target itself
(never by the layer's name, which Keras does not keep unique): see `Engine`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import keras

from keras_lsuv.engines.single_pass import run_single_pass
from keras_lsuv.engines.submodel import run_submodel
from keras_lsuv.options import ENGINE_NAMES, LSUVOptions
from keras_lsuv.report import LayerRecord, MergeRecord
from keras_lsuv.residual import Merge
from keras_lsuv.targets import Target


class Engine(Protocol):
    """What `lsuv_init` asks of an engine (the contract `tests/engines/test_contract.py` checks for each one).

    Args:
        model: The model, built.
        batch: The LSUV batch, structured as the model's inputs.
        targets: Every target of the model (`find_targets`); those with a `skip_reason` are left alone.
        options: The run's options (what is measured, when a layer is done).
        on_record: Called once with each measured layer's record, as soon as it is final.
        merges: With `residual="stream"`, the merges of residual streams: the engine writes the record of each
            one it reached (an engine that does not solve merges rejects the option in `LSUVOptions`).

    Returns:
        One record per target, keyed by the target: the targets in the order the pass reached them (measured or
        left alone), then those it never reached (`Target.skipped_record`). `lsuv_init` puts back the kernels of
        the targets not measured.
    """

    def __call__(
        self,
        model: keras.Model,
        batch: Any,
        targets: list[Target],
        options: LSUVOptions,
        on_record: Callable[[LayerRecord], None],
        merges: dict[Merge, MergeRecord | None] | None = None,
    ) -> dict[Target, LayerRecord]: ...


ENGINES: dict[str, Engine] = dict(zip(ENGINE_NAMES, (run_single_pass, run_submodel), strict=True))
