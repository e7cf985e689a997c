"""The single-pass engine: one eager forward pass; each layer is rescaled on the input it actually receives.

Every target layer's `call` is intercepted for the duration of one `model(batch)` call. When the pass reaches a
target, the layer is evaluated once without its activation, its kernel is rescaled to unit output variance, and the
pass continues with the rescaled layer's output, so each layer is evaluated about once whatever the depth (thinc's
approach, not the O(L^2) prefix re-runs of the sub-model method). On an accelerator, where a layer's scale follows
from one variance (float32, no bias: `rescale.unit_scale`), it is found on the device and read back with the others
when the pass ends, so that the accelerator does not wait for the host at every layer. The biases are read once,
before the pass.

A layer called several times in one pass (`TimeDistributed`, a cell of an `RNN`, a shared layer) is measured over
all its calls, as the paper's statistic is over the whole output. Its first call cannot tell, so the pass notes the
second call, undoes what it did from that layer's first call on, and rescales that layer by re-evaluation: one
forward pass per iteration, its statistics merged over every call. Then a new pass goes on from there. A target
called with symbolic values (inside JAX's `scan`/`vmap`/`map`, or a traced function) cannot be measured and is
skipped with that reason; so is one called inside torch's `vmap` (`keras.ops.vectorized_map` on torch).

With `residual="stream"`, each merge of a residual stream (`residual.Merge`) is intercepted too: at its first call
in a pass that has not halted, the last target of each of its branches is scaled so that the merge's output has the
target variance (`residual.solve`), and the pass goes on with that output. Like a layer's rescale, this is
tentative: a merge reached after the point where its pass halts is undone, and solved again in the next pass. A merge
the pass reaches after a `BatchNormalization` is left as it is: in training, batch statistics would undo its scale.

All the engine knows of a target is its `LayerState` (a `Status`, its calls in this pass, its kernel as step 1 left
it, its record), and of a merge its `MergeState`; a `Pass` holds the layers rescaled and the merges reached in one
pass and where it halted (`Pass.halt`); each target's `call` is intercepted by `_SinglePass._intercept`, whose
docstring is its contract.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lsuv.centering import (
    NO_BIAS_REASON,
    Centering,
    center_at,
    channel_groups,
    find_centered_scale,
    is_centered,
    with_means,
)
from keras_lsuv.inference import inference_mode
from keras_lsuv.interception import intercepted_calls, is_traced
from keras_lsuv.options import LSUVOptions
from keras_lsuv.processes import measurements_are_global
from keras_lsuv.report import LayerRecord, MergeRecord
from keras_lsuv.rescale import (
    ScaleLimit,
    find_scale,
    float32_copy,
    scaled_preactivation,
    unit_scale,
    unit_scale_record,
    variable_dtype,
    write_bias,
    write_kernel,
)
from keras_lsuv.residual import Merge, branch_limit, branch_record, scale_branch, solve
from keras_lsuv.statistics import Moments, fetch, moments, on_accelerator, variance, variance_on_device
from keras_lsuv.targets import Target, read_biases, without_activation

TRACED_REASON = (
    "called inside JAX control flow, torch's vmap or a traced function (scan, vmap, map, vectorized_map): it cannot "
    "be measured eagerly"
)


def run_single_pass(
    model: keras.Model,
    batch: Any,
    targets: list[Target],
    options: LSUVOptions,
    on_record: Callable[[LayerRecord], None],
    merges: dict[Merge, MergeRecord | None] | None = None,
) -> dict[Target, LayerRecord]:
    """Rescales every target in one forward pass of `batch` (more for layers called several times per pass).

    With `merges` (`residual="stream"`), each merge's branches are scaled in the same pass, when the pass reaches
    the merge, and its record is written into `merges`, whose keys are put in the order the passes first reached
    them, then the merges never reached.

    Returns:
        Each target's record: the targets in the order the pass first reached them, then the ones it never reached.
    """
    return _SinglePass(model, batch, targets, options, on_record, merges).run()


class _Abort(BaseException):
    """Carries LSUV's own error out of a layer's call: Keras re-wraps an `Exception` raised there."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _as_lsuv_error() -> Iterator[None]:
    try:
        yield
    except ValueError as error:
        raise _Abort(error) from None


class Status(enum.Enum):
    """Where a target stands in the single-pass engine."""

    SKIPPED = "skipped"  # left alone from the start (`Target.skip_reason`)
    PENDING = "pending"  # to be rescaled at its next first call in a pass
    TENTATIVE = "tentative"  # rescaled in this pass; final at its end unless the pass halted before it
    FINAL = "final"  # rescaled, its record complete
    MULTI_CALL = "multi-call"  # called several times per pass: rescaled by whole passes (`_rescale_by_passes`)
    TRACED = "traced"  # called with symbolic values: never measured, its kernel put back


@dataclasses.dataclass(eq=False)
class LayerState:
    """One target's state in the engine: the only per-layer state there is.

    Args:
        target: The target.
        status: Where it stands.
        multi_call: Whether a pass called it several times (then it was rescaled by passes).
        calls: How many times the current pass has called it.
        original: Its scaled kernel as step 1 left it, in float32, read outside any autocast scope when the layer is
            first processed and dropped once final, so at most one pass's tentative layers hold a copy.
        record: Its record, once known (a layer rescaled on the device has none until the pass reads it back).
        on_device: For a layer rescaled on the device, its variance, scale and stop code, not read back yet.
        merged: Whether a merge scaled it with its residual branch (`residual="stream"`): its variance is then the
            merge's to set, not the target's.
        peak: Its largest |pre-activation| at its scale, where its compute dtype is float16 and there are merges
            to solve (else 0): a merge's branch scale must keep it within that dtype (`residual.branch_limit`).
    """

    target: Target
    status: Status
    multi_call: bool = False
    calls: int = 0
    original: Any = dataclasses.field(default=None, repr=False)
    record: LayerRecord | None = None
    on_device: tuple[Any, Any, Any] | None = dataclasses.field(default=None, repr=False)
    merged: bool = False
    peak: float = 0.0

    @property
    def open(self) -> bool:
        """Whether a call of the layer may still be measured: not skipped, final or traced."""
        return self.status in (Status.PENDING, Status.TENTATIVE, Status.MULTI_CALL)

    def kernel_original(self) -> Any:
        """The scaled kernel as step 1 left it (float32), copied at the first use."""
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
    """One forward pass: the layers rescaled in it, in processing order, and where it halted.

    Args:
        tentative: The layers rescaled in this pass, in processing order.
        halt_at: The index in `tentative` from which nothing this pass did holds; `None` if it did not halt.
        cause: The layer that made it halt.
        merges: The merges the pass reached, each with the length of `tentative` then: one reached at `k` holds
            when the pass halted at `halt_at >= k` (all its branches were rescaled before the cause's first call).
        normalization: The first `BatchNormalization` the pass called, with `residual="stream"`: a merge reached
            after it is left as it is (`_intercept_merge`).
    """

    tentative: list[LayerState] = dataclasses.field(default_factory=list)
    halt_at: int | None = None
    cause: LayerState | None = None
    merges: list[tuple[int, MergeState]] = dataclasses.field(default_factory=list)
    normalization: keras.layers.Layer | None = None

    def halt(self, state: LayerState) -> None:
        """Marks that nothing this pass does from `state` on may become final.

        `state` is a layer whose output the pass cannot vouch for (a second call, a traced call): the layers it
        rescaled before `state`'s first call in this pass saw inputs that do not depend on it, so their records
        hold. Invariant: every layer of `tentative[:halt_at]` was rescaled before any cause's first call in this
        pass, and none after it is; the earliest cause wins.
        """
        index = self.tentative.index(state) if state in self.tentative else len(self.tentative)
        if self.halt_at is None or index < self.halt_at:
            self.halt_at, self.cause = index, state

    @property
    def halted(self) -> bool:
        return self.halt_at is not None


class _SinglePass:
    def __init__(
        self,
        model: keras.Model,
        batch: Any,
        targets: list[Target],
        options: LSUVOptions,
        on_record: Callable[[LayerRecord], None],
        merges: dict[Merge, MergeRecord | None] | None,
    ) -> None:
        self.model, self.batch, self.on_record = model, batch, on_record
        self.measure, self.criterion, self.scale_on_device = options.measure, options.criterion, options.scale_on_device
        self.center = options.center
        self.states = [LayerState(t, Status.SKIPPED if t.skip_reason else Status.PENDING) for t in targets]
        self.merge_records = {} if merges is None else merges
        self.merges = [MergeState(merge) for merge in self.merge_records if not merge.skip_reason]
        # With merges to solve, the pass notes the first BatchNormalization it calls (`Pass.normalization`).
        self.normalizations = (
            [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
            if self.merges
            else []
        )
        self.state_of = {state.target: state for state in self.states}
        # In the order the passes first reached them: a dict as an ordered set, checked at every intercepted call.
        self.reached: dict[LayerState, None] = {}
        self.merges_reached: dict[Merge, None] = {}  # likewise, for the merges
        read_biases([t for t in targets if not t.skip_reason])

    def run(self) -> dict[Target, LayerRecord]:
        while (cause := self._inline_pass()) is not None:
            if cause.status is Status.MULTI_CALL:
                self._finish(cause, self._rescale_by_passes(cause))
        if any(state.multi_call for state in self.states) or self._merges_to_measure():
            self._settle()
        records = {}
        for state in self.reached:
            if state.status is Status.FINAL and state.record is not None:
                records[state.target] = state.record
            else:
                traced = state.status is Status.TRACED
                records[state.target] = state.target.skipped_record(TRACED_REASON if traced else None)
        unreached = [merge for merge in self.merge_records if merge not in self.merges_reached]
        ordered = {merge: self.merge_records[merge] for merge in [*self.merges_reached, *unreached]}
        self.merge_records.clear()
        self.merge_records.update(ordered)
        return records | {s.target: s.target.skipped_record() for s in self.states if s not in self.reached}

    def _intercept(self, state: LayerState, this_pass: Pass, original_call: Callable[..., Any]) -> Callable[..., Any]:
        """The layer's `call` during an inline pass.

        Contract, per call: a layer that is skipped, final or traced runs as it is. A traced call (symbolic
        values) makes the layer traced and halts the pass at it; a second call in the pass makes it multi-call
        and halts there; after a halt, nothing is rescaled (the next pass redoes it); a layer known to be
        multi-call halts the pass at its first call; otherwise the first call rescales the layer (tentative) and
        returns the output at the new scale.
        """

        def call(*args: Any, **kwargs: Any) -> Any:
            state.calls += 1
            self.reached.setdefault(state)
            if not state.open:
                return original_call(*args, **kwargs)
            if is_traced((args, kwargs)):
                state.status = Status.TRACED
                this_pass.halt(state)
            elif state.calls > 1:
                state.status, state.multi_call = Status.MULTI_CALL, True
                this_pass.halt(state)
            elif this_pass.halted:
                pass  # after a halt nothing is final: leave it to the next pass
            elif state.status is Status.MULTI_CALL:
                this_pass.halt(state)
            else:
                output = self._rescale_on_call(state, this_pass, original_call, args, kwargs)
                state.status = Status.TENTATIVE
                this_pass.tentative.append(state)
                return output
            return original_call(*args, **kwargs)

        return call

    def _intercept_merge(
        self, state: MergeState, this_pass: Pass, original_call: Callable[..., Any]
    ) -> Callable[..., Any]:
        """A merge's `call` during an inline pass: at its first call in a pass that has not halted, its branches
        are scaled (`_solve_merge`) and it returns its output at that scale; otherwise it runs as it is."""

        def call(*args: Any, **kwargs: Any) -> Any:
            self.merges_reached.setdefault(state.merge)
            if state.final or this_pass.halted or any(m is state for _, m in this_pass.merges):
                return original_call(*args, **kwargs)
            this_pass.merges.append((len(this_pass.tentative), state))
            if is_traced((args, kwargs)):
                state.record = state.merge.skipped_record(TRACED_REASON)
                return original_call(*args, **kwargs)
            if this_pass.normalization is not None:
                state.record = state.merge.skipped_record(
                    f"BatchNormalization '{this_pass.normalization.name}' runs before it: in training (fit) it "
                    "normalizes by the batch's own statistics, so a branch scale solved in inference would not hold"
                )
                return original_call(*args, **kwargs)
            return self._solve_merge(state, this_pass, original_call, args, kwargs)

        return call

    def _solve_merge(
        self,
        state: MergeState,
        this_pass: Pass,
        original_call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Scales the merge's branches so that its output has the target variance (`residual.solve`); returns
        that output."""
        with _as_lsuv_error():
            self._read_back(this_pass)  # the branches' records, if they were rescaled on the device
        branches = [self.state_of[target] for target in state.merge.branch_targets]
        unsolvable = [
            b for b in branches if b.multi_call or b.status not in (Status.TENTATIVE, Status.FINAL) or b.merged
        ]
        if unsolvable:
            name = unsolvable[0].target.layer.name
            state.record = state.merge.skipped_record(
                f"its branch ends at layer '{name}', which is called several times per pass or was not measured"
            )
            return original_call(*args, **kwargs)
        limit = min((branch_limit(b.target, b.peak) for b in branches), key=lambda limit: limit.scale)
        with _as_lsuv_error():
            record, output = solve(state.merge, args, kwargs, self.criterion, limit)
        state.record = record
        if output is None:
            return original_call(*args, **kwargs)
        for branch in branches:
            assert branch.record is not None
            state.undo.append((branch, branch.record, scale_branch(branch.target, record.scale)))
            branch.record, branch.merged = branch_record(branch.record, record), True
        return output

    def _end_merges(self, this_pass: Pass, end: int) -> None:
        """Keeps the records of the merges reached before the pass halted, and undoes the others (in reverse)."""
        for position, state in reversed(this_pass.merges):
            if position <= end:
                assert state.record is not None
                state.final, self.merge_records[state.merge] = True, state.record
            else:
                for branch, record, before in reversed(state.undo):
                    for variable, value in before:
                        write_kernel(variable, value, 1.0)
                    branch.record, branch.merged = record, False
                state.record = None
            state.undo = []

    def _inline_pass(self) -> LayerState | None:
        """One pass rescaling each pending layer at its first call; returns the layer it halted at, if it did."""
        this_pass = Pass()
        by_layer = {state.target.layer: state for state in self.states}
        by_merge = {state.merge.operation: state for state in self.merges if not state.final}
        skipped = {merge.operation: merge for merge in self.merge_records if merge.skip_reason}
        traced_before = [s for s in self.states if s.status is Status.TRACED]
        for state in self.states:
            state.calls = 0

        def make_call(layer: Any, call: Callable[..., Any]) -> Callable[..., Any]:
            if layer in by_merge:
                return self._intercept_merge(by_merge[layer], this_pass, call)
            if layer in by_layer:
                return self._intercept(by_layer[layer], this_pass, call)

            def noted_call(*args: Any, **kwargs: Any) -> Any:  # a skipped merge, or a BatchNormalization
                if layer in skipped:
                    self.merges_reached.setdefault(skipped[layer])
                else:
                    this_pass.normalization = this_pass.normalization or layer
                return call(*args, **kwargs)

            return noted_call

        self._forward(list(by_layer) + list(by_merge) + list(skipped) + self.normalizations, make_call)
        self._read_back(this_pass)  # after it, every record of the pass is complete
        end = len(this_pass.tentative) if this_pass.halt_at is None else this_pass.halt_at
        self._end_merges(this_pass, end)
        for state in this_pass.tentative[:end]:
            assert state.record is not None  # `_read_back` completed it
            self._finish(state, state.record)
        for state in this_pass.tentative[end:]:
            write_kernel(state.target.scaled_kernel, state.kernel_original(), 1.0)  # undo: it is redone later
            if self.center and state.target.host_bias is not None:
                write_bias(state.target.layer.bias, state.target.host_bias)
            state.record = None
            if state.status is Status.TENTATIVE:
                state.status = Status.PENDING
        for state in self.states:
            if state.status is Status.TRACED and state not in traced_before:
                state.target.restore_weights()  # not measured: it keeps its kernel, the layers after see that one
        return this_pass.cause

    def _read_back(self, this_pass: Pass) -> None:
        """Completes the records of the pass's layers rescaled on the device, in one transfer.

        Raises:
            ValueError: For the first layer, in processing order, whose output was not finite.
        """
        unread = [state for state in this_pass.tentative if state.on_device is not None]
        if unread:
            values = fetch([value for state in unread for value in state.on_device or ()])
            for state, (variance, scale, stop) in zip(unread, values.reshape(-1, 3), strict=True):
                state.record = unit_scale_record(
                    state.target, float(variance), float(scale), float(stop), self.criterion
                )
                state.on_device = None

    def _merges_to_measure(self) -> bool:
        """Whether a solved merge needs its output and its branches measured again on the model.

        With `center=True` a branch's last layer may end off center (its record said so before its merge scaled it,
        and the means scale with it); where a branch computes in float16 or bfloat16 the merge's output was predicted
        from each branch rounded once, where the layer rounds its kernel's and its bias's terms each its own way.
        """
        solved = [state.merge for state in self.merges if state.record is not None and not state.record.skipped]
        return any(
            self.center or not _computes_in_full_precision(target.layer)
            for merge in solved
            for target in merge.branch_targets
        )

    def _settle(self) -> None:
        """Makes the records of a model with layers called several times per pass (or with merges to measure again,
        `_merges_to_measure`) true of the model as it ends.

        Such a layer can feed its own later calls through layers rescaled after it: a block shared along a chain
        (ALBERT calls one transformer layer once per layer of depth), or a layer between two calls of a shared one.
        Rescaling those later layers moves the variance it was rescaled to, and the one of every layer in between.
        So every final layer is measured again over all its calls in one forward pass; those that were converged
        and have left the tolerance are rescaled again, in processing order, by passes (a Gauss-Seidel sweep of the
        paper's loop), and so are those whose channel means moved off zero with `center=True`; at most
        `max_iterations` sweeps. A layer a merge scaled with its residual branch (`LayerState.merged`) keeps its
        kernel, whose scale is its merge's, and has only its bias centered again where its means moved: the merge
        scaled its kernel and bias together, so the bias moves its channel means, not the spread the merge set (the
        merge's variance is measured again with the others). Each record then gives the variance (and mean) measured
        last, and says where they are not within tolerance. (Subtracting the measured means from all biases at once
        instead diverges on a chain of shared layers: each bias moves the means of the layers after it, in every
        call.)
        """
        goal, tolerance = self.criterion.target_variance, self.criterion.tolerance
        sweeps = 0
        while True:
            measured, merged = self._measure_final_layers()
            settled = [
                state
                for state in self.reached
                if state in measured and state.record is not None and state.record.converged
            ]
            moved = [
                state
                for state in settled
                if (abs(measured[state].variance() - goal) >= tolerance and not state.merged)
                or not self._centered(state, measured)
            ]
            if not moved or sweeps >= self.criterion.max_iterations:
                break
            sweeps += 1
            for state in moved:
                state.original = None  # rescaled (or centered) from its kernel as it is now
                if state.merged:
                    self._recenter_by_passes(state)
                else:
                    again = self._rescale_by_passes(state)
                    assert state.record is not None
                    state.record = dataclasses.replace(
                        state.record,
                        scale=state.record.scale * again.scale,
                        iterations=state.record.iterations + again.iterations,
                    )
                state.original = None
        for state, stats in measured.items():
            record = state.record
            assert record is not None
            value = stats.variance()
            within, centered = abs(value - goal) < tolerance, self._centered(state, measured)
            converged, reason = within and centered, record.reason
            if state.merged:  # its variance is its merge's to set: it holds if it stayed where the merge left it
                assert record.final_variance is not None
                stayed = abs(value - record.final_variance) < tolerance
                converged = record.converged and stayed and centered
                if record.converged and not stayed:
                    reason = f"its variance moves to {value:.3g} as layers after it are rescaled, after its merge"
                elif record.converged and not centered:
                    reason = (
                        f"its channel means measure up to {np.max(np.abs(stats.mean)):.3g} after its merge: not "
                        f"centered after {sweeps} sweeps"
                    )
            elif record.converged and not within:
                reason = (
                    f"its variance moves to {value:.3g} as layers after it are rescaled (a layer feeding its own later "
                    f"calls, such as a block shared along a chain): not within tolerance after {sweeps} sweeps"
                )
            elif record.converged and not centered:
                reason = (
                    f"its channel means move to up to {np.max(np.abs(stats.mean)):.3g} as layers after it are "
                    "rescaled (a layer feeding its own later calls, such as a block shared along a chain): not "
                    f"centered after {sweeps} sweeps"
                )
            elif not record.converged and not within:  # its reason is its own loop's: what it measures now too
                reason = f"{record.reason}; {value:.3g} measured over every call once the passes settled"
            elif converged and not record.converged:  # what kept it off holds no more
                reason = NO_BIAS_REASON if self.center and not state.target.has_bias else None
            mean = None if record.final_mean is None else stats.grand_mean
            state.record = dataclasses.replace(
                record, final_variance=value, final_mean=mean, converged=converged, reason=reason
            )
        for merge, value in merged.items():
            assert merge.record is not None
            converged = abs(value - goal) < tolerance
            reason = merge.record.reason
            if merge.record.converged and not converged:
                reason = f"its variance moves to {value:.3g} as layers called several times per pass are rescaled"
            merge.record = dataclasses.replace(merge.record, final_variance=value, converged=converged, reason=reason)
            self.merge_records[merge.merge] = merge.record

    def _measure_final_layers(self) -> tuple[dict[LayerState, Moments], dict[MergeState, float]]:
        """Each final layer's moments over all its eager calls, and each solved merge's output variance, in one
        plain forward pass."""
        final = {state.target.layer: state for state in self.states if state.status is Status.FINAL}
        measured: dict[LayerState, list[Moments]] = {state: [] for state in final.values()}
        solved = {m.merge.operation: m for m in self.merges if m.record is not None and not m.record.skipped}
        merged: dict[MergeState, float] = {}

        def make_call(layer: keras.layers.Layer, original_call: Callable[..., Any]) -> Callable[..., Any]:
            if layer in solved:

                def merge_call(*args: Any, **kwargs: Any) -> Any:
                    output = original_call(*args, **kwargs)
                    merged[solved[layer]] = variance(output)
                    return output

                return merge_call

            def call(*args: Any, **kwargs: Any) -> Any:
                with without_activation(layer) as activation:
                    z = original_call(*args, **kwargs)
                if not is_traced((args, kwargs)):
                    groups = channel_groups(final[layer].target, z) if self.center else None
                    part = final[layer].target.measured(self.measure.of(z, activation), args, kwargs)
                    measured[final[layer]].append(moments(part, groups))
                return _output(final[layer].target, original_call, args, kwargs, z, activation)

            return call

        self._forward(list(final) + list(solved), make_call)
        return {state: _merged(stats) for state, stats in measured.items() if stats}, merged

    def _centered(self, state: LayerState, measured: dict[LayerState, Moments]) -> bool:
        """Whether a final layer is as centering left it: always without `center=True` or without a bias, else
        when every channel's mean measured in `measured` is still near zero."""
        if not (self.center and state.target.has_bias):
            return True
        return is_centered(state.target, measured[state], self.criterion)

    def _finish(self, state: LayerState, record: LayerRecord) -> None:
        state.status, state.record, state.original = Status.FINAL, record, None
        self.on_record(record)

    def _forward(self, layers: list[keras.layers.Layer], make_call: Callable[..., Callable[..., Any]]) -> None:
        try:
            with intercepted_calls(layers, make_call), inference_mode():
                self.model(self.batch, training=False)
        except _Abort as abort:
            raise abort.error from None

    def _scales_on_device(self, target: Target, preactivation: Any) -> bool:
        """Whether `unit_scale` rescales the layer: on an accelerator (or as `LSUVOptions.scale_on_device` says),
        pre-activation `s·z` without bias, float32, and nothing to merge.

        On a CPU the host loop is cheaper: reading the variance back costs nothing there, while the device's scale
        has to be applied to the whole output and the kernel even where it is 1.
        """
        return (
            self.measure.is_affine_in_kernel
            and not self.center
            and (on_accelerator(preactivation) if self.scale_on_device is None else self.scale_on_device)
            and target.is_linear_in_kernel
            and not target.adds_bias()
            and variable_dtype(target.scaled_kernel) == "float32"
            and keras.backend.standardize_dtype(target.layer.compute_dtype) == "float32"
            and measurements_are_global()
        )

    def _rescale_on_device(
        self, state: LayerState, preactivation: Any, measured: Any, activation: Callable[[Any], Any]
    ) -> Any:
        """Rescales the kernel by `unit_scale`, found on the device; returns the layer's output at that scale.

        `var(s·z) = s²·var(z)`, so neither the layer nor the host is needed again: the pass goes on at once, and the
        record is completed when the pass reads every such layer's variance, scale and stop code back together.
        """
        value = variance_on_device(measured)
        scale, stop = unit_scale(value, self.criterion)
        write_kernel(state.target.scaled_kernel, state.kernel_original(), scale)
        state.on_device = (value, scale, stop)
        return activation(ops.multiply(preactivation, scale))

    def _rescale_on_call(
        self,
        state: LayerState,
        this_pass: Pass,
        original_call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Rescales the layer at its first call in the pass; sets its record (or its values on the device) and
        returns its output at the new scale."""
        target = state.target
        layer = target.layer
        with without_activation(layer) as activation:
            preactivation = original_call(*args, **kwargs)
        if self._scales_on_device(target, preactivation):
            return self._rescale_on_device(
                state, preactivation, target.measured(preactivation, args, kwargs), activation
            )
        with _as_lsuv_error():
            self._read_back(this_pass)  # this layer reads its statistics back anyway: the earlier layers' come too
        if not target.is_linear_in_kernel or not _computes_in_full_precision(layer):
            state.record, output = self._rescale_by_reevaluation(
                state, original_call, args, kwargs, activation, preactivation
            )
            return output

        # Pre-activation z = L + B, with L linear in the kernel and B the bias: scaling the kernel by s gives
        # s·L + B = s·z + (1 - s)·B, so no re-evaluation is needed. Only in float32/float64: in float16 or
        # bfloat16, z - B loses L in the rounding of z when the bias dominates, and s multiplies that error.
        z = ops.cast(preactivation, "float32")  # a no-op for float32
        if self.center:
            return self._center_on_call(state, z, activation, preactivation.dtype, args, kwargs)
        bias = target.bias_term(z)

        def at_scale(scale: float) -> Any:
            return scaled_preactivation(z, scale, bias)

        floor = None  # the least variance of the pre-activation over all scales: the bias may keep it above target
        if self.measure.is_affine_in_kernel:
            variance_at = _preactivation_variance(target.measured(z, args, kwargs), bias, target.host_bias)
            floor = None if bias is None else _lowest_variance(variance_at)
        else:

            def variance_at(scale: float) -> float:
                return variance(target.measured(activation(at_scale(scale)), args, kwargs))

        kernel, original = target.scaled_kernel, state.kernel_original()
        limit = ScaleLimit.of(kernel, original, layer, _output_peak(layer, z))
        with _as_lsuv_error():
            record = state.record = find_scale(target, variance_at, self.criterion, limit, floor)
        if record.scale == 1.0:
            return activation(preactivation)
        write_kernel(kernel, original, record.scale)
        return activation(ops.cast(at_scale(record.scale), preactivation.dtype))

    def _center_on_call(
        self,
        state: LayerState,
        z: Any,
        activation: Callable[[Any], Any],
        dtype: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """`center=True` in closed form: the bias set to `-s·mean_c(L)` and the kernel scaled by `s`, where `s` gives
        unit variance to the centered `s·(z - mean_c(z))` (`centering.py`); returns the layer's output at them."""
        target = state.target
        layer, kernel, original = target.layer, target.scaled_kernel, state.kernel_original()
        groups = channel_groups(target, z)
        before = moments(target.measured(z, args, kwargs), groups)
        limit = ScaleLimit.of(kernel, original, layer, _output_peak(layer, z))
        variance_at = before.centered().variance if groups is not None else before.variance
        with _as_lsuv_error():
            record = find_scale(target, variance_at, self.criterion, limit)
        write_kernel(kernel, original, record.scale)
        if groups is None:
            output = ops.multiply(z, record.scale)
        else:
            bias = np.zeros(before.mean.shape) if target.host_bias is None else target.host_bias
            Centering.of(target, before, bias).write(record.scale)
            means = ops.reshape(ops.convert_to_tensor(before.mean.astype("float32")), groups)
            output = ops.multiply(ops.subtract(z, means), record.scale)
        after = moments(target.measured(output, args, kwargs), groups)
        state.record = with_means(target, record, before, after, self.criterion)
        return activation(ops.cast(output, dtype))

    def _rescale_by_reevaluation(
        self,
        state: LayerState,
        original_call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        activation: Callable[[Any], Any],
        preactivation: Any,
    ) -> tuple[LayerRecord, Any]:
        """Rescale the kernel and call the layer again, as the paper does.

        For layers with a `call` of their own, and for float16/bfloat16 layers (whose output the arithmetic
        shortcut cannot predict exactly).
        """
        target = state.target
        layer, kernel = target.layer, target.scaled_kernel
        original = state.kernel_original()
        latest = {"scale": 1.0, "preactivation": preactivation}
        limit = ScaleLimit.of(kernel, original, layer, _output_peak(layer, preactivation))
        if self.center:
            evaluated = False  # the first measure is of `preactivation`: scale 1, the bias as it is

            def measure_at(scale: float) -> Moments:
                nonlocal evaluated
                if evaluated:
                    write_kernel(kernel, original, scale)
                    with without_activation(layer):
                        latest["preactivation"] = original_call(*args, **kwargs)
                evaluated = True
                z = latest["preactivation"]
                return moments(target.measured(z, args, kwargs), channel_groups(target, z))

            with _as_lsuv_error():
                record = find_centered_scale(target, measure_at, self.criterion, limit)
            state.peak = _output_peak(layer, latest["preactivation"]) if self.merges else 0.0
            return record, _output(target, original_call, args, kwargs, latest["preactivation"], activation)

        def variance_at(scale: float) -> float:
            if scale != latest["scale"]:
                write_kernel(kernel, original, scale)
                with without_activation(layer):
                    latest.update(scale=scale, preactivation=original_call(*args, **kwargs))
            z = latest["preactivation"]
            return variance(target.measured(self.measure.of(z, activation), args, kwargs))

        with _as_lsuv_error():
            record = find_scale(target, variance_at, self.criterion, limit)
        state.peak = _output_peak(layer, latest["preactivation"]) if self.merges else 0.0
        return record, _output(target, original_call, args, kwargs, latest["preactivation"], activation)

    def _rescale_by_passes(self, state: LayerState) -> LayerRecord:
        """For a layer called several times per pass: one forward pass per iteration, measured over every call."""
        target = state.target
        measure_at = self._measured_by_passes(state)
        limit = ScaleLimit.of(target.scaled_kernel, state.kernel_original(), target.layer, 0.0)
        if self.center:
            record = find_centered_scale(target, measure_at, self.criterion, limit)
        else:
            record = find_scale(target, lambda scale: measure_at(scale).variance(), self.criterion, limit)
        write_kernel(target.scaled_kernel, state.kernel_original(), record.scale)
        return record

    def _recenter_by_passes(self, state: LayerState) -> None:
        """Centers the bias of a layer again at its kernel as it is (`center_at` at scale 1), one forward pass per
        measure over every call."""
        measure_at = self._measured_by_passes(state)
        center_at(Centering.of_layer(state.target, measure_at(1.0)), 1.0, measure_at, self.criterion)

    def _measured_by_passes(self, state: LayerState) -> Callable[[float], Moments]:
        """`scale -> moments`: the kernel set to `state.kernel_original()` times `scale`, then the layer's
        pre-activation moments (per channel with `center=True`) over every call in one forward pass."""
        target = state.target
        layer, kernel = target.layer, target.scaled_kernel
        original = state.kernel_original()
        measured: list[Moments] = []

        def make_call(layer: keras.layers.Layer, original_call: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                with without_activation(layer) as activation:
                    z = original_call(*args, **kwargs)
                groups = channel_groups(target, z) if self.center else None
                measured.append(moments(target.measured(self.measure.of(z, activation), args, kwargs), groups))
                return _output(target, original_call, args, kwargs, z, activation)

            return call

        def measure_at(scale: float) -> Moments:
            write_kernel(kernel, original, scale)
            measured.clear()
            self._forward([layer], make_call)
            return _merged(measured)

        return measure_at


def _output(
    target: Target,
    original_call: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    preactivation: Any,
    activation: Callable[[Any], Any],
) -> Any:
    """The layer's output, given its pre-activation, for the pass to go on with.

    Keras's own `call` applies the activation last, so the output is `activation(preactivation)`. A `call` of the
    layer's own may do more after the activation (`Dense.call(x) + ...`): it is called again, as it is.
    """
    if target.is_linear_in_kernel:
        return activation(preactivation)
    return original_call(*args, **kwargs)


def _merged(stats: list[Moments]) -> Moments:
    """The moments of every call together."""
    total = stats[0]
    for more in stats[1:]:
        total = total.merge(more)
    return total


def _preactivation_variance(z: Any, bias: Any, offsets: np.ndarray | None) -> Callable[[float], float]:
    """`scale -> var(s·(z - B) + B)` from one reduction of `z` to per-bias-group moments, then host arithmetic.

    `bias` is B as added to `z` (`Target.bias_term`), `offsets` its values on the host (`Target.host_bias`).
    """
    if bias is None or offsets is None:
        measured = variance(z)
        return lambda scale: scale * scale * measured
    stats = moments(z, tuple(bias.shape))
    return lambda scale: stats.variance(scale, offsets)


def _lowest_variance(variance_at: Callable[[float], float]) -> float:
    """The least variance any kernel scale s >= 0 gives: the pre-activation variance is a quadratic in s."""
    v0, v1, v2 = variance_at(0.0), variance_at(1.0), variance_at(2.0)
    a = (v2 - 2 * v1 + v0) / 2
    b = v1 - v0 - a
    return v0 - b * b / (4 * a) if a > 0 and b < 0 else v0


def _computes_in_full_precision(layer: keras.layers.Layer) -> bool:
    return keras.backend.standardize_dtype(layer.compute_dtype) in ("float32", "float64")


def _output_peak(layer: keras.layers.Layer, z: Any) -> float:
    """The largest |pre-activation|, where the compute dtype's range is narrower than float32's (float16)."""
    if keras.backend.standardize_dtype(layer.compute_dtype) != "float16":
        return 0.0
    return float(ops.convert_to_numpy(ops.max(ops.abs(z))))
