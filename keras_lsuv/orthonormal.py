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

from keras_lsuv.targets import DEPTHWISE, SEPARABLE, TRANSPOSED, Target

# float32 unit roundoff (2**-24) times the safety factor of the shift of the first Cholesky-QR round.
_SHIFT_FACTOR = 10 * 2.0**-24
# A batch of `count` (m, n) matrices (m >= n) with count·m·n² at most this is small: a few milliseconds of QR.
# There Householder QR (`keras.ops.qr`) beats Cholesky-QR, whose Cholesky and triangular solve cost ~10 ms each
# in fixed overhead on a busy 2-core CPU with torch, and step 1 draws on the host in NumPy, which costs less than
# one compilation of the device draw for a new shape on JAX (0.3-2 s per shape on a 2-core CPU).
SMALL_SIZE = 2**24


def cholesky_qr(matrices: Any) -> Any:
    """The `Q` of the QR factorization of tall matrices with positive `R` diagonal, by shifted CholeskyQR3.

    Each round computes the Gram matrix `AᵀA`, its Cholesky factor `L` and
    `A ← A L⁻ᵀ`: matrix products and one triangular solve, which run at
    matrix-multiply speed on every backend and device. In float32 a plain
    Cholesky of `AᵀA` fails on a square Gaussian matrix (its condition number,
    about `n`, is squared), so the first round adds a shift
    `s = 10 · u · √m · ‖A‖²_F` (`u` = 2⁻²⁴) to `AᵀA`: it lifts the small
    eigenvalues above rounding error and leaves a matrix of condition number
    at most about `1 / √(10 u √m)`, which two plain rounds make orthonormal to
    float32 precision (Fukaya et al., 2020, "Shifted Cholesky QR for computing
    the QR factorization of ill-conditioned matrices"). The result is `A R⁻¹`
    with `R` upper triangular with a positive diagonal, so it is exactly the
    `Q` of Householder QR with the signs of `R`'s diagonal folded in: for a
    Gaussian `A`, Haar distributed.

    If a Cholesky factorization fails anyway the batch falls back to the
    backend's Householder QR (`keras.ops.qr`).

    Args:
        matrices: A float32 tensor of shape `(..., m, n)` with `m >= n`.

    Returns:
        A float32 tensor of the same shape whose matrices have orthonormal columns.
    """
    rows, cols = matrices.shape[-2], matrices.shape[-1]
    squared_norm = ops.sum(ops.square(matrices), axis=(-2, -1), keepdims=True)
    shift = ops.eye(cols, dtype="float32") * (_SHIFT_FACTOR * math.sqrt(rows) * squared_norm)
    q = matrices
    try:
        for shifted in (True, False, False):
            gram = ops.matmul(ops.swapaxes(q, -1, -2), q)
            lower = ops.cholesky(gram + shift if shifted else gram)
            q = ops.swapaxes(ops.solve_triangular(lower, ops.swapaxes(q, -1, -2), lower=True), -1, -2)
    except Exception:  # noqa: BLE001 - a failed factorization (non positive definite Gram matrix) of any backend
        return householder_qr(matrices)
    return q


def householder_qr(matrices: Any) -> Any:
    """The `Q` of `keras.ops.qr` of tall matrices with the signs of `R`'s diagonal folded in (Haar for Gaussians)."""
    q, r = ops.qr(matrices)
    return q * ops.expand_dims(ops.sign(ops.diagonal(r, axis1=-2, axis2=-1)), -2)


def orthonormal_matrices(count: int, rows: int, cols: int, seed: int | keras.random.SeedGenerator) -> Any:
    """Draws `count` Haar-distributed matrices with orthonormal columns (tall) or rows (wide), in float32.

    The Gaussian matrices are drawn with `keras.random.normal` on the
    backend's device and orthonormalized in one batched `cholesky_qr` when
    they are tall (`m >= 2n`) and the batch is not small (`SMALL_SIZE`), else
    by `householder_qr`: on a CPU the backends' float32 Householder QR beats
    Cholesky-QR on square matrices by 1.5-2x, ties on tall ones on torch and
    JAX and loses on tall ones on TensorFlow (`benchmarks/step1.py`). The
    values for a given seed are reproducible on one backend but differ
    between backends (as Keras's own random initializers do).

    Args:
        count: Number of matrices.
        rows: Number of rows of each matrix.
        cols: Number of columns of each matrix.
        seed: An integer (stateless) or a `keras.random.SeedGenerator`.

    Returns:
        A float32 tensor of shape `(count, rows, cols)`.
    """
    tall = (max(rows, cols), min(rows, cols))
    # One matrix is drawn without a batch axis: JAX's CPU QR is several times slower on a batch of one, and the
    # Gaussian is then the one `keras.initializers.Orthogonal` draws for the same seed.
    gaussian = keras.random.normal((count, *tall) if count > 1 else tall, seed=seed, dtype="float32")
    small = count * tall[0] * tall[1] ** 2 <= SMALL_SIZE
    q = householder_qr(gaussian) if small or tall[0] < 2 * tall[1] else _compiled_cholesky_qr(gaussian)
    q = q if count > 1 else ops.expand_dims(q, 0)
    return ops.swapaxes(q, -1, -2) if rows < cols else q


def host_orthonormal_matrices(count: int, rows: int, cols: int, seed: int) -> np.ndarray:
    """`orthonormal_matrices` in NumPy on the host (float64 Householder QR, signs of R's diagonal folded in).

    Step 1 uses it for small matrices, where it is faster than launching (and on JAX compiling) the device draw.
    """
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((count, max(rows, cols), min(rows, cols))))
    q *= np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    return (np.swapaxes(q, -1, -2) if rows < cols else q).astype("float32")


def _compiled_cholesky_qr(matrices: Any) -> Any:
    """`cholesky_qr`, compiled once per shape on JAX.

    JAX runs eager `keras.ops` one op at a time and compiles each op for every new shape, about twenty
    compilations per matrix shape here; one `jax.jit` of the whole function halves the first call. Keras has no
    portable way to compile a plain function, hence this backend check. Inside `jit` Keras's Cholesky cannot
    raise on failure, so the result is checked here (when not itself traced) and the batch redrawn by
    Householder QR if it is not finite.
    """
    if keras.backend.backend() != "jax":
        return cholesky_qr(matrices)
    import jax
    import jax.numpy as jnp

    q = _jax_cholesky_qr()(matrices)
    if not isinstance(q, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(q))):
        return householder_qr(matrices)
    return q


@functools.cache
def _jax_cholesky_qr() -> Callable[[Any], Any]:
    import jax

    return jax.jit(cholesky_qr)


@keras.saving.register_keras_serializable(package="keras_lsuv")
class Orthonormal(keras.initializers.Initializer):
    """Initializer that draws an orthonormal kernel, LSUV's step 1.

    The kernel is viewed as a matrix of shape `(prod(shape[:-1]), shape[-1])`:
    fan-in by fan-out for `Dense` and channels-last `ConvND` kernels. That
    matrix has orthonormal columns when it is tall and orthonormal rows when it
    is wide, times `gain`. It is Haar distributed, like the paper's SVD
    construction, and drawn by `orthonormal_matrices`: the backend's
    Householder QR, or `cholesky_qr` for large tall matrices (see
    `benchmarks/initializer.py`). Values are computed in float32 and cast to
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
        rows, cols = math.prod(shape[:-1]), shape[-1]
        matrix = orthonormal_matrices(1, rows, cols, self.seed)[0]
        kernel = ops.reshape(matrix * self.gain, shape)
        return ops.cast(kernel, dtype or keras.config.floatx())

    def get_config(self) -> dict[str, Any]:
        return {
            "gain": self.gain,
            "seed": keras.saving.serialize_keras_object(self._init_seed),
        }


# `register_keras_serializable` stores the class as "keras_lsuv>Orthonormal",
# which loads saved models; the bare alias makes `kernel_initializer=
# "orthonormal"` work. Both are needed.
keras.saving.get_custom_objects()["orthonormal"] = Orthonormal


def redraw_orthonormal(targets: Sequence[Target], seed: int | None = None) -> None:
    """Step 1 of LSUV: redraws every kernel of `targets` orthonormally, over each layer's own fan-in.

    Dense, EinsumDense and ConvND kernels are flattened as `Orthonormal` does:
    `(prod(shape[:-1]), shape[-1])`. A transposed conv kernel
    `(*k, filters, in)` maps `in` channels to `k·filters` outputs, so its matrix
    is `(in, prod(k)·filters)`. A depthwise kernel `(*k, in, multiplier)` gets
    one independent `(prod(k), multiplier)` matrix per input channel; a
    separable conv has a depthwise and a pointwise kernel.

    All matrices of one shape, across layers, are drawn in one batched
    `orthonormal_matrices` call on the backend's device (every attention
    projection of a transformer, every block of a ResNet stage); groups of
    small matrices (`count·m·n² <= SMALL_SIZE`) are drawn on the host
    instead. Then each kernel of that shape is assigned, cast to its
    variable's dtype. The variables keep their identity and, on JAX, their
    sharding.

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
        on_host = total * max(rows, cols) * min(rows, cols) ** 2 <= SMALL_SIZE
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
    return math.prod(shape[:-1]), shape[-1], 1, lambda xp, matrices: xp.reshape(matrices, shape)
