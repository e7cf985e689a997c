"""Section 3, the PyTorch peer: the `lsuv` package by the paper's first author on the Conv2d/ReLU stack of section 1.

Torch only (the torch process). Install it with `.venv/bin/pip install -c requirements/constraints.txt lsuv`;
without it the section (and `peer_resnet.py`) is skipped with a message.
"""

from __future__ import annotations

import functools

import harness
import models
from page import ratio, table


def torch_with_peer(measure):
    """`measure(config, repeats, peer)` as a section's `rows`: in the torch process only, given the `lsuv` package.

    Without the package, the one row says how to install it.
    """

    @functools.wraps(measure)
    def rows(config, repeats):
        import keras

        if keras.backend.backend() != "torch":
            return
        try:
            import lsuv as peer
        except ImportError:
            yield {"missing": "pip install -c requirements/constraints.txt lsuv"}
            return
        yield from measure(config, repeats, peer)

    return rows


def skipped(rows):
    """The line that stands for the table when the `lsuv` package is not installed; None when it is."""
    for row in rows:
        if "missing" in row:
            return f"Skipped: the `lsuv` package is not installed (`{row['missing']}`)."
    return None


@torch_with_peer
def rows(config, repeats, peer):
    """The `lsuv` package on an equivalent torch Conv2d/ReLU stack, NCHW, under no_grad for forward."""
    import torch

    height, width, channels = config["image"]
    x = torch.from_numpy(models.inputs(config["batch"], (channels, height, width)))
    for depth in config["peer_depths"]:
        model = models.torch_conv_stack(depth, channels).eval()

        def run_forward(m=model):
            with torch.no_grad():
                m(x)

        row = {"model": f"Conv2d x{depth}", "batch": config["batch"]}
        row["forward_first"], row["forward"], _ = harness.first_and_median(run_forward, repeats)
        row["peer_first"], row["peer"], _ = harness.first_and_median(
            lambda m=model: peer.lsuv_with_singlebatch(m, x, verbose=False), repeats
        )
        yield row


def render(results, config):
    """The peer's ratios beside ours, from the torch rows of section 1."""
    if skipped(results["peer"]):
        return {"peer": skipped(results["peer"])}
    ours = {r["model"]: r for r in results["cost"] if r["backend"] == "torch"}
    header = ["model", "forward (ms)", "lsuv (peer) / fwd", "peer 1st / fwd"]
    header += ["ours single_pass / fwd", "ours submodel / fwd"]
    body = []
    for r in results["peer"]:
        mine = ours.get(r["model"].replace("Conv2d", "Conv2D"), {})
        mine_ratios = [ratio(mine, k) if mine else "not run" for k in ("single_pass", "submodel")]
        body.append([r["model"], f"{1e3 * r['forward']:.1f}", ratio(r, "peer"), ratio(r, "peer_first"), *mine_ratios])
    return {"peer": table(header, body)}
