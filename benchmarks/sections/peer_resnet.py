"""Section 3, the PyTorch peer on a ResNet50: the `lsuv` package on a torch ResNet50 and ours on Keras's.

Same images and batch, one call each after a first forward pass (the peer's single call re-runs the whole model for
every layer and rescale). Torch only; skipped like `peer.py` without the `lsuv` package.
"""

from __future__ import annotations

import functools
import time

import harness
import models
from page import ratio, table, verdict

from sections.peer import skipped, torch_with_peer


@torch_with_peer
def rows(config, repeats, peer):
    """The peer's time and ours, each with the forward pass of its own model."""
    import keras
    import torch

    setup = config["peer_resnet"]
    image, batch = setup["image"], setup["batch"]
    full = setup["blocks"] == (3, 4, 6, 3)
    model = models.torch_resnet50(setup["blocks"], setup["width"]).eval()
    x = torch.from_numpy(models.inputs(batch, (3, image, image)))

    def run_forward():
        with torch.no_grad():
            model(x)

    row = {"model": f"ResNet50 {image}x{image}" if full else "small ResNet", "batch": batch}
    row["forward_first"], row["forward"], _ = harness.first_and_median(run_forward, 1)
    start = time.perf_counter()
    peer.lsuv_with_singlebatch(model, x, verbose=False)  # one call: it re-runs the model for every layer
    row["peer"] = time.perf_counter() - start
    if full:
        keras.backend.clear_session()
        ours, x = models.resnet50(image), models.inputs(batch, (image, image, 3))
        _, row["ours_forward"], _ = harness.first_and_median(functools.partial(harness.forward, ours, x), 1)
        _, row["ours"], _ = harness.first_and_median(functools.partial(harness.lsuv, ours, x, "single_pass"), 1)
    yield row


def render(results, config):
    if skipped(results["peer_resnet"]):
        return {"peer-resnet": skipped(results["peer_resnet"])}
    header = ["model", "batch", "torch forward (s)", "`lsuv` peer (s)", "peer / its fwd"]
    header += ["Keras forward (s)", "ours (s)", "ours / Keras fwd", "ours / peer"]
    body = []
    for r in results["peer_resnet"]:
        mine = [f"{r['ours_forward']:.2f}", f"{r['ours']:.2f}", ratio(r, "ours", "ours_forward")] if "ours" in r else []
        mine = mine + [ratio(r, "ours", "peer")] if mine else ["not run"] * 4
        body.append([r["model"], r["batch"], f"{r['forward']:.2f}", f"{r['peer']:.2f}", ratio(r, "peer"), *mine])
    return {"peer-resnet": table(header, body)}


def targets(results):
    """Our full LSUV faster than the peer's on the full ResNet50."""
    return [
        f"- torch, {r['model']} batch {r['batch']}: our full LSUV faster than the `lsuv` peer: "
        f"{verdict(r['ours'] < r['peer'])} ({r['ours']:.1f} s vs {r['peer']:.1f} s)"
        for r in results["peer_resnet"]
        if "ours" in r
    ]
