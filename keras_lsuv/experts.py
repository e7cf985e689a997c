"""The paper's loop for each expert of a mixture-of-experts bank: one kernel scale per expert.

A bank such as keras-hub's `MixtralMoeExperts` keeps its experts' kernels as `(experts, in, out)` weights and returns
every expert's output stacked on the first axis, `(experts, tokens, dim)`. Scaling slice `e` of its last kernel
scales expert `e`'s output alone, so each expert is brought to the target variance on its own: at each evaluation of
the bank, every expert still outside the tolerance is multiplied by `sqrt(target / var_e)`, as the paper multiplies a
layer, until all are within it or `max_iterations` evaluations have passed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from keras_lsuv.report import LayerRecord
from keras_lsuv.rescale import Criterion
from keras_lsuv.statistics import Moments
from keras_lsuv.targets import Target


def find_expert_scales(
    target: Target, moments_at: Callable[[np.ndarray | None], Moments], criterion: Criterion
) -> tuple[LayerRecord, Moments]:
    """Runs LSUV's loop on every expert of `target` at once.

    Example:

    >>> record, final = find_expert_scales(target, moments_at, Criterion())
    >>> final.m2 / final.count  # each expert's variance, within 0.1 of 1 where `record.converged`

    Args:
        target: The bank (a kernel layer whose scaled kernel is `(experts, in, out)`, float32).
        moments_at: Returns the moments of each expert's output (one group per expert) with expert `e`'s kernel
            slice multiplied by `scales[e]`, or as it is for `None`.
        criterion: Target variance, tolerance and iteration limit.

    Returns:
        The bank's record (its variances over all experts together; `scale` the experts' geometric mean; converged
        where every expert and all of them together are within the tolerance, else why not), and the moments at the
        scales it stopped at, the last `moments_at` evaluated (so the kernel the caller wrote last).

    Raises:
        ValueError: If the bank's output is not finite.
    """
    goal, tolerance = criterion.target_variance, criterion.tolerance
    stats = moments_at(None)
    scales = np.ones(stats.mean.size)
    initial = stats.pooled().variance()
    iterations = 0
    while True:
        each = stats.m2 / stats.count
        if not np.all(np.isfinite(each)):
            raise ValueError(
                f"LSUV: the output of layer '{target.layer.name}' is not finite (experts' variances {each})."
            )
        missed = (np.abs(each - goal) >= tolerance) & (each > 0)
        if not missed.any() or iterations >= criterion.max_iterations:
            break
        scales = np.where(missed, scales * np.sqrt(goal / np.where(missed, each, 1.0)), scales)
        iterations += 1
        stats = moments_at(scales)
    each, final = stats.m2 / stats.count, stats.pooled().variance()
    off = np.flatnonzero(np.abs(each - goal) >= tolerance)
    reason = None
    if off.size:
        values = ", ".join(f"{e}: {each[e]:.3g}" for e in off[:8])
        reason = f"experts measure {values} after {iterations} rescales (0: no signal to scale)"
    elif abs(final - goal) >= tolerance:
        reason = f"every expert is within tolerance, but all of them together measure {final:.3g} (their means differ)"
    record = LayerRecord(
        name=target.layer.name,
        class_name=type(target.layer).__name__,
        initial_variance=initial,
        final_variance=final,
        iterations=iterations,
        converged=reason is None,
        scale=float(np.exp(np.mean(np.log(scales)))),
        reason=reason,
        layer=target.layer,
    )
    return record, stats
