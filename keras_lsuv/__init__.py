"""LSUV initialization (Mishkin & Matas, 2016) for Keras 3."""

from keras_lsuv.orthonormal import Orthonormal
from keras_lsuv.version import __version__

__all__ = ["Orthonormal", "__version__"]
