"""What a start says about SGD: the curvature of the loss along the kernels LSUV scaled.

Heavy-ball SGD is stable only while `learning_rate * λ < 2 * (1 + momentum)`, `λ` the top eigenvalue of the loss's
Hessian. The options beyond the paper can give a start of a much higher curvature than plain LSUV's: on the study's
residual CNN without normalization (docs/results.md, parts 2 and 3), `λ` is 9 from Keras's default, 196 after plain
LSUV and 1,096 after `center=True`, whose SGD at lr 0.02 collapsed in its first steps (lr 0.02 is 5.8 times past
`3.8 / 1096`). `λ` itself takes gradients (no portable Keras API) and tens of passes. What two forward passes give is
a lower bound: the Gauss-Newton curvature of a cross-entropy on the model's outputs along the direction that moves
every kernel LSUV scaled along itself, each kernel's part of unit norm (`kernel_curvature`). On the study's networks
(docs/results.md, third part: JAX, seed 0) it measures 0.29 at most where λ lets SGD run at lr 0.02, under 0.01 on
the pre-LN transformer from every start, and 1.6-6.0 on the centered starts (λ 759-1,096) of the resnet (with and
without `residual="stream"`) and the relu conv stack, whose unclipped SGD failed or was erratic at lr 0.01-0.02, and
of the deep thin Dense stack: from `CURVATURE_NOTE` on the report says so, with the advice (`sgd_note`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops, tree

from keras_lsuv.inference import inference_mode
from keras_lsuv.interception import intercepted_calls
from keras_lsuv.processes import gather_statistics

# The curvature along the kernels above which the report notes that SGD may be unstable at usual learning rates
# (0.29 at most on the study's starts whose top curvature lets SGD run at lr 0.02, 1.6 at least on its centered
# starts, whose top curvature does not).
CURVATURE_NOTE = 1.0
# The step of the central difference, in units of the direction's (unit) norm.
STEP = 1e-2
# The samples of the LSUV batch it is measured on: two forward passes of these cost an eighth of a pass of the
# default 256. On the study's networks any 16 of them give within 25% of the whole batch's figure (8 draws each).
SAMPLES = 16


def kernel_curvature(model: keras.Model, batch: Any, kernels: Sequence[keras.Variable]) -> float | None:
    """The Gauss-Newton curvature of a cross-entropy on the model's outputs along its kernels' own directions.

    The direction `d` moves each kernel `W` along `W / ‖W‖`, scaled so that `‖d‖ = 1`. The change of the outputs
    along it, `J·d`, is a central difference of two forward passes as `fit` runs the model but for its noise: in
    inference mode (no dropout), each `BatchNormalization` on the batch's own statistics (which `fit` divides by,
    undoing any scale before it; its moving statistics are put back). The curvature is the mean over the batch of
    `(J·d)ᵀ H (J·d)`, summed over the outputs of shape `(batch, units)`, `H` a softmax's `diag(p) - p pᵀ` (a
    sigmoid's `p (1 - p)` for one unit): such outputs are read as a classifier's logits. Other outputs (a backbone's
    hidden states, a segmentation's masks) are not a classifier's: left out, and a model with none is not measured.
    It is a lower
    bound of the top eigenvalue of the loss's Hessian near a start, where the Gauss-Newton part dominates it. Every
    kernel, moving statistic and seed state is written back bit for bit; a layer drawing noise in inference draws
    the same in both passes.

    Example:

    >>> report = keras_lsuv.lsuv_init(model, x, center=True, verbose=0)
    >>> report.curvature  # kernel_curvature(model, batch, the kernels LSUV scaled), as the run measured it
    3.1

    Args:
        model: The model.
        batch: The inputs, as the model takes them; its first `SAMPLES` samples are used (under several
            processes, each process's first `SAMPLES`, and every process gets the mean over all of them).
        kernels: The kernels (each variable once).

    Returns:
        The curvature, NaN where an output is not finite, or `None` where no output is of shape `(batch, units)`.
    """
    kernels = list({id(kernel): kernel for kernel in kernels}.values())
    batch = tree.map_structure(lambda tensor: tensor[:SAMPLES], batch)
    normalizations = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    statistics = [variable for layer in normalizations for variable in layer.non_trainable_variables]
    # A layer drawing noise in inference too (a VAE's sampling) draws the same noise in both passes, and after them
    # its seed is where it was (a `SeedGenerator`'s state variable, by the name Keras gives it).
    seeds = [(v, ops.copy(v.value)) for v in model.non_trainable_variables if v.name == "seed_generator_state"]
    saved = [(variable, ops.copy(variable.value)) for variable in kernels + statistics] + seeds
    values = [ops.convert_to_numpy(ops.cast(kernel.value, "float32")) for kernel in kernels]
    norms = [float(np.linalg.norm(value)) for value in values]
    moving = [(k, v, n) for k, v, n in zip(kernels, values, norms, strict=True) if n > 0]
    if not moving:
        return 0.0
    size = math.sqrt(len(moving))

    def outputs_at(step: float) -> list[np.ndarray]:
        for seed, state in seeds:
            seed.assign(state)
        for kernel, value, norm in moving:
            kernel.assign(ops.cast(value + (step / (norm * size)) * value, kernel.dtype))
        with intercepted_calls(normalizations, _in_training), inference_mode():
            out = model(batch, training=False)
        # To float64 on the host: JAX without x64 would truncate a device cast to float32, with a warning.
        return [ops.convert_to_numpy(o).astype("float64") for o in tree.flatten(out) if len(o.shape) == 2]

    try:
        ahead, behind = outputs_at(STEP), outputs_at(-STEP)
    finally:
        for variable, value in saved:
            variable.assign(value)
    if not ahead:
        return None
    # Per output, the sum of the quadratic form over the samples, and how many: summed over the processes' shards.
    sums = np.zeros((len(ahead), 2))
    for row, (plus, minus) in zip(sums, zip(ahead, behind, strict=True), strict=True):
        logits = (plus + minus) / 2
        moved = (plus - minus) / (2 * STEP)
        if logits.shape[-1] == 1:
            p = 1 / (1 + np.exp(-np.clip(logits, -50, 50)))
            quadratic = p * (1 - p) * moved**2
        else:
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            p = shifted / shifted.sum(axis=-1, keepdims=True)
            quadratic = np.sum(p * moved**2, axis=-1) - np.sum(p * moved, axis=-1) ** 2
        row[:] = float(np.sum(quadratic)), max(quadratic.size, 1)
    gathered = gather_statistics(sums)
    if gathered is not None:
        sums = gathered.sum(axis=0)
    curvature = float(np.sum(sums[:, 0] / sums[:, 1]))
    return curvature if math.isfinite(curvature) else math.nan


def _in_training(layer: keras.layers.Layer, call: Callable[..., Any]) -> Callable[..., Any]:
    """A `BatchNormalization`'s call on the batch's own statistics, as `fit` runs it."""
    return lambda *args, **kwargs: call(*args, **{**kwargs, "training": True})


def sgd_note(curvature: float | None) -> str | None:
    """The report's note where the curvature along the kernels is above `CURVATURE_NOTE`; `None` otherwise."""
    if curvature is None or not math.isfinite(curvature) or curvature < CURVATURE_NOTE:
        return None
    return (
        f"this start may be unstable under SGD at usual learning rates: the loss's curvature along the kernels "
        f"measures {curvature:.3g} (the study's plain-LSUV starts at most 0.29; its centered residual CNN 3.1, top "
        "curvature 1,096, collapsed under SGD at lr 0.02). With SGD, clip the global gradient norm just above its "
        "starting value (global_clipnorm=) or lower the learning rate; or train with Adam. See the guide's "
        "'Which options?'."
    )
