"""`LSUVCallback`: LSUV at the start of `model.fit`."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import keras

from keras_lsuv.data import check_is_data
from keras_lsuv.guard import skipped_reason, training_evidence
from keras_lsuv.lsuv import report_for, run_lsuv
from keras_lsuv.options import LSUVOptions
from keras_lsuv.report import LSUVReport


class LSUVCallback(keras.callbacks.Callback):
    """Runs `lsuv_init` on the model in `on_train_begin`, before the first training step.

    The weights LSUV sets are the ones the first step trains from on every
    backend. A model that already holds trained weights is left alone, with a
    warning that says why, unless `force=True`: calling `fit` again, or
    resuming from `model.load_weights(...)` or `keras.models.load_model(...)`,
    never re-initializes it. Trained means the optimizer has taken steps, or a
    trainable layer's bias or normalization weight no longer holds the
    constant it was initialized to (see the guide for what this cannot see).

    Example:

    >>> model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    >>> lsuv = keras_lsuv.LSUVCallback(x_train[:256], seed=0)
    >>> model.fit(x_train, y_train, epochs=5, callbacks=[lsuv])
    >>> print(lsuv.report)

    The options are those of `lsuv_init` (`LSUVOptions`), checked here so
    that a bad option fails before training starts; so is an `x` that is no
    data at all (`None`, a `str`, a symbolic `keras.Input`).

    Args:
        x: Training inputs: arrays, a `tf.data.Dataset`, a `PyDataset`, a
            generator or a torch `DataLoader` (see `lsuv_init`). An iterable is
            read when training starts, so pass one of its own rather than the
            generator `fit` consumes.
        **options: The fields of `LSUVOptions`, by keyword (as `lsuv_init`
            takes them). With `force=True` a model that looks trained is
            initialized all the same.

    Attributes:
        options: The `LSUVOptions` of the run.
        report: The `LSUVReport` of the run, `None` before training starts.
            It is not put into `fit`'s `logs` (Keras hands `on_train_begin`
            logs to no logger); log `report.to_dict()` after `fit` instead.
    """

    def __init__(self, x: Any, **options: Any) -> None:
        super().__init__()
        self.x = x
        self.options = LSUVOptions(**options)
        check_is_data(x)
        self.report: LSUVReport | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        evidence = None if self.options.force else training_evidence(self.model)
        if evidence:
            # Called directly, lsuv_init re-initializes a model whose weights look trained (with a warning); fit
            # resuming from a checkpoint must not.
            reason = skipped_reason(evidence)
            warnings.warn(f"LSUV skipped: {reason}", UserWarning, stacklevel=2)
            self.report = report_for(self.options, skipped_reason=reason)
            return
        # The checks above are lsuv_init's own (which warns instead of skipping): force=True spares repeating them.
        self.report = run_lsuv(self.model, self.x, dataclasses.replace(self.options, force=True))
