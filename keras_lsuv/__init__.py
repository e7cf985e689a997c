"""LSUV initialization (Mishkin & Matas, 2016) for Keras 3."""

from keras_lsuv.callback import LSUVCallback
from keras_lsuv.lsuv import lsuv_init
from keras_lsuv.options import LSUVOptions
from keras_lsuv.orthonormal import Orthonormal
from keras_lsuv.report import LayerRecord, LSUVReport, MergeRecord, UncoveredLayer
from keras_lsuv.residual import scales_with_input
from keras_lsuv.targets import default_targets, is_kernel_layer
from keras_lsuv.version import __version__

__all__ = [
    "LSUVCallback",
    "LSUVOptions",
    "LSUVReport",
    "LayerRecord",
    "MergeRecord",
    "Orthonormal",
    "UncoveredLayer",
    "default_targets",
    "is_kernel_layer",
    "scales_with_input",
    "lsuv_init",
    "__version__",
]
