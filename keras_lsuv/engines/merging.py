"""Merges of residual streams in the single-pass engine (`residual="stream"`).

Each merge of a residual stream (`residual.Merge`) is intercepted too: at its first call in a pass that has not
halted, the last target of each of its branches (or the layer scale on the branch) is scaled so that the merge's
output has the target variance
(`residual.solve`), and the pass goes on with that output. Like a layer's rescale, this is tentative: a merge reached
after the point where its pass halts is undone, and solved again in the next pass. A merge the pass reaches after a
`BatchNormalization` is left as it is: in training, batch statistics would undo its scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras_lsuv.engines.forward import EngineBase
from keras_lsuv.engines.scaling import computes_in_full_precision
from keras_lsuv.engines.state import MergeState, Pass, Status, as_lsuv_error
from keras_lsuv.interception import is_traced
from keras_lsuv.report import MergeRecord
from keras_lsuv.rescale import write_kernel
from keras_lsuv.residual import Merge, branch_limit, branch_record, scale_branch, solve

TRACED_REASON = (
    "called inside JAX control flow, torch's vmap or a traced function (scan, vmap, map, vectorized_map): it cannot "
    "be measured eagerly"
)


class Merging(EngineBase):
    """Solves the merges of residual streams as a pass reaches them, and keeps or undoes them when it ends."""

    merge_records: dict[Merge, MergeRecord | None]
    merges_reached: dict[Merge, None]

    def intercept_merge(
        self, state: MergeState, this_pass: Pass, original_call: Callable[..., Any]
    ) -> Callable[..., Any]:
        """A merge's `call` during a pass: at its first call in a pass that has not halted, its branches
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
        with as_lsuv_error():
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
        weights = state.merge.branch_weights
        limit = min(
            (branch_limit(b.target, b.peak, w) for b, w in zip(branches, weights, strict=True)),
            key=lambda limit: limit.scale,
        )
        with as_lsuv_error():
            record, output = solve(state.merge, args, kwargs, self.criterion, limit)
        state.record = record
        if output is None:
            return original_call(*args, **kwargs)
        for branch, weight in zip(branches, weights, strict=True):
            assert branch.record is not None
            state.undo.append((branch, branch.record, scale_branch(branch.target, record.scale, weight)))
            branch.record, branch.merged = branch_record(branch.record, record, weight), True
        return output

    def end_merges(self, this_pass: Pass, end: int) -> None:
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

    def merges_to_measure(self) -> bool:
        """Whether a solved merge needs its output and its branches measured again on the model.

        With `center=True` a branch's last layer may end off center (its record said so before its merge scaled it,
        and the means scale with it); where a branch computes in float16 or bfloat16 the merge's output was predicted
        from each branch rounded once, where the layer rounds its kernel's and its bias's terms each its own way.
        """
        solved = [state.merge for state in self.merges if state.record is not None and not state.record.skipped]
        return any(
            self.center or not computes_in_full_precision(target.layer)
            for merge in solved
            for target in merge.branch_targets
        )
