"""`lsuv_init`: LSUV on a Keras model, with every touched weight restored if anything fails."""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np
from keras import ops, tree

from keras_lsuv.coverage import find_uncovered, uncovered_warning
from keras_lsuv.data import first_sample, prepare_batch
from keras_lsuv.engines import ENGINES
from keras_lsuv.guard import note_lsuv_bias, optimizer_steps_evidence, skipped_reason, trained_weights_evidence
from keras_lsuv.inference import inference_mode
from keras_lsuv.options import LSUVOptions, integer_seed
from keras_lsuv.orthonormal import redraw_orthonormal
from keras_lsuv.processes import agree_on, run_across_processes, shared_seed
from keras_lsuv.report import LayerRecord, LSUVReport, MergeRecord
from keras_lsuv.residual import Merge, find_merges
from keras_lsuv.stability import kernel_curvature, sgd_note
from keras_lsuv.targets import Target, find_targets

# Warnings point at the caller of `lsuv_init`, past `run_lsuv` and its `run_across_processes` wrapper.
_CALLER = 4


def lsuv_init(model: keras.Model, x: Any, **options: Any) -> LSUVReport:
    """Initializes `model` in place with LSUV (Mishkin & Matas, 2016).

    Step 1 redraws every target kernel orthonormally (layer-aware: transposed
    convs over their own fan-in, depthwise kernels per channel, both kernels of
    separable convs). Step 2 goes from the first layer to the last on the batch
    `x` and multiplies each kernel by `sqrt(target_variance / var)` until the
    variance of the layer's output is within `tolerance` of `target_variance`,
    at most `max_iterations` times; with `center=True` each bias is also set
    so that its pre-activation has zero mean per channel. Target layers
    (`targets=None`, see `default_targets`): trainable `Dense`,
    `EinsumDense`, `ConvND`, `ConvNDTranspose`, `DepthwiseConvND` and
    `SeparableConvND`, wherever they sit in the model, but a layer whose kernel
    its author initialized to zeros (a deliberate start, kept with its
    reason: see `default_targets`). A layer called several
    times per forward pass is measured over all its calls. A target the pass
    does not measure (never reached, never built, or only called inside JAX
    control flow or torch's `vmap`) keeps its kernel as it was, and a warning
    lists it.

    If anything fails (bad data, non-finite outputs, an interrupt), every weight
    the run touched is restored before the exception propagates.

    Under several processes (JAX `keras.distribution.initialize`, TensorFlow
    `MultiWorkerMirroredStrategy`), every process calls it with its own shard
    of the data and every process gets the LSUV of all shards together.

    Example:

    >>> model = keras.Sequential([keras.Input((64,)),
    ...                           keras.layers.Dense(256, activation="relu"),
    ...                           keras.layers.Dense(10)])
    >>> report = keras_lsuv.lsuv_init(model, x_train[:256], seed=0)
    >>> print(report)

    Args:
        model: A Keras model (Sequential, Functional or subclassed; built or not).
        x: Training inputs, in any form `fit` takes: arrays or backend tensors
            (NumPy ml_dtypes floats, pandas objects, SciPy and TF sparse
            included; lists, tuples and dicts of them, nested as the model's
            inputs are), a `tf.data.Dataset`, a `keras.utils.PyDataset`, a
            generator or iterator, or a torch `DataLoader`. Elements may be
            `x`, `(x, y)` or `(x, y, sample_weight)`; only `x` is used. The
            first `num_samples` samples form the LSUV batch.
        **options: The fields of `LSUVOptions`, by keyword: `target_variance`
            (1.0), `tolerance` (0.1), `max_iterations` (10), `measure`,
            `orthonormal`, `engine`, `seed`, `force`, `verbose`,
            `num_samples`, `center`, `targets`, `residual`; each is described
            there.

    Returns:
        An `LSUVReport` with one record per target layer.

    Raises:
        ValueError: For bad options (each named), a layer chosen by `targets`
            that LSUV cannot initialize (named), bad inputs (each named: see
            `docs/data.md`), a batch that is empty, not numeric, not finite or
            does not match the model's inputs, or a layer whose output becomes
            non-finite. The model's weights are unchanged then. Under several
            processes, a bad batch in any process raises the same error in
            every process.
        TypeError: For a keyword that is not an option, or a `targets`
            callable that returns something other than a bool (naming the
            layer); the weights are unchanged then.
    """
    report: LSUVReport = run_lsuv(model, x, LSUVOptions(**options))
    return report


@run_across_processes
def run_lsuv(model: keras.Model, x: Any, options: LSUVOptions) -> LSUVReport:
    """`lsuv_init` on options already checked (`LSUVCallback` checks its own when it is built)."""
    report = report_for(options)
    steps = None if options.force else optimizer_steps_evidence(model)
    if steps:
        report.skipped_reason = skipped_reason(steps)
        warnings.warn(f"LSUV skipped: {report.skipped_reason}", UserWarning, stacklevel=_CALLER)
        return report
    evidence = None if options.force else trained_weights_evidence(model)
    if evidence:
        warnings.warn(
            f"LSUV: the model's weights look already trained ({evidence}); lsuv_init re-initializes them as "
            "asked (LSUVCallback would skip this model). Pass force=True to silence this warning.",
            UserWarning,
            stacklevel=_CALLER,
        )

    batch = agree_on(lambda: prepare_batch(model, x, options.num_samples))  # a bad shard fails in every process
    if not model.built:
        with inference_mode():
            model(first_sample(batch), training=False)
    targets = find_targets(model, options.targets)  # a selected layer LSUV cannot initialize fails here
    active = [t for t in targets if not t.skip_reason]
    if not active:
        warnings.warn(f"LSUV: model '{model.name}' has no layer to initialize.", UserWarning, stacklevel=_CALLER)

    verbose = options.verbosity
    progress = keras.utils.Progbar(len(active), verbose=int(verbose == 1), unit_name="layer")
    # The merges of residual streams (`residual="stream"`), whose record the engine writes when it solves them.
    merges: dict[Merge, MergeRecord | None] = dict.fromkeys(find_merges(model, targets) if options.residual else [])
    for target in active:
        target.save_weights(bias=options.center or options.residual is not None)
    # The forward pass runs stateful layers (a stateful RNN updates its state): put their state back afterwards.
    states = [(state, ops.copy(state.value)) for state in _layer_states(model)]
    try:
        if options.orthonormal:
            # An embedding matrix is a table of vectors, not a map to orthogonalize: step 1 leaves it alone.
            redraw_orthonormal([t for t in active if not t.is_embedding], shared_seed(integer_seed(options.seed)))
        records = ENGINES[options.engine](model, batch, targets, options, lambda _: progress.add(1), merges)
        unmeasured = _restore_unmeasured(active, records) + [records[t] for t in targets if not t.layer.built]
        report.records = list(records.values())
        report.merges = [merges[m] or m.skipped_record() for m in merges]
        report.uncovered, report.coverage = find_uncovered(model, records)
        if options.center or options.residual:
            # The options whose starts can be far stiffer than the paper's: how stiff, for SGD.
            scaled = [t for t in active if not records[t].skipped and not t.is_embedding]
            report.curvature = kernel_curvature(model, batch, [kernel for t in scaled for kernel in t.kernels])
            report.notes += [note] if (note := sgd_note(report.curvature)) else []
            # The guard takes a bias LSUV set (centered, or scaled with its residual branch) for a fresh one while it
            # holds LSUV's values.
            for target in active:
                if target.has_bias and not records[target].skipped:
                    note_lsuv_bias(target.layer, ops.convert_to_numpy(target.layer.bias))
    except BaseException:
        for target in active:
            target.restore_weights()
        raise
    finally:
        for state, value in states:
            state.assign(value)

    if unmeasured:
        warnings.warn(
            "LSUV: these layers were not measured and keep their kernels as they were: "
            + "; ".join(f"'{r.name}' ({r.reason})" for r in unmeasured)
            + ".",
            UserWarning,
            stacklevel=_CALLER,
        )
    if options.residual and all(merge.skipped for merge in report.merges):
        warnings.warn(_no_merge_solved(report.merges), UserWarning, stacklevel=_CALLER)
    if warning := uncovered_warning(report.uncovered, report.coverage):
        warnings.warn(warning, UserWarning, stacklevel=_CALLER)
    for merge in report.merges:
        if not merge.skipped and not merge.converged:
            warnings.warn(
                f"LSUV: merge '{merge.name}' did not converge: {merge.reason}.", UserWarning, stacklevel=_CALLER
            )
    for record in report.records:
        if not record.skipped and not record.converged:
            warnings.warn(
                f"LSUV: layer '{record.name}' ({record.class_name}) did not converge: {record.reason}.",
                UserWarning,
                stacklevel=_CALLER,
            )
    for target in active:
        if violated := _violated_constraint(target):
            warnings.warn(
                f"LSUV: layer '{target.layer.name}' ({type(target.layer).__name__}): the rescaled kernel does not "
                f"satisfy its {violated}. LSUV does not apply it (that would undo the variance it set); Keras "
                "applies it after the first optimizer step.",
                UserWarning,
                stacklevel=_CALLER,
            )
    for note in report.notes:
        warnings.warn(f"LSUV: {note}", UserWarning, stacklevel=_CALLER)
    if verbose:
        print(report)
    return report


def report_for(options: LSUVOptions, skipped_reason: str | None = None) -> LSUVReport:
    """A report of a run with `options`, without records yet (and with none if the run was skipped)."""
    return LSUVReport(
        engine=options.engine,
        measure=options.measure.value,
        target_variance=options.target_variance,
        tolerance=options.tolerance,
        center=options.center,
        skipped_reason=skipped_reason,
        residual=options.residual,
    )


def _no_merge_solved(merges: list[MergeRecord]) -> str:
    """The warning of a `residual="stream"` run that solved no merge: how many merges it saw, and what it cannot
    see."""
    unseen = (
        "additions inside a subclassed model's `call`, or inside a layer's `call` that could not be traced (called "
        "several times per pass, or not on Keras tensors), are not seen"
    )
    where = "the model's Functional graphs and its layers' traced calls"
    if not merges:
        return f"LSUV: residual='stream' found no addition in {where} ({unseen})."
    count = f"{len(merges)} merge{'s' if len(merges) > 1 else ''}"
    return (
        f"LSUV: residual='stream' solved no merge: it saw {count} in {where} and could solve none (report.merges "
        f"says why, e.g. '{merges[0].name}': {merges[0].reason}); {unseen}."
    )


def _restore_unmeasured(active: list[Target], records: dict[Target, LayerRecord]) -> list[LayerRecord]:
    """Puts back the kernels of the active targets the engine did not measure (step 1 redrew them)."""
    unmeasured = [t for t in active if records[t].skipped]
    for target in unmeasured:
        target.restore_weights()
    return [records[t] for t in unmeasured]


def _layer_states(model: keras.Model) -> list[keras.Variable]:
    """The state variables of stateful layers (a stateful RNN's `states`), which Keras does not track as weights."""
    states = []
    for layer in model._flatten_layers(include_self=False):  # Keras's own walk over every sub-layer
        if getattr(layer, "stateful", False) and getattr(layer, "states", None) is not None:
            # Duck-typed: before Keras 3.7 the backend's variables are not instances of `keras.Variable`.
            states += [s for s in tree.flatten(layer.states) if hasattr(s, "assign") and hasattr(s, "value")]
    return states


def _violated_constraint(target: Target) -> str | None:
    """Names the kernel constraint the layer's kernel no longer satisfies after LSUV, if any."""
    layer = target.layer
    for attribute in ("kernel_constraint", "depthwise_constraint", "pointwise_constraint"):
        constraint = getattr(layer, attribute, None)
        if constraint is None:
            continue
        for kernel in target.kernels:
            if kernel.constraint is constraint:
                value = ops.convert_to_numpy(kernel)
                if not np.allclose(ops.convert_to_numpy(constraint(ops.convert_to_tensor(value))), value, rtol=1e-5):
                    return f"{attribute} ({type(constraint).__name__})"
    return None
