"""The one orthonormal draw of keras-lsuv: the `Orthonormal` initializer and step 1's layer-aware redraw."""

from __future__ import annotations

import functools
import math
import numbers
import random as python_random
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lsuv.statistics import on_accelerator
from keras_lsuv.targets import DEPTHWISE, SEPARABLE, TRANSPOSED, Target, is_recurrent

# The Householder reflections of `haar_orthonormal` are applied this many at a time (the blocked, compact WY form).
# On the kernels of ResNet50 and GPT-2 on a 2-core CPU (`benchmarks/step1.py`), blocks of 256 and 512 were within
# 10 % of each other warm on every backend and blocks of 128 up to 30 % slower; 512 compiles in fewer steps on JAX
# (first step 1 of ResNet50: 4.7 s against 11.2 s).
BLOCK = 512
# A batch of `count` (m, n) matrices (m >= n) with count·m·n² at most this (one 256 x 256 matrix) is small: a few
# milliseconds of QR. The ~30 operations of `haar_orthonormal` cost more than the backend's own QR there (2x on
# TensorFlow on a 2-core CPU, `benchmarks/initializer.py`), so small draws use `householder_qr`; and step 1 draws
# small groups on the host in NumPy, which also spares JAX a compilation per shape (0.3-2 s on a 2-core CPU).
SMALL_SIZE = 2**24
# With JAX on a CPU, step 1 draws larger groups on the host too, up to this `count·m·n²`. NumPy runs
# `haar_orthonormal` there at about the device's speed (ResNet50's largest group, 3 x 4608 x 512, in 0.16 s on a
# 2-core CPU), while JAX compiles the Gaussian draw and the reflections for each new shape: ResNet50's 13 large shapes
# took 11 s of its first step 1 (0.7 s once compiled; 1.3 s and 1.0 s with them on the host). The largest groups
# (GPT-2's 48 projections of 768 x 768: 1.9 s in NumPy) are faster on the device even with the compilation.
# TensorFlow and torch compile nothing per shape, and their own draw on a CPU is faster than NumPy's (ResNet50:
# 0.9 and 0.7 s against 1.2 and 1.0 s), so they keep `SMALL_SIZE`.
JAX_CPU_HOST_SIZE = 2**33


def haar_orthonormal(gaussian: Any, block: int = BLOCK, xp: Any = ops) -> Any:
    """Haar-distributed matrices with orthonormal columns from Gaussian ones, at matrix-multiply speed.

    Householder QR of a Gaussian `A` (`m x n`, `m >= n`) writes
    `A = H₁⋯Hₙ R`, and the vector of `Hₖ` is built from the `k`-th column of
    the partly reduced matrix, below the diagonal. By the rotation invariance
    of the Gaussian that column is a fresh Gaussian vector `xₖ` of length
    `m - k + 1`, independent of the others (Stewart, 1980, "The efficient
    generation of random orthogonal matrices"). So the factorization itself
    is skipped: `xₖ` is read off the lower trapezoid of `gaussian`, `Hₖ` is
    LAPACK's reflection for it (`vₖ = xₖ + sign(xₖ₁)‖xₖ‖e₁`), and the result
    is `Q = H₁⋯Hₙ[:, :n] · diag(-sign(xₖ₁))`: the `Q` of Householder QR with
    the signs of `R`'s diagonal folded in, Haar distributed like the draw of
    `keras.initializers.Orthogonal` (not the same values for a seed).

    Forming `Q` is LAPACK's `orgqr`, written in `keras.ops` so that it runs on
    the backend's device: the reflections are applied in blocks of `block`,
    last block first, each block as `I - U T Uᵀ` with
    `T⁻¹ = strictly_upper(UᵀU) + diag(UᵀU) / 2` (Joffrain et al., 2006,
    "Accumulating Householder transformations, revisited"), and only to the
    trailing part of `Q` that it changes: about `4/3 · n³` flops for a
    square matrix, in matrix products and one small triangular solve per
    block. Orthonormal to float32 rounding: `‖QᵀQ - I‖max` was at most 5e-6
    on the kernels of GPT-2 and ResNet50 and at 4096 x 4096.

    Args:
        gaussian: A float32 tensor of shape `(..., m, n)` with `m >= n` and
            independent standard normal entries.
        block: Number of reflections applied at a time.
        xp: The array functions: `keras.ops` (the backend's device), or
            `HOST_OPS` (NumPy arrays on the host).

    Returns:
        A float32 tensor of the same shape whose matrices have orthonormal columns.
    """
    rows, cols = gaussian.shape[-2], gaussian.shape[-1]
    batch_padding = [(0, 0)] * (len(gaussian.shape) - 2)
    q, signs = None, list[Any]()
    for start in reversed(range(0, cols, block)):
        width = min(block, cols - start)
        unit, sign = _reflections(gaussian[..., start:, start : start + width], xp)
        signs.insert(0, sign)
        unit_t = xp.swapaxes(unit, -1, -2)
        # T⁻¹ = strictly_upper(UᵀU) + diag(uᵢᵀuᵢ) / 2: with the computed lengths (1 up to rounding), each block is
        # exactly the product of the reflections of its vectors as rounded, which halves the loss of orthogonality.
        gram = xp.matmul(unit_t, unit)
        inverse_t = xp.triu(gram) - 0.5 * gram * xp.eye(width, dtype="float32")
        # The part of Q that this block changes is [[I, 0], [0, q]] (q from the blocks after it); Uᵀ of it:
        head = unit_t[..., :width]
        product = head if q is None else xp.concatenate([head, xp.matmul(unit_t[..., width:], q)], axis=-1)
        update = xp.matmul(unit, xp.solve_triangular(inverse_t, product, lower=False))
        if q is None:
            q = xp.eye(rows - start, width, dtype="float32") - update
        else:
            top = xp.eye(width, cols - start, dtype="float32") - update[..., :width, :]
            bottom = xp.pad(q, [*batch_padding, (0, 0), (width, 0)]) - update[..., width:, :]
            q = xp.concatenate([top, bottom], axis=-2)
    return q * xp.expand_dims(xp.concatenate(signs, axis=-1), -2)


def householder_qr(matrices: Any) -> Any:
    """The `Q` of the backend's Householder QR (`keras.ops.qr`) with the signs of `R`'s diagonal folded in: for a
    Gaussian, the same (Haar) distribution as `haar_orthonormal`, faster for small matrices (`SMALL_SIZE`)."""
    q, r = ops.qr(matrices)
    return q * ops.expand_dims(ops.sign(ops.diagonal(r, axis1=-2, axis2=-1)), -2)


def _reflections(columns: Any, xp: Any) -> tuple[Any, Any]:
    """The unit Householder vectors of a block of `haar_orthonormal` (column `k` from row `k` of `columns` down)
    and the signs they fold into Q's columns (those of R's diagonal)."""
    below = xp.tril(columns)
    norm = xp.sqrt(xp.sum(xp.square(below), axis=-2))
    sign = xp.where(xp.diagonal(below, axis1=-2, axis2=-1) >= 0, 1.0, -1.0)
    # A zero column (probability zero, possible in float32) gets the vector e₁: still a reflection.
    shift = sign * norm + xp.cast(xp.equal(norm, 0.0), "float32")
    vectors = below + xp.eye(*columns.shape[-2:], dtype="float32") * xp.expand_dims(shift, -2)
    return vectors / xp.sqrt(xp.sum(xp.square(vectors), axis=-2, keepdims=True)), -sign


def orthonormal_matrices(count: int, rows: int, cols: int, seed: int | keras.random.SeedGenerator) -> Any:
    """Draws `count` Haar-distributed matrices with orthonormal columns (tall) or rows (wide), in float32.

    The Gaussian matrices are drawn with `keras.random.normal` on the
    backend's device and made orthonormal there, in float32, in one batched
    call: by `haar_orthonormal`, or by `householder_qr` when the batch is
    small (`SMALL_SIZE`). The values for a given seed are
    reproducible on one backend but differ between backends (as Keras's own
    random initializers do).

    Args:
        count: Number of matrices.
        rows: Number of rows of each matrix.
        cols: Number of columns of each matrix.
        seed: An integer (stateless) or a `keras.random.SeedGenerator`.

    Returns:
        A float32 tensor of shape `(count, rows, cols)`.
    """
    # One matrix is drawn without a batch axis: batched products and solves of one matrix are slower on the CPU.
    if count == 1:
        return ops.expand_dims(_orthonormal_draw((), rows, cols, seed), 0)
    return _orthonormal_draw((count,), rows, cols, seed)


def _orthonormal_draw(batch: tuple[int, ...], rows: int, cols: int, seed: int | keras.random.SeedGenerator) -> Any:
    """`orthonormal_matrices` with the batch axes `batch` (none for one matrix, as the initializer draws it)."""
    tall = (max(rows, cols), min(rows, cols))
    gaussian = keras.random.normal((*batch, *tall), seed=seed, dtype="float32")
    small = _size(math.prod(batch), *tall) <= SMALL_SIZE
    q = householder_qr(gaussian) if small else _compiled_haar_orthonormal(gaussian)
    return ops.swapaxes(q, -1, -2) if rows < cols else q


def _size(count: int, rows: int, cols: int) -> int:
    """The size of a draw of `count` matrices of shape `(rows, cols)`, as `SMALL_SIZE` counts it: `count·m·n²`."""
    return count * max(rows, cols) * min(rows, cols) ** 2


def host_orthonormal_matrices(count: int, rows: int, cols: int, seed: int) -> np.ndarray:
    """`orthonormal_matrices` in NumPy on the host: `haar_orthonormal` of a float32 Gaussian drawn by NumPy.

    Step 1 uses it where the host is faster than launching (and on JAX compiling) the device draw: for small
    groups, and with JAX on a CPU for all but the largest (`JAX_CPU_HOST_SIZE`).
    """
    tall = (count, max(rows, cols), min(rows, cols))
    q: np.ndarray = haar_orthonormal(np.random.default_rng(seed).standard_normal(tall, dtype="float32"), xp=HOST_OPS)
    return np.swapaxes(q, -1, -2) if rows < cols else q


class _HostOps:
    """The `keras.ops` functions of `haar_orthonormal`, in NumPy on float32 arrays (`HOST_OPS`).

    NumPy has the same functions with the same signatures, except a triangular solve (a general one: the blocks
    are at most `BLOCK` wide), a cast, and a `where` that keeps Python scalars float32.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def solve_triangular(a: np.ndarray, b: np.ndarray, lower: bool = False) -> np.ndarray:
        return np.linalg.solve(a, b)

    @staticmethod
    def cast(x: Any, dtype: str) -> np.ndarray:
        return np.asarray(x, dtype=dtype)

    @staticmethod
    def where(condition: np.ndarray, x: float, y: float) -> np.ndarray:
        return np.asarray(np.where(condition, np.float32(x), np.float32(y)))


HOST_OPS = _HostOps()


def _compiled_haar_orthonormal(gaussian: Any, block: int = BLOCK) -> Any:
    """`haar_orthonormal`, compiled once per shape on JAX.

    JAX runs eager `keras.ops` one op at a time and compiles each for every new shape, about twenty per block of
    reflections; one `jax.jit` of the whole function compiles once and fuses the element-wise steps. Keras has no
    portable way to compile a plain function, hence this backend check.
    """
    if keras.backend.backend() != "jax":
        return haar_orthonormal(gaussian, block)
    return _jax_haar_orthonormal()(gaussian, block)


@functools.cache
def _jax_haar_orthonormal() -> Callable[[Any, int], Any]:
    import jax

    return jax.jit(haar_orthonormal, static_argnums=1)


@keras.saving.register_keras_serializable(package="keras_lsuv")
class Orthonormal(keras.initializers.Initializer):
    """Initializer that draws an orthonormal kernel, LSUV's step 1.

    The kernel is viewed as a matrix of shape `(prod(shape[:-1]), shape[-1])`:
    fan-in by fan-out for `Dense` and channels-last `ConvND` kernels. That
    matrix has orthonormal columns when it is tall and orthonormal rows when it
    is wide, times `gain`. It is Haar distributed, like the paper's SVD
    construction, and drawn on the backend's device by `haar_orthonormal`
    (Householder reflections read off a Gaussian matrix, applied in blocks
    of matrix products), or by the backend's QR for matrices of at most
    256 x 256 (see `benchmarks/initializer.py`). Values are computed in float32 and cast to
    the requested dtype, so low-precision kernels are still orthonormal to
    within their precision. A given seed gives the same values on every call
    on one backend, but not the same values on different backends.

    After `import keras_lsuv` the initializer is also available by name,
    `kernel_initializer="orthonormal"`, and models using it save and load.

    Example:

    >>> import keras, keras_lsuv
    >>> w = keras_lsuv.Orthonormal(seed=0)(shape=(64, 32))
    >>> layer = keras.layers.Dense(32, kernel_initializer="orthonormal")

    Args:
        gain: Multiplicative factor applied to the orthonormal matrix.
        seed: A Python integer or a `keras.random.SeedGenerator`. As with
            Keras's own random initializers, an integer or `None` gives the
            same values on every call of one instance (`None` picks a random
            integer at construction); a `SeedGenerator` advances, so each call
            draws new values.
    """

    def __init__(self, gain: float = 1.0, seed: int | keras.random.SeedGenerator | None = None) -> None:
        if isinstance(gain, bool) or not isinstance(gain, numbers.Real) or not math.isfinite(gain):
            raise ValueError(f"`gain` must be a finite number. Received: gain={gain!r}")
        self.gain: float = float(gain)
        self._init_seed: Any = seed
        if seed is None:
            seed = python_random.randint(1, 10**9)
        elif isinstance(seed, dict):
            seed = keras.saving.deserialize_keras_object(seed)
        elif isinstance(seed, bool) or not isinstance(seed, (int, keras.random.SeedGenerator)):
            raise ValueError(
                f"`seed` must be an integer, a `keras.random.SeedGenerator` or None. Received: seed={seed!r}"
            )
        self.seed: int | keras.random.SeedGenerator = seed

    def __call__(self, shape: Sequence[int], dtype: Any = None) -> Any:
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(
                "Orthonormal needs a kernel of rank 2 or more (fan-in by "
                f"fan-out). Received: shape={shape} of rank {len(shape)}."
            )
        matrix = _orthonormal_draw((), math.prod(shape[:-1]), shape[-1], self.seed)
        # Only the operations needed: each eager one costs about 0.1 ms on a CPU, a 256 x 256 draw about 2-5 ms.
        kernel = matrix if self.gain == 1.0 else matrix * self.gain
        kernel = kernel if len(shape) == 2 else ops.reshape(kernel, shape)
        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        return kernel if dtype == "float32" else ops.cast(kernel, dtype)

    def get_config(self) -> dict[str, Any]:
        return {
            "gain": self.gain,
            "seed": keras.saving.serialize_keras_object(self._init_seed),
        }


# `register_keras_serializable` stores the class as "keras_lsuv>Orthonormal",
# which loads saved models; the bare aliases make `kernel_initializer=
# "orthonormal"` and `keras.initializers.get("Orthonormal")` (or a config
# `{"class_name": "Orthonormal", ...}`) work, as both spellings do for Keras's
# own initializers. All are needed.
keras.saving.get_custom_objects().update(orthonormal=Orthonormal, Orthonormal=Orthonormal)


def redraw_orthonormal(targets: Sequence[Target], seed: int | None = None) -> None:
    """Step 1 of LSUV: redraws every kernel of `targets` orthonormally, over each layer's own fan-in.

    Dense, EinsumDense and ConvND kernels are flattened as `Orthonormal` does:
    `(prod(shape[:-1]), shape[-1])`. A transposed conv kernel
    `(*k, filters, in)` maps `in` channels to `k·filters` outputs, so its matrix
    is `(in, prod(k)·filters)`. A depthwise kernel `(*k, in, multiplier)` gets
    one independent `(prod(k), multiplier)` matrix per input channel; a
    separable conv has a depthwise and a pointwise kernel. A kernel layer's
    kernels (`targets.is_kernel_layer`) are flattened as Dense kernels are, but
    an `(experts, in, out)` kernel (rank 3, `expert` in its name: keras-hub's
    mixture-of-experts banks), which gets one `(in, out)` matrix per expert.
    A recurrent layer's input and recurrent kernels get one matrix per gate.

    All matrices of one shape, across layers, are drawn in one batched
    `orthonormal_matrices` call on the backend's device (every attention
    projection of a transformer, every block of a ResNet stage); groups of
    small matrices (`count·m·n² <= SMALL_SIZE`; `JAX_CPU_HOST_SIZE` with JAX
    on a CPU) are drawn on the host instead, by the same algorithm in NumPy.
    Then each kernel of that shape is assigned, cast to its variable's dtype.
    The variables keep their identity and, on JAX, their sharding.

    Example:

    >>> from keras_lsuv.targets import find_targets
    >>> redraw_orthonormal(find_targets(model), seed=0)

    Args:
        targets: The layers to redraw, as found by `keras_lsuv.targets.find_targets`.
        seed: Integer seed; the same seed gives the same kernels on one
            backend. `None` draws at random.
    """
    groups: dict[tuple[int, int], list[tuple[keras.Variable, int, Callable[[Any, Any], Any]]]] = {}
    for target in targets:
        for kernel in target.kernels:
            rows, cols, count, to_kernel = _layout(target.layer, kernel)
            groups.setdefault((rows, cols), []).append((kernel, count, to_kernel))
    seeds = np.random.default_rng(seed)
    for (rows, cols), kernels in groups.items():
        total, group_seed = sum(count for _, count, _ in kernels), int(seeds.integers(2**31))
        host_size = JAX_CPU_HOST_SIZE if _jax_on_cpu(kernels[0][0]) else SMALL_SIZE
        on_host = _size(total, rows, cols) <= host_size
        # On the host the layouts are NumPy operations: per-shape device ops would each compile on JAX.
        if on_host:
            matrices, xp = host_orthonormal_matrices(total, rows, cols, group_seed), np
        else:
            matrices, xp = orthonormal_matrices(total, rows, cols, group_seed), ops
        start = 0
        for kernel, count, to_kernel in kernels:
            values = to_kernel(xp, matrices[start : start + count])
            kernel.assign(values if on_host else ops.cast(values, kernel.dtype))
            start += count


def _jax_on_cpu(kernel: keras.Variable) -> bool:
    """Whether `kernel` is a JAX array on a CPU, where each new shape of a device draw costs a compilation.

    The backend check is needed: Keras has no portable way to ask whether a backend compiles per shape.
    """
    return keras.backend.backend() == "jax" and not on_accelerator(kernel.value)


def _layout(layer: keras.layers.Layer, kernel: keras.Variable) -> tuple[int, int, int, Callable[[Any, Any], Any]]:
    """The orthonormal matrices of one kernel: their rows, columns and number, and how they become the kernel.

    The last is a function of an array module (`numpy` or `keras.ops`, same signatures) and the matrices.
    """
    shape = tuple(kernel.shape)
    if isinstance(layer, TRANSPOSED):
        spatial, filters, channels = shape[:-2], shape[-2], shape[-1]
        return (
            channels,
            math.prod(spatial) * filters,
            1,
            lambda xp, matrices: xp.moveaxis(xp.reshape(matrices, (channels, *spatial, filters)), 0, -1),
        )
    if isinstance(layer, DEPTHWISE) or (isinstance(layer, SEPARABLE) and kernel is layer.depthwise_kernel):
        spatial, channels, multiplier = shape[:-2], shape[-2], shape[-1]
        return (
            math.prod(spatial),
            multiplier,
            channels,
            lambda xp, matrices: xp.reshape(xp.swapaxes(matrices, 0, 1), shape),
        )
    if is_recurrent(layer):  # `(..., gates·units)`: one `(prod(shape[:-1]), units)` matrix per gate
        rows, units = math.prod(shape[:-1]), int(getattr(layer.cell, "units", None) or layer.cell.filters)
        return (
            rows,
            units,
            shape[-1] // units,
            lambda xp, matrices: xp.reshape(xp.swapaxes(matrices, 0, 1), shape),
        )
    if len(shape) == 3 and "expert" in kernel.name.lower():  # `(experts, in, out)`: one matrix per expert
        return shape[1], shape[2], shape[0], lambda xp, matrices: xp.reshape(matrices, shape)
    return math.prod(shape[:-1]), shape[-1], 1, lambda xp, matrices: xp.reshape(matrices, shape)
