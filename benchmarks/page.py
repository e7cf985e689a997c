"""The page of results: markdown tables, and docs/benchmarks.md's generated parts filled in around its prose.

The prose of docs/benchmarks.md is written by hand; what a run measures stands between marker comments,
`<!-- name -->...<!-- /name -->`, invisible on GitHub and in the built docs. A marker on lines of its own holds a
block (a table, a list), one inside a line holds a few words (a figure the prose quotes); a run rewrites only what
stands between the markers.
"""

from __future__ import annotations

import re

MARKER = re.compile(r"<!-- (?P<name>[\w-]+) -->(?P<body>.*?)<!-- /(?P=name) -->", re.DOTALL)


def fill(template, values):
    """`template` with what stands between each pair of markers replaced by `values[name]`.

    Raises:
        ValueError: if a marker has no value, or a value no marker.
    """
    found = {match["name"] for match in MARKER.finditer(template)}
    if found != set(values):
        raise ValueError(
            f"the page's markers and the run's values differ: no value for {sorted(found - set(values))}, "
            f"no marker for {sorted(set(values) - found)}"
        )

    def replace(match):
        name, value = match["name"], str(values[match["name"]])
        body = f"\n\n{value}\n\n" if match["body"].startswith("\n") else value
        return f"<!-- {name} -->{body}<!-- /{name} -->"

    return MARKER.sub(replace, template)


def table(header, rows):
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def ratio(row, key, base="forward"):
    """`row[key] / row[base]` to two decimals, or "not run" if `row` has no `key`."""
    return f"{row[key] / row[base]:.2f}" if key in row else "not run"


def verdict(met):
    return "**met**" if met else "**missed**"
