"""What an LSUV run did: one record per layer, as a table, an HTML table, a plot or a plain dict."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras
    from matplotlib.axes import Axes

TABLE_HEADER = ("layer", "class", "initial var", "final var", "iters", "scale", "status")
# The columns a centered run (`center=True`) adds before "status".
MEAN_HEADER = ("initial mean", "final mean")
# The merges' table of a residual-aware run (`residual="stream"`).
MERGE_HEADER = ("merge", "stream var", "branch var", "initial var", "final var", "scale", "branches", "status")
# The table of the weights LSUV did not reach (`LSUVReport.uncovered`).
UNCOVERED_HEADER = ("not reached", "class", "params", "kernel-like", "share", "weights", "why")


@dataclasses.dataclass
class LayerRecord:
    """The outcome of LSUV for one layer.

    Args:
        name: The layer's name.
        class_name: The layer's class, e.g. `"Conv2D"`.
        initial_variance: Variance of the measured output before rescaling
            (after the orthonormal redraw, if any). `None` if skipped.
        final_variance: Variance after the last rescale. `None` if skipped.
        iterations: Number of rescales applied.
        converged: Whether `|final_variance - target_variance| < tolerance`;
            with `center=True` also every channel's mean within the tolerance
            of the layer's compute dtype (`centering.mean_tolerance`: 1% of
            the target standard deviation, 5% in bfloat16).
        scale: The factor the kernel was multiplied by (1.0 if untouched).
        reason: Why the layer was skipped or did not converge, or what was
            left out of a converged layer (with `center=True`, a layer without
            a bias is scaled only); else `None`.
        initial_mean: With `center=True`, the mean of the measured
            pre-activation before LSUV (over the whole tensor, as the
            variance); `None` otherwise or if skipped.
        final_mean: With `center=True`, its mean after LSUV, measured on the
            output the layer gives at its new weights.
        merge: With `residual="stream"`, the name of the merge that scaled this
            layer with its residual branch, else `None`. Its final variance
            is then the one the merge gave it (e.g. 0.3, or 0.0 for a branch
            scaled to 0), not `target_variance`, and `converged` says whether
            the merge converged (and, with `center=True`, whether the layer
            is centered).
        layer: The layer itself, which identifies it where names do not (Keras
            allows equal names in nested and subclassed models). Not part of
            `to_dict()`, nor of equality; `None` in a report rebuilt by
            `LSUVReport.from_dict`.
    """

    name: str
    class_name: str
    initial_variance: float | None = None
    final_variance: float | None = None
    iterations: int = 0
    converged: bool = False
    scale: float = 1.0
    reason: str | None = None
    initial_mean: float | None = None
    final_mean: float | None = None
    merge: str | None = None
    layer: keras.layers.Layer | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def skipped(self) -> bool:
        """True when LSUV did not measure this layer at all."""
        return self.initial_variance is None

    def to_dict(self) -> dict[str, Any]:
        """The record's fields as plain Python types, without the layer object."""
        return {field.name: getattr(self, field.name) for field in _record_fields()}


@dataclasses.dataclass
class MergeRecord:
    """The outcome of residual-aware LSUV (`residual="stream"`) at one merge of a residual stream.

    Args:
        name: The name of the `Add` layer, of the `x + y` operation, or of the
            `CustomScaleLayer` (InceptionResNetV2's `x + c·branch`).
        class_name: `"Add"`, or `"CustomScaleLayer"`.
        stream_variance: The variance of the merge's inputs that are not
            branches, summed (the stream); `None` if every input is a branch
            or the merge was skipped.
        branch_variance: The variance of its branches' sum before the merge
            was solved (each branch at unit variance from plain LSUV).
        initial_variance: The merge's output variance before (branch scale 1).
        final_variance: Its output variance at the branch scale.
        scale: The factor the branches were multiplied by: in the kernel and
            bias of each branch's last layer, or in the weight of a layer
            scale on the branch (`scales_with_input`'s `weight`).
        branches: The names of the layers that end the branches.
        converged: Whether `|final_variance - target_variance| < tolerance`.
        reason: Why it was skipped, or why the target was out of reach;
            else `None`.
        operation: The layer or operation itself. Not part of `to_dict()`,
            nor of equality.
        branch_layers: The layers that end the branches, as objects (names
            need not be unique). Not part of `to_dict()`, nor of equality.
        within: For an addition inside a layer's traced `call` (`tracing`),
            that layer, as an object; else `None`. Not part of `to_dict()`,
            nor of equality.
    """

    name: str
    class_name: str = "Add"
    stream_variance: float | None = None
    branch_variance: float | None = None
    initial_variance: float | None = None
    final_variance: float | None = None
    scale: float = 1.0
    branches: list[str] = dataclasses.field(default_factory=list)
    converged: bool = False
    reason: str | None = None
    operation: Any = dataclasses.field(default=None, repr=False, compare=False)
    branch_layers: list[keras.layers.Layer] = dataclasses.field(default_factory=list, repr=False, compare=False)
    within: keras.layers.Layer | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def skipped(self) -> bool:
        """True when the merge was left as it is."""
        return self.initial_variance is None

    def to_dict(self) -> dict[str, Any]:
        """The record's fields as plain Python types, without the operation and layer objects."""
        return {field.name: getattr(self, field.name) for field in _merge_fields()}


@dataclasses.dataclass
class UncoveredLayer:
    """A layer holding trainable weights of rank 2 or more that LSUV did not reach (`LSUVReport.uncovered`).

    A weight counts for the innermost layer holding it (an LSTM's kernels for its `LSTMCell`).

    Args:
        name: The layer's name.
        class_name: The layer's class, e.g. `"LSTMCell"`.
        weights: The path of each weight not reached, with its shape as a list (`{"lstm/lstm_cell/kernel": [8, 64]}`).
        parameters: How many values those weights hold.
        kernel_parameters: How many of them are kernel-like (all but embedding tables and biases, see
            `keras_lsuv.coverage`): the ones `LSUVReport.coverage` counts.
        share: `parameters` as a share of all the model's parameters (`model.count_params()`), between 0 and 1.
        reason: Why LSUV did not reach them: the layer is of a kind LSUV does not initialize, `targets=` did not
            choose it, its record was skipped (with that record's reason), or the weight is not a kernel LSUV
            scales.
        layer: The layer itself. Not part of `to_dict()`, nor of equality; `None` in a report rebuilt by
            `LSUVReport.from_dict`.
    """

    name: str
    class_name: str
    weights: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    parameters: int = 0
    kernel_parameters: int = 0
    share: float = 0.0
    reason: str = ""
    layer: keras.layers.Layer | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The entry's fields as plain Python types, without the layer object."""
        return {field.name: getattr(self, field.name) for field in _uncovered_fields()}

    @property
    def weights_text(self) -> str:
        """Its weights not reached, each as its path and shape."""
        return ", ".join(f"{path} {tuple(shape)}" for path, shape in self.weights.items())

    def describe(self) -> str:
        """One line: the layer, its weights not reached with their shapes, their count and share, and why."""
        return (
            f"'{self.name}' ({self.class_name}): {self.weights_text}: {self.kernel_parameters:,} kernel-like "
            f"parameters, {self.share:.1%} of the model ({self.reason})"
        )


@dataclasses.dataclass
class LSUVReport:
    """The result of `lsuv_init`: per-layer records in processing order.

    Args:
        records: One `LayerRecord` per target layer, in the order the forward
            pass reached them (skipped ones among them), then the ones it
            never reached.
        engine: The engine that ran (`"single_pass"` or `"submodel"`).
        measure: `"preactivation"` or `"output"`.
        target_variance: The variance LSUV aimed for.
        tolerance: The accepted distance to `target_variance`.
        center: Whether the biases were set to center each pre-activation
            (`center=True`).
        skipped_reason: Set when the whole run was skipped (e.g. the model has
            already been trained); then no weight was changed.
        residual: `"stream"` for residual-aware LSUV, else `None`.
        merges: With `residual="stream"`, one `MergeRecord` per merge of a
            residual stream, in the order the pass reached them.
        uncovered: One `UncoveredLayer` per layer holding trainable weights
            of rank 2 or more that no record covers, in the model's layer
            order: of kinds LSUV does not initialize (custom `add_weight`
            kernels, RNN cells, mixture-of-experts expert kernels), left out
            by `targets=`, or whose record was skipped. Embedding and position
            tables, and biases of rank 2, are listed too. A weight is covered
            when LSUV measured and scaled it, or left it alone on purpose (the
            zero kernel of a deliberate start, see `default_targets`; frozen
            weights are not trainable). Empty when the whole run was skipped.
        coverage: The share of the model's kernel-like parameters that LSUV
            reached: the values of the covered kernel-like weights over those
            of every kernel-like weight (trainable, of rank 2 or more, neither
            an embedding table nor a bias; each variable counted once); 1.0
            for a model with none. `None` when the whole run was skipped.
        curvature: With `center=True` or `residual=`, the curvature of a
            cross-entropy on the model's outputs along the kernels LSUV
            scaled, at the start it gave (`stability.kernel_curvature`: a
            lower bound of the loss's top Hessian eigenvalue, which limits
            SGD's stable learning rate), on the outputs of shape `(batch,
            units)` read as logits; `None` otherwise, and for a model with no
            such output.
        notes: What the run's own measurements say beyond convergence: where
            `curvature` is high, that SGD may be unstable at usual learning
            rates, and what to do (`stability.sgd_note`). Each is also a
            warning.

    Example:

    >>> report = keras_lsuv.lsuv_init(model, x, verbose=0)
    >>> print(report)                     # a per-layer table
    >>> report.records[0].final_variance  # close to 1.0
    >>> json.dumps(report.to_dict())      # for an experiment logger
    >>> report.plot()                     # variance per layer (needs matplotlib)
    >>> report.assert_converged()         # in CI: raises unless every layer converged
    >>> report.uncovered                  # the weights LSUV did not reach, by layer
    >>> report.assert_converged(min_coverage=1.0)  # ... and every kernel-like weight was reached

    In Jupyter the report displays as an HTML table.
    """

    records: list[LayerRecord] = dataclasses.field(default_factory=list)
    engine: str = "single_pass"
    measure: str = "preactivation"
    target_variance: float = 1.0
    tolerance: float = 0.1
    center: bool = False
    skipped_reason: str | None = None
    residual: str | None = None
    merges: list[MergeRecord] = dataclasses.field(default_factory=list)
    uncovered: list[UncoveredLayer] = dataclasses.field(default_factory=list)
    coverage: float | None = None
    curvature: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def converged(self) -> bool:
        """True when every processed layer, and every merge solved, reached the tolerance."""
        return all(r.converged for r in self.records + self.merges if not r.skipped)

    def assert_converged(self, min_coverage: float | None = None) -> LSUVReport:
        """Checks that the run happened and every layer it measured converged, e.g. in a test or in CI.

        Layers left alone on purpose (frozen, never reached) do not count;
        a run skipped as a whole (a model that looks trained) does.

        Example:

        >>> report = keras_lsuv.lsuv_init(model, x, verbose=0).assert_converged()
        >>> report.assert_converged(min_coverage=1.0)  # every kernel-like weight reached too

        Args:
            min_coverage: If given, `coverage` must be at least this (a number
                from 0 to 1): `1.0` requires every kernel-like weight of the
                model to be reached.

        Returns:
            The report itself.

        Raises:
            AssertionError: Listing each layer that did not converge, with its
                reason, or saying why the whole run was skipped; with
                `min_coverage`, listing the kernel-like weights not reached
                when `coverage` is below it.
            ValueError: If `min_coverage` is not a number from 0 to 1.
        """
        if min_coverage is not None and (
            isinstance(min_coverage, bool) or not isinstance(min_coverage, (int, float)) or not 0 <= min_coverage <= 1
        ):
            raise ValueError(f"assert_converged: min_coverage must be a number from 0 to 1; got {min_coverage!r}.")
        if self.skipped_reason:
            raise AssertionError(f"LSUV did not run: {self.skipped_reason}")
        failures = []
        failed = [r for r in self.records if not r.skipped and not r.converged]
        merges = [m for m in self.merges if not m.skipped and not m.converged]
        if failed or merges:
            lines = [f"  '{r.name}' ({r.class_name}): {r.reason}" for r in failed]
            lines += [f"  merge '{m.name}': {m.reason}" for m in merges]
            failures.append(
                f"LSUV: {len(failed)} of {sum(not r.skipped for r in self.records)} layers"
                + (f" and {len(merges)} of {sum(not m.skipped for m in self.merges)} merges" if merges else "")
                + " did not converge:\n"
                + "\n".join(lines)
            )
        if min_coverage is not None and self.coverage is None:
            failures.append("LSUV: the report holds no coverage figure (it predates the field, or was built by hand).")
        elif min_coverage is not None and self.coverage is not None and self.coverage < min_coverage:
            lines = [f"  {u.describe()}" for u in self.uncovered if u.kernel_parameters]
            failures.append(
                f"LSUV reached {self.coverage:.2%} of the model's kernel-like parameters, below min_coverage="
                f"{min_coverage:g}; not reached:\n" + "\n".join(lines)
            )
        if failures:
            raise AssertionError("\n".join(failures))
        return self

    def __getitem__(self, key: str | keras.layers.Layer) -> LayerRecord:
        """The record of a layer, given the layer object or its name.

        Raises:
            KeyError: If no record is for that layer.
            ValueError: If `key` is a name that several recorded layers share
                (Keras allows that in nested and subclassed models): look the
                record up by the layer object instead.
        """
        if not isinstance(key, str):
            for record in self.records:
                if record.layer is key:
                    return record
            raise KeyError(f"No LSUV record for the layer {getattr(key, 'name', key)!r}.")
        found = [record for record in self.records if record.name == key]
        if len(found) > 1:
            raise ValueError(
                f"{len(found)} layers of the report are named {key!r}: look the record up by the layer object, "
                "report[layer]."
            )
        if not found:
            raise KeyError(f"No LSUV record for a layer named {key!r}.")
        return found[0]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python types (dicts, lists, str, float, int, bool, None), e.g. for `json.dumps`.

        Every field of the report and of its `LayerRecord`s is included, so
        `LSUVReport.from_dict(report.to_dict()) == report`.

        Returns:
            A dict with the report's fields; `"records"` is a list of dicts,
            one per layer, `"merges"` one per merge and `"uncovered"` one per
            layer LSUV did not reach.
        """
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {
            **fields,
            "records": [record.to_dict() for record in self.records],
            "merges": [merge.to_dict() for merge in self.merges],
            "uncovered": [entry.to_dict() for entry in self.uncovered],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LSUVReport:
        """Rebuilds a report from `to_dict()`'s output (e.g. after a JSON round trip).

        Args:
            data: A dict as returned by `to_dict()`. Fields it lacks take
                their defaults.

        Returns:
            The `LSUVReport`.

        Raises:
            ValueError: If `data` is not a dict, its `records` not a list of
                dicts, `data` or one of its records has a key that is not a
                field, or a record lacks `name` or `class_name`.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"LSUVReport.from_dict takes a dict as to_dict() returns it; got {_describe(data)}.")
        data = dict(data)
        records = [_record_from_dict(entry, i) for i, entry in enumerate(_entries(data, "records", "one per layer"))]
        merges = [_merge_from_dict(entry, i) for i, entry in enumerate(_entries(data, "merges", "one per merge"))]
        uncovered = [
            _uncovered_from_dict(entry, i) for i, entry in enumerate(_entries(data, "uncovered", "one per layer"))
        ]
        _check_keys(data, cls, "the report")
        return cls(records=records, merges=merges, uncovered=uncovered, **data)

    @property
    def _header(self) -> tuple[str, ...]:
        """The table's columns: `TABLE_HEADER`, with `MEAN_HEADER` before the status where means were measured."""
        if not any(r.initial_mean is not None for r in self.records):
            return TABLE_HEADER
        return TABLE_HEADER[:-1] + MEAN_HEADER + TABLE_HEADER[-1:]

    def _rows(self) -> list[tuple[LayerRecord, tuple[str, ...]]]:
        """Each record with its table cells, in `_header`'s order."""
        with_means = self._header != TABLE_HEADER
        rows: list[tuple[LayerRecord, tuple[str, ...]]] = []
        for r in self.records:
            if r.skipped:
                status, initial, final = f"skipped: {r.reason}", "-", "-"
            else:
                status = _status(r.converged, r.reason)
                initial, final = f"{r.initial_variance:.4g}", f"{r.final_variance:.4g}"
            cells: tuple[str, ...] = (r.name, r.class_name, initial, final, str(r.iterations), f"{r.scale:.4g}")
            if with_means:
                cells += tuple("-" if mean is None else f"{mean:.3g}" for mean in (r.initial_mean, r.final_mean))
            rows.append((r, (*cells, status)))
        return rows

    def _merge_rows(self) -> list[tuple[str, ...]]:
        """The merges' table: a header row, then one row per merge."""
        rows: list[tuple[str, ...]] = [MERGE_HEADER]
        for m in self.merges:
            if m.skipped:
                cells = (m.name, "-", "-", "-", "-", "-", ", ".join(m.branches) or "-", f"skipped: {m.reason}")
            else:
                status = _status(m.converged, m.reason)
                stream = "-" if m.stream_variance is None else f"{m.stream_variance:.4g}"
                cells = (
                    m.name,
                    stream,
                    f"{m.branch_variance:.4g}",
                    f"{m.initial_variance:.4g}",
                    f"{m.final_variance:.4g}",
                    f"{m.scale:.4g}",
                    ", ".join(m.branches),
                    status,
                )
            rows.append(cells)
        return rows

    def _uncovered_rows(self) -> list[tuple[str, ...]]:
        """The table of the weights not reached: a header row, then one row per layer."""
        rows: list[tuple[str, ...]] = [UNCOVERED_HEADER]
        for u in self.uncovered:
            cells = (u.name, u.class_name, f"{u.parameters:,}", f"{u.kernel_parameters:,}", f"{u.share:.1%}")
            rows.append((*cells, u.weights_text, u.reason))
        return rows

    def _summary(self) -> str:
        processed = [r for r in self.records if not r.skipped]
        converged = sum(r.converged for r in processed)
        centered = ", centered" if self.center else ""
        residual = f", residual {self.residual}" if self.residual else ""
        solved = [m for m in self.merges if not m.skipped]
        merges = (
            f", {sum(m.converged for m in solved)}/{len(solved)} merges converged, "
            f"{len(self.merges) - len(solved)} skipped"
            if self.residual
            else ""
        )
        coverage = "" if self.coverage is None else f", kernel-like params reached {self.coverage:.1%}"
        return (
            f"LSUV ({self.engine}, {self.measure}{centered}{residual}, target {self.target_variance:g} ± "
            f"{self.tolerance:g}): {converged}/{len(processed)} layers converged, "
            f"{len(self.records) - len(processed)} skipped{merges}{coverage}"
        )

    def __str__(self) -> str:
        if self.skipped_reason:
            return f"LSUV skipped: {self.skipped_reason}"
        lines = _aligned([self._header] + [cells for _, cells in self._rows()])
        if self.merges:
            lines += [""] + _aligned(self._merge_rows())
        if self.uncovered:
            lines += [""] + _aligned(self._uncovered_rows())
        lines.append(self._summary())
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The table as HTML, for Jupyter: the same columns as `str(report)`, rows not converged highlighted."""
        if self.skipped_reason:
            return f"<p><b>LSUV skipped:</b> {html.escape(self.skipped_reason)}</p>"
        header = "".join(f"<th>{html.escape(c)}</th>" for c in self._header)
        body = []
        for record, cells in self._rows():
            style = "" if record.skipped or record.converged else ' style="background-color: #fdd"'
            row = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            body.append(f"<tr{style}>{row}</tr>")
        table = (
            f'<table class="lsuv-report"><caption>{html.escape(self._summary())}</caption>'
            f"<thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        )
        if self.merges:
            table += _html_table("lsuv-merges", self._merge_rows())
        if self.uncovered:
            table += _html_table("lsuv-uncovered", self._uncovered_rows())
        table += "".join(f'<p class="lsuv-note"><b>Note:</b> {html.escape(note)}</p>' for note in self.notes)
        return table

    def plot(self, ax: Axes | None = None) -> Axes:
        """Draws each layer's variance before and after LSUV on a log scale.

        Layers are on the x axis in processing order. Open circles are the
        variances before rescaling, filled dots after; the band
        `target_variance ± tolerance` is shaded. Layers that did not converge
        are drawn in red, skipped layers are marked with a grey cross at the
        bottom of the axes.

        Needs matplotlib: `pip install "keras-lsuv[plot]"`.

        Example:

        >>> ax = report.plot()
        >>> ax.figure.savefig("lsuv.png")

        Args:
            ax: The matplotlib `Axes` to draw on; by default a new figure's.

        Returns:
            The `Axes` drawn on.

        Raises:
            ImportError: If matplotlib is not installed.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                'LSUVReport.plot needs matplotlib: pip install "keras-lsuv[plot]" (or pip install matplotlib).'
            ) from error
        if ax is None:
            _, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(self.records) + 2.0), 3.5))
        low = self.target_variance - self.tolerance
        ax.axhspan(
            low if low > 0 else self.target_variance / 10,
            self.target_variance + self.tolerance,
            color="tab:green",
            alpha=0.2,
            label=f"target {self.target_variance:g} ± {self.tolerance:g}",
        )
        # (position, before, after, converged) of each processed layer.
        processed = [
            (i, r.initial_variance, r.final_variance, r.converged)
            for i, r in enumerate(self.records)
            if r.initial_variance is not None and r.final_variance is not None
        ]
        for converged, color, label in ((True, "tab:blue", "converged"), (False, "tab:red", "not converged")):
            points = [(i, before, after) for i, before, after, done in processed if done == converged]
            if not points:
                continue
            xs, befores, afters = zip(*points, strict=True)
            ax.scatter(xs, befores, facecolors="none", edgecolors=color, label=f"before ({label})")
            ax.scatter(xs, afters, color=color, label=f"after ({label})")
            for i, before, after in points:
                ax.plot([i, i], [before, after], color=color, alpha=0.4, linewidth=1)
        skipped = [i for i, r in enumerate(self.records) if r.skipped]
        if skipped:
            ax.scatter(
                skipped,
                [0.02] * len(skipped),
                marker="x",
                color="grey",
                label="skipped",
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(self.records)))
        ax.set_xticklabels([r.name for r in self.records], rotation=90, fontsize=7)
        ax.set_ylabel(f"variance ({self.measure})")
        ax.set_title(self._summary(), fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
        return ax


def _status(converged: bool, reason: str | None) -> str:
    """The status cell of a record (a layer's or a merge's) that was not skipped."""
    if not converged:
        return f"NOT CONVERGED: {reason}"
    return f"ok ({reason})" if reason else "ok"


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as text lines, each column but the last padded to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in rows]


def _html_table(css_class: str, rows: list[tuple[str, ...]]) -> str:
    """An HTML table of a header row and body rows of cells."""
    header, *body = rows
    heads = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="{css_class}"><thead><tr>{heads}</tr></thead><tbody>{cells}</tbody></table>'


def _uncovered_fields() -> list[dataclasses.Field[Any]]:
    """The fields of `UncoveredLayer` that `to_dict` holds: all but the layer object."""
    return [field for field in dataclasses.fields(UncoveredLayer) if field.name != "layer"]


def _entries(data: dict[str, Any], key: str, each: str) -> list[Any]:
    """Takes the list `data[key]` out of `data` (empty if absent).

    Raises:
        ValueError: If it is not a list.
    """
    entries = data.pop(key, [])
    if not isinstance(entries, list):
        raise ValueError(f"LSUVReport.from_dict: '{key}' must be a list of dicts, {each}; got {_describe(entries)}.")
    return list(entries)


def _uncovered_from_dict(data: Any, index: int) -> UncoveredLayer:
    if not isinstance(data, Mapping):
        raise ValueError(f"LSUVReport.from_dict: uncovered[{index}] must be a dict; got {_describe(data)}.")
    _check_keys(data, UncoveredLayer, f"uncovered[{index}]")
    missing = [key for key in ("name", "class_name") if key not in data]
    if missing:
        raise ValueError(f"LSUVReport.from_dict: uncovered[{index}] lacks the keys {missing}: {data!r}.")
    return UncoveredLayer(**data)


def _merge_fields() -> list[dataclasses.Field[Any]]:
    """The fields of `MergeRecord` that `to_dict` holds: all but the operation object."""
    return [
        field for field in dataclasses.fields(MergeRecord) if field.name not in ("operation", "branch_layers", "within")
    ]


def _merge_from_dict(data: Any, index: int) -> MergeRecord:
    if not isinstance(data, Mapping):
        raise ValueError(f"LSUVReport.from_dict: merges[{index}] must be a dict; got {_describe(data)}.")
    _check_keys(data, MergeRecord, f"merges[{index}]")
    if "name" not in data:
        raise ValueError(f"LSUVReport.from_dict: merges[{index}] lacks the key 'name': {data!r}.")
    return MergeRecord(**data)


def _record_fields() -> list[dataclasses.Field[Any]]:
    """The fields of `LayerRecord` that `to_dict` holds: all but the layer object."""
    return [field for field in dataclasses.fields(LayerRecord) if field.name != "layer"]


def _check_keys(data: Mapping[Any, Any], cls: type, what: str) -> None:
    fields = {LayerRecord: _record_fields(), MergeRecord: _merge_fields(), UncoveredLayer: _uncovered_fields()}.get(
        cls
    ) or dataclasses.fields(cls)
    unknown = sorted(set(data) - {field.name for field in fields}, key=str)
    if unknown:
        raise ValueError(f"LSUVReport.from_dict: {what} has unknown keys {unknown}; expected those of to_dict().")


def _describe(value: Any) -> str:
    return f"{repr(value)[:40]} ({type(value).__name__})"


def _record_from_dict(data: Any, index: int) -> LayerRecord:
    if not isinstance(data, Mapping):
        raise ValueError(f"LSUVReport.from_dict: records[{index}] must be a dict; got {_describe(data)}.")
    _check_keys(data, LayerRecord, "a record")
    missing = [key for key in ("name", "class_name") if key not in data]
    if missing:
        raise ValueError(f"LSUVReport.from_dict: a record lacks the keys {missing}: {data!r}.")
    return LayerRecord(**data)
