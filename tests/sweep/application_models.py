"""keras.applications models, randomly initialized (`weights=None`) at the smallest input each accepts.

Each builder returns `(model, x)`: the model with a classifier of 5 classes and a batch of normal floats for 8
images (32x32 pixels; InceptionResNetV2's stem needs 75x75).
"""

import keras
import numpy as np

SAMPLES = 8
CLASSES = 5


def _images(size):
    return np.random.default_rng(0).normal(size=(SAMPLES, size, size, 3)).astype("float32")


def _application(builder, size=32):
    model = builder(weights=None, input_shape=(size, size, 3), classes=CLASSES)
    return model, _images(size)


def resnet50():
    """Post-activation bottleneck blocks, each branch ending Conv -> BatchNormalization before its `Add`."""
    return _application(keras.applications.ResNet50)


def convnext_tiny():
    """Depthwise 7x7 conv blocks whose branches end in `LayerScale` and `StochasticDepth` before their `Add`."""
    return _application(keras.applications.ConvNeXtTiny)


def efficientnet_v2_b0():
    """Fused and unfused MBConv blocks with squeeze-and-excite, branches ending in BatchNormalization and Dropout."""
    return _application(keras.applications.EfficientNetV2B0)


def inception_resnet_v2():
    """Inception blocks added to the stream scaled by a constant (`CustomScaleLayer`: `x + scale·branch`)."""
    return _application(keras.applications.InceptionResNetV2, size=75)
