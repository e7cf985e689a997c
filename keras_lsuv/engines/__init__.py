"""LSUV engines: how the forward pass reaches each layer's output.

Each engine is a function `(model, batch, targets, measure, criterion, on_record) -> dict[Target, LayerRecord]`
that rescales the kernels of `targets` in place and gives each target's record, keyed by the target itself (never by
the layer's name, which Keras does not keep unique).
"""

from keras_lsuv.engines.single_pass import run_single_pass
from keras_lsuv.engines.submodel import run_submodel

ENGINES = {"single_pass": run_single_pass, "submodel": run_submodel}
