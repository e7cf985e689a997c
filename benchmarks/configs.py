"""The sizes of a run: `FULL` (the page), `GPU` (`--gpu`: the issue's GPU sizes), `QUICK` (`--quick`: tiny models).

`--real-models all` adds `TARGET_BATCHES` to a config's real models.
"""

from __future__ import annotations

FULL = {
    "depths": [8, 32, 128],
    "batch": 64,
    "image": (32, 32, 8),
    "applications": {},  # name: batch size, on 32x32x3 inputs, e.g. {"MobileNetV2": 8}
    # (name, model factory arguments, batch): GPT-2 (layers, width, heads, tokens per sequence); ResNet50 (image).
    # The small batches of issue 9's table; its target batches (GPT-2 32x128 tokens, ResNet50 batch 64) take too
    # long for the run on a shared 2-core machine: `--real-models all` adds them.
    "real_models": [("GPT-2", (12, 768, 12, 128), 4), ("ResNet50", (128,), 16)],
    "peer_resnet": {"image": 64, "batch": 8, "blocks": (3, 4, 6, 3), "width": 64},
    "peer_depths": [8, 16],
    "train_depth": 16,
    "train_steps": 3,
    "memory_depth": 32,
    "initializer_shapes": [(256, 256), (1024, 1024), (4096, 4096), (3, 3, 512, 512)],
    # The first-call section's own models: label -> (`models` factory, its arguments, batch, input shape).
    "first_call": {
        "MLP 20x Dense(64) tanh, batch 256": ("mlp", (20, 64), 256, (64,)),
        "12x Conv2D(32) relu, 16x16x3, batch 128": ("conv_stack", (12, (16, 16, 3), False, 32), 128, (16, 16, 3)),
        "transformer 4 blocks, 32x64 tokens, batch 64": ("transformer", (4, 32, 64, 4, 256), 64, (32, 64)),
    },
    # Section 8, layers called several times per pass: label -> (`models` factory, its arguments, the factory of its
    # batch, that one's arguments); the seconds each mode of a model may take; the cases whose first calls are timed
    # in fresh processes (`None`: all), and how many processes per call.
    "multi_call": {
        "cases": {
            "Perceiver, 64x32 patches, latent 16x64, 2 blocks, 2 iterations, batch 16": (
                "perceiver",
                (64, 32, 16, 64, 2, 2, 2),
                "inputs",
                (16, (64, 32)),
            ),
            "ALBERT tiny (keras-hub), 4 layers x 64, 1 group, 32 tokens, batch 16": (
                "albert_tiny",
                (4, 64, 2, 1000, 32),
                "albert_inputs",
                (16, 32, 1000),
            ),
            "siamese CNN tower, 16x16x3, batch 32": (
                "siamese",
                ((16, 16, 3), (16, 32), 32),
                "pair_inputs",
                (32, (16, 16, 3)),
            ),
            "TimeDistributed CNN, 8 frames of 16x16x3, batch 16": (
                "time_distributed_cnn",
                (8, (16, 16, 3), (8, 16)),
                "inputs",
                (16, (8, 16, 16, 3)),
            ),
            "residual MLP 4 blocks x 64 called twice, batch 256": ("shared_mlp", (4, 64, 2), "inputs", (256, (64,))),
        },
        "limit": 60,
        "fresh": None,
        "processes": 1,
    },
}
TARGET_BATCHES = [("GPT-2", (12, 768, 12, 128), 32), ("ResNet50", (128,), 64)]
# scripts/gpu_bench.sh: the GPU sizes (GPT-2 medium 24 x 1024 at 8 x 512 tokens, ResNet50 224² batch 64).
GPU = {
    **FULL,
    "real_models": [("GPT-2", (24, 1024, 16, 512), 8), ("ResNet50", (224,), 64)],
    "peer_resnet": {"image": 224, "batch": 64, "blocks": (3, 4, 6, 3), "width": 64},
    "first_call_real": False,  # the first-call section on its small models only: fresh processes cost device time
}
QUICK = {
    "depths": [2, 4],
    "batch": 4,
    "image": (8, 8, 3),
    "applications": {},
    "real_models": [("GPT-2", (2, 64, 4, 16), 2)],
    "peer_resnet": {"image": 32, "batch": 2, "blocks": (1, 1, 1, 1), "width": 8},
    "peer_depths": [2, 4],
    "train_depth": 2,
    "train_steps": 1,
    "memory_depth": 4,
    "initializer_shapes": [(64, 64), (3, 3, 16, 16)],
    "first_call": {"MLP 2x Dense(8) tanh, batch 4": ("mlp", (2, 8), 4, (8,))},
    "multi_call": {
        "cases": {
            "Perceiver tiny": ("perceiver", (8, 8, 4, 8, 2, 1, 2), "inputs", (2, (8, 8))),
            "ALBERT tiny": ("albert_tiny", (2, 16, 2, 50, 8), "albert_inputs", (2, 8, 50)),
            "siamese tiny": ("siamese", ((8, 8, 3), (4,), 8), "pair_inputs", (2, (8, 8, 3))),
            "TimeDistributed tiny": ("time_distributed_cnn", (2, (8, 8, 3), (4,)), "inputs", (2, (2, 8, 8, 3))),
            "residual MLP tiny": ("shared_mlp", (2, 8, 2), "inputs", (4, (8,))),
        },
        "limit": 60,
        "fresh": ["residual MLP tiny"],  # fresh processes cost seconds of imports each: one case checks the probe
        "processes": 1,
    },
}
