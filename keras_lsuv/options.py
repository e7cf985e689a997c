"""Checking the options of `lsuv_init` and `LSUVCallback` before anything runs."""

from __future__ import annotations

import math
import numbers
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lsuv.engines import ENGINES
from keras_lsuv.rescale import Criterion

MEASURES = ("preactivation", "output")
VERBOSITIES = ("auto", 0, 1, 2)
# A `SeedGenerator` is turned into one integer seed per run, drawn from this range.
MAX_SEED = 2**31 - 1


def check_options(
    *,
    target_variance: Any,
    tolerance: Any,
    max_iterations: Any,
    measure: Any,
    orthonormal: Any,
    engine: Any,
    seed: Any,
    force: Any,
    verbose: Any,
    num_samples: Any,
) -> Criterion:
    """Validates every option of an LSUV run; returns the stopping criterion.

    Numbers may be Python or NumPy scalars, never bools; `orthonormal` and
    `force` must be bools (Python or NumPy). `verbose` takes `"auto"`, 0, 1, 2
    or a bool, as `fit` does.

    Example:

    >>> check_options(target_variance=1.0, tolerance=np.float32(0.1),
    ...               max_iterations=10, measure="preactivation",
    ...               orthonormal=True, engine="single_pass", seed=0,
    ...               force=False, verbose=0, num_samples=np.int64(64))
    Criterion(target_variance=1.0, tolerance=0.10000000149011612, max_iterations=10)

    Args:
        target_variance: Positive finite number.
        tolerance: Positive finite number.
        max_iterations: Non-negative integer.
        measure: One of `MEASURES`.
        orthonormal: Bool.
        engine: A name in `ENGINES`.
        seed: `None`, a non-negative integer or a `keras.random.SeedGenerator`.
        force: Bool.
        verbose: `"auto"`, 0, 1, 2 or a bool.
        num_samples: Positive integer.

    Returns:
        The `Criterion` (target variance, tolerance, iteration limit) as floats and an int.

    Raises:
        ValueError: Naming the first bad option and the value it got.
    """
    for name, value in (("target_variance", target_variance), ("tolerance", tolerance)):
        if not (_is_real(value) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    if not (_is_integer(max_iterations) and max_iterations >= 0):
        raise ValueError(f"max_iterations must be a non-negative integer; got {max_iterations!r}.")
    if not (_is_integer(num_samples) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
    for name, value, choices in (("measure", measure, MEASURES), ("engine", engine, tuple(ENGINES))):
        if not (isinstance(value, str) and value in choices):
            raise ValueError(f"{name} must be one of {choices}; got {value!r}.")
    for name, value in (("orthonormal", orthonormal), ("force", force)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False; got {value!r}.")
    is_level = _is_integer(verbose) and verbose in (0, 1, 2)
    if not (isinstance(verbose, (bool, np.bool_)) or (isinstance(verbose, str) and verbose == "auto") or is_level):
        raise ValueError(f"verbose must be 'auto', 0, 1 or 2; got {verbose!r}.")
    if not (seed is None or isinstance(seed, keras.random.SeedGenerator) or (_is_integer(seed) and seed >= 0)):
        raise ValueError(f"seed must be None, a non-negative integer or a keras.random.SeedGenerator; got {seed!r}.")
    return Criterion(float(target_variance), float(tolerance), int(max_iterations))


def integer_seed(seed: int | np.integer | keras.random.SeedGenerator | None) -> int | None:
    """The integer seed of one orthonormal redraw.

    An integer gives the same draw on every run. A `SeedGenerator` advances,
    as it does in Keras's initializers: each run draws a new integer from it,
    so a generator seeded the same way gives the same sequence of runs.

    Args:
        seed: A seed `check_options` accepted.

    Returns:
        `None` (draw at random) or a non-negative Python integer.
    """
    if isinstance(seed, keras.random.SeedGenerator):
        return int(ops.convert_to_numpy(keras.random.randint((), 0, MAX_SEED, seed=seed)))
    return None if seed is None else int(seed)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
