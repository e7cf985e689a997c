"""The orthonormal kernel initializer (step 1 of LSUV)."""

from __future__ import annotations

import math
import numbers
import random as python_random
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops


def orthonormal_matrix(
    rows: int,
    cols: int,
    seed: int | keras.random.SeedGenerator,
) -> Any:
    """Draws matrices with orthonormal columns (tall) or rows (wide), in float32.

    QR of a Gaussian matrix with the signs of `R`'s diagonal folded into `Q`
    gives the Haar (uniform) distribution over orthonormal matrices, the same
    distribution as the SVD construction of the paper, at a fraction of the cost.

    Args:
        rows: Number of rows of each matrix.
        cols: Number of columns of each matrix.
        seed: An integer (stateless) or a `keras.random.SeedGenerator`.

    Returns:
        A float32 tensor of shape `(rows, cols)`.
    """
    gaussian = keras.random.normal((max(rows, cols), min(rows, cols)), seed=seed, dtype="float32")
    q, r = ops.qr(gaussian)
    q = q * ops.sign(ops.diagonal(r))
    return ops.transpose(q) if rows < cols else q


@keras.saving.register_keras_serializable(package="keras_lsuv")
class Orthonormal(keras.initializers.Initializer):
    """Initializer that draws an orthonormal kernel, LSUV's step 1.

    The kernel is viewed as a matrix of shape `(prod(shape[:-1]), shape[-1])`:
    fan-in by fan-out for `Dense` and channels-last `ConvND` kernels. That
    matrix has orthonormal columns when it is tall and orthonormal rows when it
    is wide, times `gain`. It is drawn by QR of a Gaussian matrix with sign
    correction (Haar distributed, like the paper's SVD construction, but faster:
    see `benchmarks/initializer.py`). Values are computed in float32 and cast to
    the requested dtype, so low-precision kernels are still orthonormal to
    within their precision.

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
        matrix = orthonormal_matrix(rows, cols, self.seed)
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
