"""The single-pass engine: one eager forward pass; each layer is rescaled on the input it actually receives.

Every target layer's `call` is intercepted for the duration of one `model(batch)` call. When the pass reaches a
target, the layer is evaluated once without its activation, its kernel is rescaled to unit output variance
(`scaling.LayerScaling`), and the pass continues with the rescaled layer's output, so each layer is evaluated about
once whatever the depth (thinc's approach, not the O(L^2) prefix re-runs of the sub-model method). On an accelerator,
where a layer's scale follows from one variance (float32, no bias: `rescale.unit_scale`), it is found on the device
and read back with the others when the pass ends, so that the accelerator does not wait for the host at every layer.
The biases are read once, before the pass.

A layer called several times in one pass (`TimeDistributed`, a cell of an `RNN`, a shared layer) is rescaled at its
first call and measured over all its calls, as the paper's statistic is over the whole output (`multi_call`): every
such layer of the model in the same pass. Where the variance over its calls misses the target, the pass halts from
that layer's first call on: the layers rescaled before it are final, the others are undone and done again in the
next pass, rescaled for what this one measured. A target called with symbolic values (inside JAX's
`scan`/`vmap`/`map`, or a traced function) cannot be measured and is skipped with that reason, and halts the pass
there too; so does one called inside torch's `vmap` (`keras.ops.vectorized_map` on torch).

With `residual="stream"`, each merge of a residual stream is solved as the pass reaches it (`merging.Merging`), and
where a solved merge may have moved the model, the model is measured again at the end (`settling.Settling`). The
layers that add residuals inside their own `call` are traced into graphs first (`tracing`), and every pass runs them
through their graphs, so that their additions are merges it reaches.
Each target's `call` is intercepted by `SinglePass._intercept`, whose docstring is its contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_lsuv.centering import bias_now, is_centered, uncentered_reason
from keras_lsuv.engines.frames import all_frames_at_once, frame_wrappers
from keras_lsuv.engines.merging import TRACED_REASON, Merging
from keras_lsuv.engines.multi_call import every_call, predict, reached
from keras_lsuv.engines.scaling import LayerScaling
from keras_lsuv.engines.settling import Settling
from keras_lsuv.engines.state import LayerState, MergeState, Pass, Status
from keras_lsuv.interception import is_traced
from keras_lsuv.options import LSUVOptions
from keras_lsuv.report import LayerRecord, MergeRecord
from keras_lsuv.rescale import write_bias, write_kernel
from keras_lsuv.residual import Merge, find_merges
from keras_lsuv.targets import Target, read_biases
from keras_lsuv.tracing import TracedCall, candidates, trace_calls


def run_single_pass(
    model: keras.Model,
    batch: Any,
    targets: list[Target],
    options: LSUVOptions,
    on_record: Callable[[LayerRecord], None],
    merges: dict[Merge, MergeRecord | None] | None = None,
) -> dict[Target, LayerRecord]:
    """Rescales every target in one forward pass of `batch` (more where layers called several times per pass need
    them).

    With `merges` (`residual="stream"`), each merge's branches are scaled in the same pass, when the pass reaches
    the merge, and its record is written into `merges`, whose keys are put in the order the passes first reached
    them, then the merges never reached.

    Returns:
        Each target's record: the targets in the order the pass first reached them, then the ones it never reached.
    """
    return SinglePass(model, batch, targets, options, on_record, merges).run()


class SinglePass(LayerScaling, Merging, Settling):
    """The engine's passes: `run` makes passes until one halts nowhere, each rescaling the layers not final yet."""

    def __init__(
        self,
        model: keras.Model,
        batch: Any,
        targets: list[Target],
        options: LSUVOptions,
        on_record: Callable[[LayerRecord], None],
        merges: dict[Merge, MergeRecord | None] | None,
    ) -> None:
        states = [LayerState(t, Status.SKIPPED if t.skip_reason else Status.PENDING) for t in targets]
        self.merge_records = {} if merges is None else merges
        # With merges to solve, the layers whose calls add residuals eagerly, traced into graphs (`tracing`).
        self.traced: list[TracedCall] = []
        if options.residual is not None:
            self._trace_merges(model, batch, targets)
        merge_states = [MergeState(merge) for merge in self.merge_records if not merge.skip_reason]
        super().__init__(model, batch, options, states, merge_states)
        self.on_record = on_record
        # With merges to solve, the pass notes the first BatchNormalization it calls (`Pass.normalization`).
        self.normalizations = (
            [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
            if self.merges
            else []
        )
        # Wrappers whose frames run as one call during the passes (`frames`).
        self.frame_wrappers = frame_wrappers(model, [t.layer for t in targets if not t.skip_reason])
        # In the order the passes first reached them: a dict as an ordered set, checked at every intercepted call.
        self.reached: dict[LayerState, None] = {}
        self.merges_reached: dict[Merge, None] = {}  # likewise, for the merges
        read_biases([t for t in targets if not t.skip_reason])

    def _trace_merges(self, model: keras.Model, batch: Any, targets: list[Target]) -> None:
        """Traces the calls of the model's subclassed layers holding targets (`tracing.trace_calls`) and finds the
        merges again with their graphs (`residual.find_merges`); each layer that could not be traced has a merge
        record left alone that says why its additions are not found."""
        layers = candidates(model, targets)
        if not layers:
            return
        tracing = trace_calls(model, batch, layers)
        self.traced = tracing.traced
        found = find_merges(model, targets, self.traced) if self.traced else list(self.merge_records)
        untraced = [
            Merge(layer, [], [], [], f"additions inside its call, if any, are not found: {reason}")
            for layer, reason in tracing.untraced.items()
        ]
        self.merge_records.clear()
        self.merge_records.update(dict.fromkeys([*found, *untraced]))

    def _forward(self, layers: list[keras.layers.Layer], make_call: Callable[..., Callable[..., Any]]) -> None:
        """`EngineBase._forward`, with each traced layer run through its graph (`TracedCall.call_through`)."""
        through = {call.layer: call for call in self.traced if call.layer not in layers}

        def call_of(layer: keras.layers.Layer, call: Callable[..., Any]) -> Callable[..., Any]:
            return through[layer].call_through(call) if layer in through else make_call(layer, call)

        super()._forward([*layers, *through], call_of)

    def run(self) -> dict[Target, LayerRecord]:
        while self._pass():
            pass
        if self.merges_to_measure():
            self.settle()
        records = {}
        for state in self.reached:
            if state.status is Status.FINAL and state.record is not None:
                records[state.target] = state.record
            else:
                traced = state.status is Status.TRACED
                records[state.target] = state.target.skipped_record(TRACED_REASON if traced else state.reason)
        unreached = [merge for merge in self.merge_records if merge not in self.merges_reached]
        ordered = {merge: self.merge_records[merge] for merge in [*self.merges_reached, *unreached]}
        self.merge_records.clear()
        self.merge_records.update(ordered)
        return records | {s.target: s.target.skipped_record() for s in self.states if s not in self.reached}

    def _intercept(self, state: LayerState, this_pass: Pass, original_call: Callable[..., Any]) -> Callable[..., Any]:
        """The layer's `call` during a pass.

        Contract, per call: a layer that is skipped, final or traced runs as it is. A traced call (symbolic values)
        makes the layer traced and halts the pass from its first call on. Otherwise the first call rescales the
        layer (tentative; for every call, where an earlier pass measured several: `LayerState.prediction`) and
        returns the output at the new scale, unless the pass has halted (the next pass redoes it); each later call
        runs at that scale and is measured (`LayerState.measured`).
        """

        def call(*args: Any, **kwargs: Any) -> Any:
            this_pass.tick += 1
            state.calls += 1
            self.reached.setdefault(state)
            if not state.open:
                return original_call(*args, **kwargs)
            if state.calls == 1:
                state.first_tick = this_pass.tick
            state.last_tick = this_pass.tick
            if is_traced((args, kwargs)):
                state.status = Status.TRACED
                this_pass.halt(state, state.first_tick)
            elif state.calls > 1:
                state.multi_call = True
                if state.status is Status.TENTATIVE:  # measured at the scale of its first call in this pass
                    return self.measure_call(state.target, original_call, args, kwargs, state.measured.append)
            elif not this_pass.halted:  # after a halt nothing is final: leave it to the next pass
                output = self.rescale_on_call(state, this_pass, original_call, args, kwargs)
                if state.status is Status.UNMEASURABLE:
                    return output
                state.status = Status.TENTATIVE
                this_pass.tentative.append(state)
                return output
            return original_call(*args, **kwargs)

        return call

    def _pass(self) -> bool:
        """One pass rescaling each pending layer at its first call; returns whether it halted (then another pass
        is needed for the layers it did not keep)."""
        this_pass = Pass()
        by_layer = {state.target.layer: state for state in self.states}
        by_merge = {state.merge.operation: state for state in self.merges if not state.final}
        skipped = {merge.operation: merge for merge in self.merge_records if merge.skip_reason}
        traced_before = [s for s in self.states if s.status is Status.TRACED]
        for state in self.states:
            state.calls, state.measured = 0, []

        def make_call(layer: Any, call: Callable[..., Any]) -> Callable[..., Any]:
            if layer in self.frame_wrappers:  # a wrapper, never a target nor a merge
                return all_frames_at_once(layer, call)
            if layer in by_merge:
                return self.intercept_merge(by_merge[layer], this_pass, call)
            if layer in by_layer:
                return self._intercept(by_layer[layer], this_pass, call)

            def noted_call(*args: Any, **kwargs: Any) -> Any:  # a skipped merge, or a BatchNormalization
                if layer in skipped:
                    self.merges_reached.setdefault(skipped[layer])
                else:
                    this_pass.normalization = this_pass.normalization or layer
                return call(*args, **kwargs)

            return noted_call

        intercepted = list(by_layer) + list(by_merge) + list(skipped) + self.normalizations + self.frame_wrappers
        self._forward(intercepted, make_call)
        self._read_back(this_pass)  # after it, every record of the pass is complete
        self._end_pass(this_pass)
        end = this_pass.kept()
        self.end_merges(this_pass, end)
        for state in this_pass.tentative[:end]:
            assert state.record is not None  # `_read_back` completed it
            self._finish(state, state.record)
        for state in this_pass.tentative[end:]:
            write_kernel(state.target.scaled_kernel, state.kernel_original(), 1.0)  # undo: it is redone later
            if self.center and state.target.host_bias is not None:
                write_bias(state.target.layer.bias, state.target.host_bias)
            state.record, state.experts = None, False
            if state.status is Status.TENTATIVE:
                state.status = Status.PENDING
        for state in self.states:
            if state.status is Status.TRACED and state not in traced_before:
                state.target.restore_weights()  # not measured: it keeps its kernel, the layers after see that one
        return this_pass.halted

    def _end_pass(self, this_pass: Pass) -> None:
        """Measures each layer the pass called several times over all its calls, and halts the pass where one
        missed the target (or a merge's branch turned out to be called several times).

        Then, so that every layer kept was called only before the halt, a layer called both before and after it
        halts the pass from its own first call, until none is.
        """
        for state in this_pass.tentative:
            if state.calls > 1:
                self._over_every_call(state, this_pass)
        for _, merge in this_pass.merges:
            for branch, _, _ in merge.undo:
                if branch.multi_call:  # solved as if called once: the next pass leaves the merge as it is
                    this_pass.halt(branch, branch.first_tick)
        spanning = True
        while spanning:
            spanning = False
            for state in this_pass.tentative:
                if state.first_tick < this_pass.halt_tick < state.last_tick:
                    this_pass.halt(state, state.first_tick)
                    spanning = True

    def _over_every_call(self, state: LayerState, this_pass: Pass) -> None:
        """The record of a layer this pass called several times, as measured over all its calls; halts the pass at
        its first call where it missed the target and another pass may reach it (`multi_call`)."""
        record, calls = state.record, len(state.measured)
        assert record is not None
        if state.experts:  # its experts were scaled for its first call: the next pass scales it whole, for every call
            state.experts = False
            this_pass.halt(state, state.first_tick)
            return
        first = state.measured[0]
        if first is None:  # rescaled on the device: its first call's moments are not known; the next pass knows
            this_pass.halt(state, state.first_tick)
            return
        every, target = every_call([m for m in state.measured if m is not None]), state.target
        state.passes, state.rescales = state.passes + 1, state.rescales + record.iterations
        coupled = any(
            other is not state and other.calls > 1 and state.first_tick < other.first_tick < state.last_tick
            for other in this_pass.tentative
        )
        bias = None
        if self.center and target.has_bias:  # read back: the bias as the pass ran it
            bias = bias_now(target)
        state.prediction = predict(first, every, record.scale, state.prediction, self.criterion, coupled, bias)
        value = every.variance()
        centered = not (self.center and target.has_bias) or is_centered(target, every, self.criterion)
        converged = reached(value, self.criterion) and centered
        predicted = record.converged  # its loop reached the target it predicted: the prediction, not the layer, missed
        if not converged and predicted and state.passes < self.criterion.max_iterations:
            this_pass.halt(state, state.first_tick)
        if converged:
            reason = uncentered_reason(target) if self.center and not target.has_bias else None
        elif not predicted:  # its own loop's reason, and what it measures over every call
            reason = f"{record.reason}; {value:.3g} measured over its {calls} calls per pass"
        elif not reached(value, self.criterion):
            reason = (
                f"its variance over its {calls} calls per pass measures {value:.3g} after {state.passes} passes (a "
                "layer feeding its own later calls, such as a block shared along a chain, moves with its own scale)"
            )
        else:
            reason = (
                f"its channel means over its {calls} calls per pass measure up to {np.max(np.abs(every.mean)):.3g} "
                f"after {state.passes} passes"
            )
        mean = None if record.final_mean is None else every.grand_mean
        state.record = dataclasses.replace(
            record,
            final_variance=value,
            final_mean=mean,
            iterations=state.rescales,
            converged=converged,
            reason=reason,
        )

    def _finish(self, state: LayerState, record: LayerRecord) -> None:
        state.status, state.record, state.original = Status.FINAL, record, None
        self.on_record(record)
