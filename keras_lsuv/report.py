"""What an LSUV run did: one record per layer, and a readable table."""

from __future__ import annotations

import dataclasses


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
        converged: Whether `|final_variance - target_variance| < tolerance`.
        scale: The factor the kernel was multiplied by (1.0 if untouched).
        reason: Why the layer was skipped or did not converge, else `None`.
    """

    name: str
    class_name: str
    initial_variance: float | None = None
    final_variance: float | None = None
    iterations: int = 0
    converged: bool = False
    scale: float = 1.0
    reason: str | None = None

    @property
    def skipped(self) -> bool:
        """True when LSUV did not measure this layer at all."""
        return self.initial_variance is None


@dataclasses.dataclass
class LSUVReport:
    """The result of `lsuv_init`: per-layer records in processing order.

    Args:
        records: One `LayerRecord` per target layer: processed layers in the
            order the forward pass reached them, then skipped ones.
        engine: The engine that ran (`"single_pass"` or `"submodel"`).
        measure: `"preactivation"` or `"output"`.
        target_variance: The variance LSUV aimed for.
        tolerance: The accepted distance to `target_variance`.
        skipped_reason: Set when the whole run was skipped (e.g. the model has
            already been trained); then no weight was changed.

    Example:

    >>> report = keras_lsuv.lsuv_init(model, x, verbose=0)
    >>> print(report)                     # a per-layer table
    >>> report.records[0].final_variance  # close to 1.0
    """

    records: list[LayerRecord] = dataclasses.field(default_factory=list)
    engine: str = "single_pass"
    measure: str = "preactivation"
    target_variance: float = 1.0
    tolerance: float = 0.1
    skipped_reason: str | None = None

    @property
    def converged(self) -> bool:
        """True when every processed layer reached the tolerance."""
        return all(r.converged for r in self.records if not r.skipped)

    def __getitem__(self, name: str) -> LayerRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(f"No LSUV record for a layer named {name!r}.")

    def __str__(self) -> str:
        if self.skipped_reason:
            return f"LSUV skipped: {self.skipped_reason}"
        header = ("layer", "class", "initial var", "final var", "iters", "scale", "status")
        rows = [header]
        for r in self.records:
            if r.skipped:
                status, initial, final = f"skipped: {r.reason}", "-", "-"
            else:
                status = "ok" if r.converged else f"NOT CONVERGED: {r.reason}"
                initial, final = f"{r.initial_variance:.4g}", f"{r.final_variance:.4g}"
            rows.append((r.name, r.class_name, initial, final, str(r.iterations), f"{r.scale:.4g}", status))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in rows]
        processed = [r for r in self.records if not r.skipped]
        converged = sum(r.converged for r in processed)
        lines.append(
            f"LSUV ({self.engine}, {self.measure}, target {self.target_variance:g} ± {self.tolerance:g}): "
            f"{converged}/{len(processed)} layers converged, {len(self.records) - len(processed)} skipped"
        )
        return "\n".join(lines)
