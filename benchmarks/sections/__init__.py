"""The sections of the benchmark page, one module each, registered in `SECTIONS` in the page's order.

Each module has `rows(config, repeats)`, which measures in a process of the backend under test and yields one dict
per row of results (`memory.py` and `first_call.py`, whose numbers need fresh processes, have `probe` instead;
`multi_call.py` has both), and `render(results, config)`, which returns the markdown of docs/benchmarks.md's
markers it fills (its table or tables, and the figures its prose quotes) from every section's rows. A module with
`targets(results)` adds its lines to the page's list of targets, checked against the rows. A section that only
applies to one backend says so in `rows`.
"""

from sections import (
    anyinit_peer,
    cost,
    first_call,
    initializer,
    memory,
    multi_call,
    peer,
    peer_resnet,
    real,
    training,
)

# Measured in this order, in one process per backend; then `memory.MODES`, each in a fresh process per backend, and
# each first call (`first_call.probe`, `multi_call.probe`) in fresh processes of its own.
SHARED = {
    "cost": cost,
    "real": real,
    "peer": peer,
    "peer_resnet": peer_resnet,
    "initializer": initializer,
    "training": training,
    "anyinit": anyinit_peer,
    "multi_call": multi_call,
}
SECTIONS = {
    "first_call": first_call,
    **{name: section for name, section in SHARED.items() if section is not multi_call},
    "memory": memory,
    "multi_call": multi_call,
}
