"""`lsuv_init`: LSUV on a Keras model, with every touched weight restored if anything fails."""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
from keras import ops

from keras_lsuv.data import DEFAULT_NUM_SAMPLES, first_sample, prepare_batch
from keras_lsuv.engines import ENGINES
from keras_lsuv.inference import inference_mode
from keras_lsuv.orthonormal import redraw_orthonormal
from keras_lsuv.report import LSUVReport
from keras_lsuv.rescale import Criterion
from keras_lsuv.targets import find_targets

MEASURES = ("preactivation", "output")


def lsuv_init(
    model: keras.Model,
    x: Any,
    *,
    target_variance: float = 1.0,
    tolerance: float = 0.1,
    max_iterations: int = 10,
    measure: str = "preactivation",
    orthonormal: bool = True,
    engine: str = "single_pass",
    seed: int | None = None,
    force: bool = False,
    verbose: str | int = "auto",
    num_samples: int = DEFAULT_NUM_SAMPLES,
) -> LSUVReport:
    """Initializes `model` in place with LSUV (Mishkin & Matas, 2016).

    Step 1 redraws every target kernel orthonormally (layer-aware: transposed
    convs over their own fan-in, depthwise kernels per channel, both kernels of
    separable convs). Step 2 goes from the first layer to the last on the batch
    `x` and multiplies each kernel by `sqrt(target_variance / var)` until the
    variance of the layer's output is within `tolerance` of `target_variance`,
    at most `max_iterations` times. Target layers: trainable `Dense`,
    `EinsumDense`, `ConvND`, `ConvNDTranspose`, `DepthwiseConvND` and
    `SeparableConvND`, wherever they sit in the model.

    If anything fails (bad data, non-finite outputs, an interrupt), every weight
    the run touched is restored before the exception propagates.

    Example:

    >>> model = keras.Sequential([keras.Input((64,)),
    ...                           keras.layers.Dense(256, activation="relu"),
    ...                           keras.layers.Dense(10)])
    >>> report = keras_lsuv.lsuv_init(model, x_train[:256], seed=0)
    >>> print(report)

    Args:
        model: A Keras model (Sequential, Functional or subclassed; built or not).
        x: Training inputs, in any form `fit` takes: arrays or backend tensors
            (a list/tuple/dict of them for several inputs), a `tf.data.Dataset`,
            a `keras.utils.PyDataset`, a generator or iterator, or a torch
            `DataLoader`. Elements may be `x`, `(x, y)` or
            `(x, y, sample_weight)`; only `x` is used. The first `num_samples`
            samples form the LSUV batch.
        target_variance: The output variance to reach (1.0 in the paper).
        tolerance: Stop when `|var - target_variance| < tolerance` (0.1).
        max_iterations: At most this many rescales per layer (T_max, 10).
        measure: `"preactivation"` (default, as in the paper) measures the
            layer's output before its fused activation, bias included;
            `"output"` measures the full output. Normalizing an output
            activation such as softmax to unit variance is impossible and blows
            up the logits, which is why pre-activation is the default.
        orthonormal: Redraw the kernels orthonormally first (step 1).
        engine: `"single_pass"` (default): one forward pass, each layer scaled
            on the input it receives. `"submodel"`: re-runs a sub-model up to
            each layer after every rescale (Functional/Sequential models only;
            slow, kept as the reference).
        seed: Integer seed for the orthonormal redraw; `None` draws at random.
        force: Run even if the model's optimizer has already taken steps.
        verbose: `"auto"` or 1: a progress bar and the per-layer table;
            2: the table only; 0: silent.
        num_samples: How many samples of `x` to use (default 256): arrays are
            sliced, iterables are read batch by batch until there are enough.

    Returns:
        An `LSUVReport` with one record per target layer.

    Raises:
        ValueError: For bad options, or a batch that is empty, not numeric, not
            finite or does not match the model's inputs, or a layer whose
            output becomes non-finite. The model's weights are unchanged then.
    """
    criterion = check_options(target_variance, tolerance, max_iterations, measure, engine, verbose, num_samples)
    report = LSUVReport(engine=engine, measure=measure, target_variance=target_variance, tolerance=tolerance)
    steps = _optimizer_steps(model)
    if steps and not force:
        report.skipped_reason = (
            f"the model has already been trained ({steps} optimizer steps); nothing was changed. "
            "Pass force=True to re-initialize it."
        )
        warnings.warn(f"LSUV skipped: {report.skipped_reason}", UserWarning, stacklevel=2)
        return report

    batch = prepare_batch(model, x, num_samples)
    if not model.built:
        with inference_mode():
            model(first_sample(batch), training=False)
    targets = find_targets(model)
    active = [t for t in targets if not t.skip_reason]
    if not active:
        warnings.warn(f"LSUV: model '{model.name}' has no layer to initialize.", UserWarning, stacklevel=2)

    verbose = 1 if verbose == "auto" else verbose
    progress = keras.utils.Progbar(len(active), verbose=int(verbose == 1), unit_name="layer")
    saved = [(kernel, ops.copy(kernel.value)) for t in active for kernel in t.kernels]
    try:
        if orthonormal:
            redraw_orthonormal(active, seed)
        report.records = ENGINES[engine](model, batch, targets, measure, criterion, lambda _: progress.add(1))
    except BaseException:
        for kernel, value in saved:
            kernel.assign(value)
        raise

    for record in report.records:
        if not record.skipped and not record.converged:
            warnings.warn(
                f"LSUV: layer '{record.name}' ({record.class_name}) did not converge: {record.reason}.",
                UserWarning,
                stacklevel=2,
            )
    if verbose:
        print(report)
    return report


def check_options(
    target_variance: float,
    tolerance: float,
    max_iterations: int,
    measure: str,
    engine: str,
    verbose: Any,
    num_samples: int,
) -> Criterion:
    """Validates the options shared by `lsuv_init` and `LSUVCallback`; returns the stopping criterion."""
    if not (isinstance(target_variance, (int, float)) and math.isfinite(target_variance) and target_variance > 0):
        raise ValueError(f"target_variance must be a positive number; got {target_variance!r}.")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive number; got {tolerance!r}.")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"max_iterations must be a non-negative integer; got {max_iterations!r}.")
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}; got {measure!r}.")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {tuple(ENGINES)}; got {engine!r}.")
    if verbose not in ("auto", 0, 1, 2):
        raise ValueError(f"verbose must be 'auto', 0, 1 or 2; got {verbose!r}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
    return Criterion(float(target_variance), float(tolerance), max_iterations)


def _optimizer_steps(model: keras.Model) -> int:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return 0
    return int(ops.convert_to_numpy(optimizer.iterations))
