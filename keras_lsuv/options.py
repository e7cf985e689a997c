"""The options of an LSUV run (`LSUVOptions`), declared and checked once: for `lsuv_init`, `LSUVCallback`, engines."""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lsuv.data import DEFAULT_NUM_SAMPLES
from keras_lsuv.rescale import Criterion
from keras_lsuv.residual import RESIDUAL_MODES

# The engines' names (`keras_lsuv.engines.ENGINES` maps each to its engine): declared here so that checking the options
# needs no engine, and the engines, which read their options from here, import nothing circular.
ENGINE_NAMES = ("single_pass", "submodel")

# A `SeedGenerator` is turned into one integer seed per run, drawn from this range.
MAX_SEED = 2**31 - 1


class Measure(str, enum.Enum):
    """What LSUV measures the variance of: each behaviour that depends on it asks here, in one place."""

    PREACTIVATION = "preactivation"  # the layer's output before its fused activation, bias included (the paper's)
    OUTPUT = "output"  # the full output, activation applied

    def of(self, preactivation: Any, activation: Callable[[Any], Any]) -> Any:
        """The measured tensor, from the layer's pre-activation output and its activation."""
        return preactivation if self is Measure.PREACTIVATION else activation(preactivation)

    @property
    def is_affine_in_kernel(self) -> bool:
        """Whether the measured output is `L(kernel) + B` for a Keras layer, so a rescale's effect is known in
        closed form (the device path, and the bias-aware moments of the host loop)."""
        return self is Measure.PREACTIVATION


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSUVOptions:
    """The options of an LSUV run, declared once and checked once, before anything runs.

    `lsuv_init(model, x, **options)` and `LSUVCallback(x, **options)` take
    these fields as keyword arguments; the engines read them from here.
    Numbers may be Python or NumPy scalars (stored as Python numbers), never
    bools; `orthonormal` and `force` must be bools (Python or NumPy);
    `verbose` takes `"auto"`, 0, 1, 2 or a bool, as `fit` does.

    Example:

    >>> options = LSUVOptions(tolerance=np.float32(0.05), measure="output")
    >>> options.criterion
    Criterion(target_variance=1.0, tolerance=0.05000000074505806, max_iterations=10)

    Args:
        target_variance: The output variance to reach (1.0 in the paper); a
            positive finite number.
        tolerance: Stop when `|var - target_variance| < tolerance` (0.1); a
            positive finite number.
        max_iterations: At most this many rescales per layer (T_max, 10); a
            non-negative integer.
        measure: `"preactivation"` (default, as in the paper) measures the
            layer's output before its fused activation, bias included;
            `"output"` measures the full output. Normalizing an output
            activation such as softmax to unit variance is impossible and blows
            up the logits, which is why pre-activation is the default. Stored
            as a `Measure`.
        orthonormal: Redraw the kernels orthonormally first (step 1).
        engine: `"single_pass"` (default): one forward pass, each layer scaled
            on the input it receives. `"submodel"`: re-runs a sub-model up to
            each layer after every rescale (Functional/Sequential models only;
            slow, kept as the reference).
        seed: Seed of the orthonormal redraw: `None` draws at random, a
            non-negative integer gives the same kernels on one backend, a
            `keras.random.SeedGenerator` advances (a new draw each run). Under
            several processes, process 0 draws a `None` seed for all.
        force: Run even if the model's optimizer has already taken steps
            (skipped otherwise), and without the warning given when the
            weights look trained (biases moved from their initial constant).
            `LSUVCallback` skips a model that looks trained unless it is set.
        verbose: `"auto"` or 1: a progress bar and the per-layer table;
            2: the table only; 0: silent.
        num_samples: How many samples of `x` to use (default 256): arrays are
            sliced, iterables are read batch by batch until there are enough.
        center: Also set each target's bias so that its pre-activation has
            zero mean per output channel (over the batch and the spatial or
            sequence positions) at the kernel scale that gives it unit
            variance, in the same pass, as fastai's LSUV does. A target without
            a bias is scaled only, and its record says so. Needs
            `measure="preactivation"`. The records give each pre-activation's
            mean before and after.
        targets: Which layers LSUV initializes: `None` (default) for
            `default_targets` (every `Dense`, `EinsumDense` and convolution),
            or a callable `layer -> bool` called on every layer of the model
            but its `InputLayer`s, nested ones included. It may also choose
            `Embedding` layers, whose matrix is then scaled so that their
            vectors have unit variance on the batch (padding left out with
            `mask_zero`). A selected layer of any other kind is a `ValueError`
            naming it, and a result that is not a bool a `TypeError` naming
            the layer, before anything changes.
        residual: `None` (default) for the paper's LSUV, each layer on its own;
            `"stream"` for residual-aware LSUV: at each merge `Add([stream,
            branch])` of a Functional graph (an `Add` layer or `x + y`), the
            last target of each branch, with its bias, is scaled in the same
            pass so that the merge's output has `target_variance`; where no
            scale reaches it (the stream alone already carries more), to the
            merge's least variance (0 for a branch uncorrelated with the
            stream, as Fixup and SkipInit start). The report has one
            `MergeRecord` per merge. Needs `engine="single_pass"`.
        scale_on_device: Where the single-pass engine finds the scale of a
            layer whose pre-activation variance follows from one variance
            (float32, no bias): `None` (default) on the device on an
            accelerator (nothing is read back until the pass ends) and on the
            host on a CPU (where a read-back is free); `True` or `False` forces
            one way (to compare them, or to test the device path on a CPU).

    Raises:
        ValueError: Naming the first bad option and the value it got.
    """

    target_variance: float = 1.0
    tolerance: float = 0.1
    max_iterations: int = 10
    measure: Measure = Measure.PREACTIVATION
    orthonormal: bool = True
    engine: str = "single_pass"
    seed: int | keras.random.SeedGenerator | None = None
    force: bool = False
    verbose: str | int = "auto"
    num_samples: int = DEFAULT_NUM_SAMPLES
    center: bool = False
    targets: Callable[[keras.layers.Layer], bool] | None = None
    residual: str | None = None
    scale_on_device: bool | None = None

    def __post_init__(self) -> None:
        for name in ("target_variance", "tolerance"):
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
        if not (_is_integer(self.max_iterations) and self.max_iterations >= 0):
            raise ValueError(f"max_iterations must be a non-negative integer; got {self.max_iterations!r}.")
        if not (_is_integer(self.num_samples) and self.num_samples >= 1):
            raise ValueError(f"num_samples must be a positive integer; got {self.num_samples!r}.")
        measures = tuple(measure.value for measure in Measure)
        for name, value, choices in (("measure", self.measure, measures), ("engine", self.engine, ENGINE_NAMES)):
            if not (isinstance(value, str) and value in choices):
                raise ValueError(f"{name} must be one of {choices}; got {value!r}.")
        for name in ("orthonormal", "force", "center"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        if self.center and self.measure != Measure.PREACTIVATION.value:
            raise ValueError(
                f"center=True centers the pre-activation, so it needs measure='preactivation'; got {self.measure!r}."
            )
        if not (self.residual is None or (isinstance(self.residual, str) and self.residual in RESIDUAL_MODES)):
            raise ValueError(f"residual must be None or one of {RESIDUAL_MODES}; got {self.residual!r}.")
        if self.residual is not None and self.engine != "single_pass":
            raise ValueError(
                f"residual={self.residual!r} scales each merge's branches in the single pass; it needs "
                f"engine='single_pass', got engine={self.engine!r}."
            )
        if not (self.targets is None or callable(self.targets)):
            raise ValueError(
                f"targets must be None or a callable layer -> bool (e.g. keras_lsuv.default_targets); got "
                f"{self.targets!r}."
            )
        if not (self.scale_on_device is None or isinstance(self.scale_on_device, (bool, np.bool_))):
            raise ValueError(f"scale_on_device must be None, True or False; got {self.scale_on_device!r}.")
        verbose = self.verbose
        is_level = _is_integer(verbose) and verbose in (0, 1, 2)
        if not (isinstance(verbose, (bool, np.bool_)) or (isinstance(verbose, str) and verbose == "auto") or is_level):
            raise ValueError(f"verbose must be 'auto', 0, 1 or 2; got {verbose!r}.")
        seed = self.seed
        if not (seed is None or isinstance(seed, keras.random.SeedGenerator) or (_is_integer(seed) and seed >= 0)):
            raise ValueError(
                f"seed must be None, a non-negative integer or a keras.random.SeedGenerator; got {seed!r}."
            )
        # Python numbers from here on (a frozen dataclass sets its fields through `object.__setattr__`).
        for name, kind in (("target_variance", float), ("tolerance", float), ("max_iterations", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "num_samples", int(self.num_samples))
        object.__setattr__(self, "measure", Measure(self.measure))
        for name in ("orthonormal", "force", "center"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.scale_on_device is not None:
            object.__setattr__(self, "scale_on_device", bool(self.scale_on_device))

    @property
    def criterion(self) -> Criterion:
        """When a layer is done: the target variance, tolerance and iteration limit."""
        return Criterion(self.target_variance, self.tolerance, self.max_iterations)

    @property
    def verbosity(self) -> int:
        """`verbose` as `fit` reads it: 1 (progress bar and table) for `"auto"`, else 0, 1 or 2."""
        return 1 if self.verbose == "auto" else int(self.verbose)


def integer_seed(seed: int | np.integer | keras.random.SeedGenerator | None) -> int | None:
    """The integer seed of one orthonormal redraw.

    An integer gives the same draw on every run. A `SeedGenerator` advances,
    as it does in Keras's initializers: each run draws a new integer from it,
    so a generator seeded the same way gives the same sequence of runs.

    Args:
        seed: A seed `LSUVOptions` accepted.

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
