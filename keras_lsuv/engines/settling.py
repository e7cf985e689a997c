"""Settling in the single-pass engine: the model measured again where a solved merge may have moved it.

A merge scales its branches' last layers by its own measure (`residual.solve`): with `center=True` a branch may end
off center, and where a branch computes in float16 or bfloat16 the merge's prediction of its output is rounded
otherwise than the layer rounds. Then every final layer and merge is measured again over all its calls in one plain
forward pass (`measure_final_layers`) and set right by passes (`settle`): each of them a forward pass measuring one
layer over every call (`rescale_by_passes`, `recenter_by_passes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_lsuv.centering import Centering, center_at, find_centered_scale, is_centered, uncentered_reason
from keras_lsuv.engines.forward import EngineBase
from keras_lsuv.engines.multi_call import every_call
from keras_lsuv.engines.state import LayerState, MergeState, Status
from keras_lsuv.report import LayerRecord, MergeRecord
from keras_lsuv.rescale import ScaleLimit, find_scale, write_kernel
from keras_lsuv.residual import Merge
from keras_lsuv.statistics import Moments, variance


class Settling(EngineBase):
    """Measures the model again once the passes are done, and rescales by passes what moved (`settle`)."""

    merge_records: dict[Merge, MergeRecord | None]
    reached: dict[LayerState, None]

    def settle(self) -> None:
        """Makes the records of a model with merges to measure again (`Merging.merges_to_measure`) true of the
        model as it ends.

        Every final layer is measured again over all its calls in one forward pass; those that were converged and
        have left the tolerance are rescaled again, in processing order, by passes (a Gauss-Seidel sweep of the
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
            measured, merged = self.measure_final_layers()
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
                reason = uncentered_reason(state.target) if self.center and not state.target.has_bias else None
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

    def measure_final_layers(self) -> tuple[dict[LayerState, Moments], dict[MergeState, float]]:
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
                state = final[layer]
                return self.measure_call(state.target, original_call, args, kwargs, measured[state].append)

            return call

        self._forward(list(final) + list(solved), make_call)
        return {state: every_call(stats) for state, stats in measured.items() if stats}, merged

    def _centered(self, state: LayerState, measured: dict[LayerState, Moments]) -> bool:
        """Whether a final layer is as centering left it: always without `center=True` or without a bias, else
        when every channel's mean measured in `measured` is still near zero."""
        if not (self.center and state.target.has_bias):
            return True
        return is_centered(state.target, measured[state], self.criterion)

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
                return self.measure_call(target, original_call, args, kwargs, measured.append)

            return call

        def measure_at(scale: float) -> Moments:
            write_kernel(kernel, original, scale)
            measured.clear()
            self._forward([layer], make_call)
            return every_call(measured)

        return measure_at
