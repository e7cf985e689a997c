"""Section 5, the training overhead of BatchNormalization: time per warm `train_on_batch` step of a conv net after
LSUV vs the same net with BatchNormalization after every conv.
"""

from __future__ import annotations

import harness
import models
from page import table


def rows(config, repeats):
    """Warm `train_on_batch` time of the LSUV-initialized net and of the BN net."""
    import numpy as np

    x = models.inputs(config["batch"], config["image"])
    y = np.arange(config["batch"]) % 10
    row = {"model": f"Conv2D x{config['train_depth']}", "batch": config["batch"]}
    for variant in ("lsuv", "bn"):
        model = models.classifier(config["train_depth"], config["image"], batch_norm=variant == "bn")
        if variant == "lsuv":
            harness.lsuv(model, x, "single_pass")
        model.train_on_batch(x, y)  # builds the optimizer, traces the train function

        def steps(m=model):
            for _ in range(config["train_steps"]):
                m.train_on_batch(x, y)

        row[variant] = harness.first_and_median(steps, repeats)[1] / config["train_steps"]
    yield row


def render(results, config):
    body = [
        [
            r["backend"],
            r["model"],
            r["batch"],
            f"{1e3 * r['lsuv']:.0f}",
            f"{1e3 * r['bn']:.0f}",
            f"{r['bn'] / r['lsuv']:.2f}",
        ]
        for r in results["training"]
    ]
    return {"training": table(["backend", "model", "batch", "LSUV step (ms)", "BN step (ms)", "BN / LSUV"], body)}
