"""`LSUVCallback`: LSUV at the start of `model.fit`."""

from __future__ import annotations

import warnings
from typing import Any

import keras

from keras_lsuv.data import DEFAULT_NUM_SAMPLES, check_is_data
from keras_lsuv.guard import skipped_reason, training_evidence
from keras_lsuv.lsuv import lsuv_init
from keras_lsuv.options import check_options
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

    The options are those of `lsuv_init`, checked here so that a bad option
    fails before training starts; so is an `x` that is no data at all
    (`None`, a `str`, a symbolic `keras.Input`).

    Args:
        x: Training inputs: arrays, a `tf.data.Dataset`, a `PyDataset`, a
            generator or a torch `DataLoader` (see `lsuv_init`). An iterable is
            read when training starts, so pass one of its own rather than the
            generator `fit` consumes.
        target_variance: The output variance to reach.
        tolerance: Accepted distance to `target_variance`.
        max_iterations: At most this many rescales per layer.
        measure: `"preactivation"` (default) or `"output"`.
        orthonormal: Redraw the kernels orthonormally first.
        engine: `"single_pass"` (default) or `"submodel"`.
        seed: Seed of the orthonormal draw: `None`, a non-negative integer
            or a `keras.random.SeedGenerator` (a new draw each run).
        force: Run even if the model looks trained.
        verbose: `"auto"`, 0, 1 or 2, as in `lsuv_init`.
        num_samples: How many samples of `x` to use (default 256).

    Attributes:
        report: The `LSUVReport` of the run, `None` before training starts.
            It is not put into `fit`'s `logs` (Keras hands `on_train_begin`
            logs to no logger); log `report.to_dict()` after `fit` instead.
    """

    def __init__(
        self,
        x: Any,
        *,
        target_variance: float = 1.0,
        tolerance: float = 0.1,
        max_iterations: int = 10,
        measure: str = "preactivation",
        orthonormal: bool = True,
        engine: str = "single_pass",
        seed: int | keras.random.SeedGenerator | None = None,
        force: bool = False,
        verbose: str | int = "auto",
        num_samples: int = DEFAULT_NUM_SAMPLES,
    ) -> None:
        super().__init__()
        self.x = x
        self.options: dict[str, Any] = {
            "target_variance": target_variance,
            "tolerance": tolerance,
            "max_iterations": max_iterations,
            "measure": measure,
            "orthonormal": orthonormal,
            "engine": engine,
            "seed": seed,
            "force": force,
            "verbose": verbose,
            "num_samples": num_samples,
        }
        check_options(**self.options)
        check_is_data(x)
        self.report: LSUVReport | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        evidence = None if self.options["force"] else training_evidence(self.model)
        if evidence:
            # Called directly, lsuv_init re-initializes a model whose weights look trained (with a warning); fit
            # resuming from a checkpoint must not.
            reason = skipped_reason(evidence)
            warnings.warn(f"LSUV skipped: {reason}", UserWarning, stacklevel=2)
            options = {k: self.options[k] for k in ("engine", "measure", "target_variance", "tolerance")}
            self.report = LSUVReport(skipped_reason=reason, **options)
            return
        # The checks above are lsuv_init's own (which warns instead of skipping): force=True spares repeating them.
        self.report = lsuv_init(self.model, self.x, **{**self.options, "force": True})
