"""The variance statistics LSUV measures, shared by every engine.

A measured tensor is reduced once, on its device, to per-group moments: the element count, mean and sum of squared
deviations (M2) of each group of elements that share one bias value (a channel; the whole tensor when there is no
bias). Fetched to the host in float64, they give every variance LSUV needs by arithmetic alone: the variance over the
whole tensor, the variance after scaling the kernel (for layers whose output is linear in it), and the variance over
several tensors (several calls of one layer) merged without keeping them.

Where nothing has to be merged, a variance may instead stay on the device (`variance_on_device`) and be read back
with others in one transfer (`fetch`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lsuv import processes

# On a CPU, tensors of at most this many elements (1 MiB in float32) are computed on in NumPy (`on_host`); larger ones
# by backend ops, which are faster there once compiled.
HOST_ELEMENTS = 2**18


@dataclasses.dataclass(frozen=True)
class Moments:
    """Per-group moments of a tensor, in float64 on the host.

    Args:
        count: The number of elements in each group (the same for every group).
        mean: The mean of each group, shape `(groups,)`.
        m2: The sum of squared deviations from its mean of each group, shape `(groups,)`.

    Example:

    >>> stats = moments(z)                 # one group: the whole tensor
    >>> stats.variance()                   # the same as np.var(z)
    >>> stats.merge(moments(z2)).variance()  # the variance over z and z2 together
    """

    count: float
    mean: np.ndarray
    m2: np.ndarray

    def merge(self, other: Moments) -> Moments:
        """The moments of both tensors' elements together (Chan et al.'s pairwise update), group by group."""
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"Cannot merge moments of {self.mean.shape} and {other.mean.shape} groups.")
        count = self.count + other.count
        if count == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / count)
        return Moments(count, mean, m2)

    @property
    def grand_mean(self) -> float:
        """The mean over all elements (the groups are of equal size)."""
        return float(np.mean(self.mean))

    def centered(self) -> Moments:
        """The moments after subtracting each group's mean: each group's spread, every mean zero."""
        return Moments(self.count, np.zeros_like(self.mean), self.m2)

    def scaled(self, scale: float, bias: np.ndarray | None = None) -> Moments:
        """The moments of `scale * (z - b) + b`, group by group, with `b` the per-group `bias` (0 if `None`): for
        `z = L + b`, those of the pre-activation after multiplying the kernel by `scale`."""
        offset = 0.0 if bias is None else bias
        return Moments(self.count, scale * (self.mean - offset) + offset, scale * scale * self.m2)

    def pooled(self) -> Moments:
        """The moments of every group together, as one group (the groups are of equal size)."""
        mean = np.mean(self.mean)
        m2 = np.sum(self.m2) + self.count * np.sum(np.square(self.mean - mean))
        return Moments(self.count * self.mean.size, np.array([mean]), np.array([m2]))

    def variance(self, scale: float = 1.0, bias: np.ndarray | None = None) -> float:
        """The variance over all elements of `scale * (z - b) + b`, with `b` the per-group `bias` (0 if `None`).

        For a layer whose pre-activation is `z = L + b` with `L` linear in the kernel, this is the pre-activation
        variance after multiplying the kernel by `scale`. By the law of total variance over equal-sized groups:
        `var = scale² · mean_g(var_g) + var_g(scale · (mean_g - b) + b)`.
        """
        offset = 0.0 if bias is None else bias
        means = scale * (self.mean - offset) + offset
        within = scale * scale * float(np.sum(self.m2))
        between = self.count * float(np.sum(np.square(means - np.mean(means))))
        return (within + between) / (self.count * self.mean.size)


def moments(z: Any, groups: tuple[int, ...] | None = None) -> Moments:
    """Reduces `z` to per-group moments with one device reduction and one host fetch.

    Args:
        z: The tensor measured (any float dtype; reduced in float32).
        groups: The shape of the per-group values, broadcastable against `z` and aligned with its last axes, as a
            bias is (e.g. `(channels,)`, or `(1, channels, 1, 1)` for channels-first); `None` for one group.

    Returns:
        The `Moments` of `z`; when several processes run LSUV together (see `keras_lsuv.processes`), those of every
        process's `z` together. They are NaN or Inf when `z` is not finite.
    """
    rank = len(z.shape)
    shape = (1,) * rank if groups is None else (1,) * (rank - len(groups)) + tuple(groups)
    axes = [axis for axis, size in enumerate(shape) if size == 1]
    if on_host(z):
        values = host_values(z)
        mean, var = _as_float32(
            values.mean(axis=tuple(axes), dtype="float64"), values.var(axis=tuple(axes), dtype="float64")
        )
        mean, var = mean.reshape(-1), var.reshape(-1)
    else:
        z = ops.cast(z, "float32")
        # `ops.var`, not `ops.moments`: the latter computes E[z²] - E[z]² on some backends, which loses the variance
        # in float32 when the mean is large against the spread. Two fused reductions cost less than a two-pass.
        mean, var = ops.mean(z, axis=axes), ops.var(z, axis=axes)
        mean, var = np.asarray(ops.convert_to_numpy(ops.stack([ops.reshape(mean, (-1,)), ops.reshape(var, (-1,))])))
    count = math.prod(int(size) for size in z.shape) / mean.size
    local = Moments(float(count), mean.astype("float64"), var.astype("float64") * count)
    return _merge_processes(local)


def _merge_processes(local: Moments) -> Moments:
    """The moments over every process's tensor (count-weighted, so shards may differ in size).

    `local` itself with one process, or where the tensor is global already (JAX under `keras.distribution`).
    """
    gathered = processes.gather_statistics(np.concatenate([[local.count], local.mean, local.m2]))
    if gathered is None:
        return local
    groups = local.mean.size
    # Merged in rank order from the same gathered values, so every process gets bit-identical moments.
    merged = Moments(0.0, np.zeros(groups), np.zeros(groups))
    for row in gathered:
        merged = merged.merge(Moments(float(row[0]), row[1 : 1 + groups], row[1 + groups :]))
    return merged


def variance(z: Any) -> float:
    """One scalar variance over the whole tensor `z`, as the paper measures it (over every process's `z`)."""
    if processes.measurements_are_global():
        if on_host(z):
            return float(_as_float32(host_values(z).var(dtype="float64"))[0])
        return float(fetch([variance_on_device(z)])[0])  # one reduction: no moments to merge
    return moments(z).variance()


def variance_on_device(z: Any) -> Any:
    """The variance over the whole tensor `z` as a float32 scalar left on its device, to `fetch` later.

    The same statistic as `variance(z)`, without a host round trip, so that an accelerator does not wait for the
    host at every layer. Only where `processes.measurements_are_global()`: with several TensorFlow processes each
    measurement must go through the host to be merged.
    """
    return ops.var(ops.cast(z, "float32"))


def on_host(z: Any) -> bool:
    """Whether LSUV computes on the tensor `z` in NumPy: on a CPU, in one process (a global array of several
    processes cannot be read whole), when it has at most `HOST_ELEMENTS` elements.

    Reading it back costs nothing there, while every backend op on a new shape costs JAX a compilation: for small
    models, most of LSUV's first call in a process.
    """
    small = math.prod(int(size) for size in z.shape) <= HOST_ELEMENTS
    return small and processes.one_process() and not on_accelerator(z)


def host_values(z: Any) -> np.ndarray:
    """The values of the tensor `z` as a float32 NumPy array (a copy where `z` is not float32 already)."""
    return np.asarray(ops.convert_to_numpy(z), dtype="float32")


def _as_float32(*values: Any) -> list[np.ndarray]:
    """Statistics accumulated in float64 on the host, stored in float32 as the device's are (an Inf where they
    overflow it: values too large to measure fail alike on the host and on a device)."""
    with np.errstate(over="ignore"):
        return [np.asarray(value, dtype="float32").astype("float64") for value in values]


def on_accelerator(z: Any) -> bool:
    """True when the tensor `z` lives on an accelerator (GPU, TPU), where reading a value back waits for the device.

    On a CPU a read-back costs nothing, and computing on the device what the host could decide after it costs
    work (see `rescale.unit_scale`).
    """
    # Each framework names a tensor's device its own way; Keras has no portable accessor.
    backend = keras.backend.backend()
    if backend == "jax":
        return any(device.platform != "cpu" for device in z.devices())
    if backend == "torch":
        return bool(z.device.type != "cpu")
    if backend == "tensorflow":
        return ":CPU:" not in z.device.upper()
    return False


def fetch(values: list[Any]) -> np.ndarray:
    """Reads device scalars (e.g. from `variance_on_device`) to the host in one transfer, as float64."""
    return np.asarray(ops.convert_to_numpy(ops.stack(values)), dtype="float64")
