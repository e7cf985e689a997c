"""Several processes, one LSUV: the cross-process operations of a multi-process run, and nothing else.

When training runs one process per host (JAX: `keras.distribution.initialize` with `DataParallel` or
`ModelParallel`; TensorFlow: `tf.distribute.MultiWorkerMirroredStrategy`), each process passes its own shard of the
data, and every process must end with the same kernels: the LSUV of all shards together. The processes agree on
whether every batch is usable (so that a bad shard fails everywhere at once, before any collective of the run) and
on the seed of the orthonormal draw when none is given. Then, on JAX, the shards form one global batch and every
measurement is global by construction; on TensorFlow, each process measures its own shard and the statistics of
every measurement are gathered and merged. Every exchange goes through one primitive, `gather`. With one process
there is no group and every function here returns at once.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

# A batch check's outcome travels as a fixed-size buffer (every process sends the same shape); longer messages are cut.
MESSAGE_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """The processes that run one LSUV together.

    Args:
        count: How many processes take part.
        index: This process's rank, from 0.
        gather_words: Gathers one int32 vector of the same length from every process; returns them stacked in rank
            order, shape `(count, length)`.
        make_global: Where the model's variables are global arrays (JAX under `keras.distribution`): turns this
            process's batch into its part of one global batch, laid out as `fit` lays out its batches, so that the
            forward pass and every reduction in it are global. `None` where each process computes on its own batch
            and the statistics are merged instead (TensorFlow).
    """

    count: int
    index: int
    gather_words: Callable[[np.ndarray], np.ndarray]
    make_global: Callable[[Any], Any] | None = None


_ACTIVE: contextvars.ContextVar[ProcessGroup | None] = contextvars.ContextVar("keras_lsuv_processes", default=None)


def run_across_processes(run: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates `run(model, ...)` so that its measurements are global over the processes training `model`.

    Example:

    >>> @run_across_processes
    ... def lsuv_init(model, x, ...):
    ...     batch = agree_on(lambda: prepare_batch(model, x))
    """

    @functools.wraps(run)
    def run_in_group(model: keras.Model, *args: Any, **kwargs: Any) -> Any:
        token = _ACTIVE.set(find_group(model))
        try:
            return run(model, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return run_in_group


def find_group(model: keras.Model) -> ProcessGroup | None:
    """The processes that train `model` together, or `None` when this process trains it alone."""
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_group(model)
    if backend == "tensorflow":
        return _tensorflow_group(model)
    return None  # Keras distributes torch and NumPy models over one process only.


def gather(array: np.ndarray) -> np.ndarray | None:
    """Every process's `array` (same shape and dtype everywhere), stacked in rank order; `None` with one process.

    The bytes travel unchanged (as int32 words), so float64 statistics cross exactly even where the backend computes
    in float32.
    """
    group = _ACTIVE.get()
    return None if group is None else _gather_in(group, array)


def _gather_in(group: ProcessGroup, array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    raw = np.frombuffer(array.tobytes() + b"\0" * (-array.nbytes % 4), dtype=np.int32)
    stacked = np.ascontiguousarray(group.gather_words(raw), dtype=np.int32)
    return np.stack([np.frombuffer(row.tobytes()[: array.nbytes], dtype=array.dtype) for row in stacked]).reshape(
        (group.count, *array.shape)
    )


def gather_statistics(array: np.ndarray) -> np.ndarray | None:
    """Like `gather`, for the statistics of a measurement; `None` where the measurement was global already."""
    return None if measurements_are_global() else gather(array)


def one_process() -> bool:
    """True when LSUV runs in one process (no process group is active)."""
    return _ACTIVE.get() is None


def measurements_are_global() -> bool:
    """True where a measurement needs no gathering: one process, or a model of global arrays (JAX).

    Only then may a measurement stay on the device until the end of the pass (see `statistics.variance_on_device`).
    """
    group = _ACTIVE.get()
    return group is None or group.make_global is not None


def shared_seed(seed: int | None) -> int | None:
    """`seed` itself, or with `seed=None` under several processes, a random seed drawn by process 0 for all."""
    group = _ACTIVE.get()
    if seed is not None or group is None:
        return seed
    drawn = np.random.default_rng().integers(0, 2**31 - 1, dtype=np.int64)
    return int(_gather_in(group, np.array([drawn], dtype=np.int64))[0, 0])


def agree_on(prepare: Callable[[], Any]) -> Any:
    """Runs `prepare()` (which builds this process's batch) and fails in every process if it fails in any.

    With several processes, each sends whether its `prepare()` raised, and the structure, dtypes and sample shapes of
    its batch. If any process failed, or the batches do not fit together, every process raises the same
    `ValueError`, before any collective of the run, so that none hangs waiting for the others. Where the model is
    distributed over the processes (JAX), the batches must also have the same number of samples, and the batch
    returned is this process's part of the global batch.

    Args:
        prepare: Returns this process's batch; raises `ValueError` for a bad one.

    Returns:
        What `prepare()` returned, or the global batch made of every process's.
    """
    group = _ACTIVE.get()
    if group is None:
        return prepare()
    batch, outcomes = _run_everywhere(group, lambda: _described(prepare()))
    described = {other["samples"] for other in outcomes}
    if len(described) > 1:
        shapes = "; ".join(f"process {rank}: {other['samples']}" for rank, other in enumerate(outcomes))
        raise ValueError(f"The processes' LSUV batches do not fit together (samples of different shapes): {shapes}.")
    make_global = group.make_global
    if make_global is None:
        return batch
    sizes = [other["size"] for other in outcomes]
    if len(set(sizes)) > 1:
        raise ValueError(
            "Under keras.distribution, every process must pass the same number of LSUV samples, as in fit (they "
            f"form one global batch); got {', '.join(f'process {rank}: {n}' for rank, n in enumerate(sizes))}."
        )
    global_batch, _ = _run_everywhere(group, lambda: (make_global(batch), {}))
    return global_batch


def _described(batch: Any) -> tuple[Any, dict[str, Any]]:
    leaves = keras.tree.flatten(batch)
    samples = ", ".join(
        f"{keras.backend.standardize_dtype(leaf.dtype)}{tuple(int(d) for d in leaf.shape[1:])}" for leaf in leaves
    )
    return batch, {"samples": samples, "size": int(leaves[0].shape[0])}


def _run_everywhere(
    group: ProcessGroup, run: Callable[[], tuple[Any, dict[str, Any]]]
) -> tuple[Any, list[dict[str, Any]]]:
    """Runs `run()` here; if it raised here or in any other process, raises the same `ValueError` everywhere.

    Returns what `run()` returned here, and the description (`run()`'s second value) sent by every process.
    """
    result, error = None, None
    try:
        result, outcome = run()
    except Exception as failure:  # every process must learn of it, whatever it is
        error = failure
        outcome = {"error": str(failure) if isinstance(failure, ValueError) else f"{type(failure).__name__}: {failure}"}
    encoded = json.dumps(outcome).encode()  # ASCII: at most 12 bytes a character
    if len(encoded) > MESSAGE_BYTES:
        encoded = json.dumps({"error": outcome.get("error", "")[: MESSAGE_BYTES // 16] + "..."}).encode()
    rows = _gather_in(group, np.frombuffer(encoded.ljust(MESSAGE_BYTES, b"\0"), np.uint8))
    outcomes = [json.loads(bytes(row).rstrip(b"\0")) for row in rows]
    for rank, other in enumerate(outcomes):
        if "error" in other:
            raise ValueError(f"LSUV batch of process {rank} (of {len(outcomes)}): {other['error']}") from error
    return result, outcomes


def _jax_group(model: keras.Model) -> ProcessGroup | None:
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return None
    # jax.distributed is initialized (by keras.distribution.initialize). A model built under a distribution holds
    # global arrays, and XLA may compute from any process's copy of a "replicated" value: the batch must be global
    # too, as `fit` makes it (keras/src/backend/jax/trainer.py, `_distribute_data`).
    distribution = keras.distribution.distribution()
    distributed = any(not weight.value.is_fully_addressable for weight in model.weights)
    if distributed and distribution is None:
        raise ValueError(
            f"The model '{model.name}' is distributed over {jax.process_count()} processes: call LSUV inside the "
            "distribution's scope (or after keras.distribution.set_distribution), so that it can lay out the batch."
        )
    make_global = None
    if distribution is not None and (distributed or not model.weights):

        def make_global(batch: Any) -> Any:
            def to_global(local: Any) -> Any:
                layout = distribution.get_data_layout(local.shape).backend_layout
                return jax.make_array_from_process_local_data(layout, local)  # type: ignore[no-untyped-call]

            return keras.tree.map_structure(to_global, batch)

    return ProcessGroup(jax.process_count(), jax.process_index(), multihost_utils.process_allgather, make_global)


def _tensorflow_group(model: keras.Model) -> ProcessGroup | None:
    import tensorflow as tf

    strategy = tf.distribute.get_strategy() if tf.distribute.has_strategy() else _strategy_of(model)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec()
    jobs = [job for job in ("chief", "worker") if job in spec.jobs]
    count = sum(spec.num_tasks(job) for job in jobs)
    if count <= 1:
        return None
    index = resolver.task_id + (spec.num_tasks("chief") if resolver.task_type == "worker" and "chief" in jobs else 0)

    def gather_words(words: np.ndarray) -> np.ndarray:
        # Cross-worker collectives run through the strategy, in cross-replica context. Each process puts its words
        # in its own row of a zero matrix and the strategy sums the matrices of every replica (an eager all-reduce,
        # exact on integers); only the first local replica of each process sends its words, the others zeros.
        rows = np.zeros((count, words.size), np.int32)
        rows[index] = words
        local_replicas: list[None] = []

        def contribution(_: Any) -> Any:
            local_replicas.append(None)
            return tf.constant(rows if len(local_replicas) == 1 else np.zeros_like(rows))

        per_replica = strategy.experimental_distribute_values_from_function(contribution)
        return np.asarray(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))

    return ProcessGroup(count, index, gather_words)


def _strategy_of(model: keras.Model) -> Any:
    # A model built in `strategy.scope()` keeps distributed variables that know their strategy, so LSUV finds it
    # even when called outside the scope.
    for weight in model.weights:
        strategy = getattr(weight.value, "distribute_strategy", None)
        if strategy is not None:
            return strategy
    return None
