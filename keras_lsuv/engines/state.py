"""What the single-pass engine knows of each target and merge, and of one forward pass.

All the engine knows of a target is its `LayerState` (a `Status`, its calls in this pass and what they measured, its
kernel as the pass found it, its record), and of a merge its `MergeState`; a `Pass` holds the layers rescaled and the
merges reached in one pass, numbers every intercepted call (`Pass.tick`) and knows from which call on nothing the
pass did holds (`Pass.halt`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
from collections.abc import Iterator
from typing import Any

import keras

from keras_lsuv.engines.multi_call import Prediction
from keras_lsuv.report import LayerRecord, MergeRecord
from keras_lsuv.rescale import float32_copy
from keras_lsuv.residual import Merge
from keras_lsuv.statistics import Moments
from keras_lsuv.targets import Target


class Abort(BaseException):
    """Carries LSUV's own error out of a layer's call: Keras re-wraps an `Exception` raised there."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def as_lsuv_error() -> Iterator[None]:
    """Raises a `ValueError` of the block as an `Abort`, which `Layer.__call__` lets through."""
    try:
        yield
    except ValueError as error:
        raise Abort(error) from None


class Status(enum.Enum):
    """Where a target stands in the single-pass engine."""

    SKIPPED = "skipped"  # left alone from the start (`Target.skip_reason`)
    PENDING = "pending"  # to be rescaled at its next first call in a pass
    TENTATIVE = "tentative"  # rescaled in this pass; final at its end unless the pass halted before it
    FINAL = "final"  # rescaled, its record complete
    TRACED = "traced"  # called with symbolic values: never measured, its kernel put back
    UNMEASURABLE = "unmeasurable"  # its output is not one floating tensor (`Target.unmeasurable`): its kernel put back


@dataclasses.dataclass(eq=False)
class LayerState:
    """One target's state in the engine: the only per-layer state there is.

    Args:
        target: The target.
        status: Where it stands.
        multi_call: Whether a pass called it several times: it is then measured over every call of the pass.
        calls: How many times the current pass has called it.
        first_tick: `Pass.tick` at its first call in the current pass (-1 before it).
        last_tick: `Pass.tick` at its latest call in the current pass.
        original: Its kernel as the pass found it (as step 1 left it, or an earlier pass undid it to), in float32,
            read outside any autocast scope when the layer is first processed and dropped once final, so at most
            one pass's tentative layers hold a copy.
        record: Its record, once known (a layer rescaled on the device has none until the pass reads it back).
        on_device: For a layer rescaled on the device, its variance, scale and stop code, not read back yet.
        merged: Whether a merge scaled it with its residual branch (`residual="stream"`): its variance is then the
            merge's to set, not the target's.
        peak: Its largest |pre-activation| at its scale, where its compute dtype is float16 and there are merges
            to solve (else 0): a merge's branch scale must keep it within that dtype (`residual.branch_limit`).
        measured: The moments of what each call of the current pass measured, at the scale it ran at (one group,
            or one per channel with `center=True`); `None` in place of a call whose moments are not known (a first
            call rescaled on the device).
        prediction: What the previous pass measured of its calls, to rescale its first call for all of them
            (`multi_call.Prediction`); `None` for a layer called once.
        passes: The passes that rescaled it and measured several calls.
        rescales: The rescales those passes applied, all told (`LayerRecord.iterations`).
        reason: Why it is unmeasurable (`Status.UNMEASURABLE`), else `None`.
        experts: Whether its record is a bank's, each expert scaled on its own (`keras_lsuv.experts`): a pass that
            finds it called several times halts there, and the next pass scales the bank as a whole.
    """

    target: Target
    status: Status
    multi_call: bool = False
    calls: int = 0
    first_tick: int = -1
    last_tick: int = -1
    original: Any = dataclasses.field(default=None, repr=False)
    record: LayerRecord | None = None
    on_device: tuple[Any, Any, Any] | None = dataclasses.field(default=None, repr=False)
    merged: bool = False
    peak: float = 0.0
    measured: list[Moments | None] = dataclasses.field(default_factory=list, repr=False)
    prediction: Prediction | None = None
    passes: int = 0
    rescales: int = 0
    reason: str | None = None
    experts: bool = False

    @property
    def open(self) -> bool:
        """Whether a call of the layer may still be measured: not skipped, final or traced."""
        return self.status in (Status.PENDING, Status.TENTATIVE)

    def kernel_original(self) -> Any:
        """The kernel as the pass found it (float32), copied at the first use."""
        if self.original is None:
            self.original = float32_copy(self.target.scaled_kernel)
        return self.original


@dataclasses.dataclass(eq=False)
class MergeState:
    """One merge's state in the engine (`residual="stream"`).

    Args:
        merge: The merge.
        record: Its record, once the pass reached it.
        final: Whether the record holds (the pass that solved it kept it).
        undo: For each branch it scaled in the current pass: the branch's state, its record before, and each
            variable it wrote with its value before.
    """

    merge: Merge
    record: MergeRecord | None = None
    final: bool = False
    undo: list[tuple[LayerState, LayerRecord, list[tuple[keras.Variable, Any]]]] = dataclasses.field(
        default_factory=list, repr=False
    )


@dataclasses.dataclass
class Pass:
    """One forward pass: the layers rescaled in it, in processing order, its calls, and from where it halted.

    Args:
        tentative: The layers rescaled in this pass, in processing order.
        tick: How many target calls the pass has intercepted so far.
        halt_tick: The call from which nothing this pass did holds (`math.inf` if none); while the pass runs, a
            halt also stops it rescaling more layers (`halted`).
        cause: The layer that made it halt.
        merges: The merges the pass reached, each with the length of `tentative` then: one reached at `k` holds
            when the layers kept are `tentative[:end]` with `end >= k` (all its branches were rescaled before).
        normalization: The first `BatchNormalization` the pass called, with `residual="stream"`: a merge reached
            after it is left as it is.
    """

    tentative: list[LayerState] = dataclasses.field(default_factory=list)
    tick: int = 0
    halt_tick: float = math.inf
    cause: LayerState | None = None
    merges: list[tuple[int, MergeState]] = dataclasses.field(default_factory=list)
    normalization: keras.layers.Layer | None = None

    def halt(self, state: LayerState, tick: float) -> None:
        """Marks that nothing this pass did from call `tick` on holds, because of `state`; the earliest wins."""
        if tick < self.halt_tick:
            self.halt_tick, self.cause = tick, state

    @property
    def halted(self) -> bool:
        return self.halt_tick < math.inf

    def kept(self) -> int:
        """How many layers of `tentative` hold: those first called before the halt.

        Invariant (`SinglePass._end_pass`): every call of each of them came before the halt.
        """
        return next(
            (i for i, state in enumerate(self.tentative) if state.first_tick >= self.halt_tick), len(self.tentative)
        )
