"""The curvature along the kernels and the report's note on SGD: checked against the model, not the report alone."""

import warnings

import keras
import numpy as np
import pytest

import keras_lsuv
from keras_lsuv import LSUVReport
from keras_lsuv.stability import CURVATURE_NOTE, SAMPLES, kernel_curvature


def weights_of(model):
    return [keras.ops.convert_to_numpy(v.value).copy() for v in model.variables]


def assert_same_bits(before, model):
    for old, variable in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(old, keras.ops.convert_to_numpy(variable.value))


def softmax_gauss_newton(moved, logits):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return float(np.mean(np.sum(p * moved**2, -1) - np.sum(p * moved, -1) ** 2))


@pytest.mark.parametrize("units", [10, 1])
def test_kernel_curvature_of_a_linear_map_is_its_gauss_newton_form(units):
    # z = x W: along d = W / |W|, the outputs move by z / |W| exactly.
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(units, use_bias=False)])
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel).astype("float64")
    z = x[:SAMPLES].astype("float64") @ kernel  # it measures the first `SAMPLES` samples
    moved = z / np.linalg.norm(kernel)
    if units == 1:
        p = 1 / (1 + np.exp(-z))
        expected = float(np.mean(p * (1 - p) * moved**2))
    else:
        expected = softmax_gauss_newton(moved, z)
    before = weights_of(model)

    assert kernel_curvature(model, x, [model.layers[0].kernel]) == pytest.approx(expected, rel=1e-3)
    assert_same_bits(before, model)


class Noisy(keras.layers.Layer):
    """Adds large noise in inference too, as a VAE's sampling layer draws."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1)

    def call(self, x):
        return x + 100.0 * keras.random.normal(keras.ops.shape(x), seed=self.seed_generator)


def test_kernel_curvature_draws_the_same_noise_in_both_passes():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(10, use_bias=False), Noisy()])
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel).astype("float64")
    moved = x[:SAMPLES].astype("float64") @ kernel / np.linalg.norm(kernel)  # the noise cancels out of it
    before = weights_of(model)

    curvature = kernel_curvature(model, x, [model.layers[0].kernel])

    assert 0 <= curvature <= np.mean(np.max(moved**2, axis=-1))  # a softmax's form is at most the largest square
    assert_same_bits(before, model)  # the seed's state included


def test_kernel_curvature_runs_batch_normalization_on_the_batch_statistics():
    # In fit, a BatchNormalization after a kernel divides its scale out: the outputs do not move along that kernel.
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="before"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(4, name="after"),
        ]
    )
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    before = weights_of(model)

    assert kernel_curvature(model, x, [model.get_layer("before").kernel]) < 1e-6
    assert kernel_curvature(model, x, [model.get_layer("after").kernel]) > 1e-3
    assert_same_bits(before, model)  # moving statistics included


def test_only_outputs_of_shape_batch_units_are_read_as_logits():
    # A backbone's hidden states or a segmentation's masks are not a classifier's logits: not measured.
    inputs = keras.Input((6, 4))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    sequence = keras.Model(inputs, keras.layers.Dense(5)(hidden))
    x = np.random.default_rng(0).normal(size=(32, 6, 4)).astype("float32")
    kernels = [layer.kernel for layer in sequence.layers[1:]]
    assert kernel_curvature(sequence, x, kernels) is None
    report, warned = run(sequence, x, center=True)
    assert (report.curvature, report.notes, warned) == (None, [], [])

    both = keras.Model(inputs, [keras.layers.Dense(5)(hidden), keras.layers.Dense(3)(keras.layers.Flatten()(hidden))])
    alone = keras.Model(inputs, both.outputs[1])
    kernels = [both.layers[1].kernel, both.layers[-1].kernel]
    assert kernel_curvature(both, x, kernels) == pytest.approx(kernel_curvature(alone, x, kernels), rel=1e-9)


def resnet(blocks=4, width=8):
    """The study's residual CNN without normalization (docs/results.md), smaller."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    for _ in range(blocks):
        h = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        h = keras.layers.Conv2D(width, 3, padding="same")(h)
        x = keras.layers.Activation("relu")(keras.layers.Add()([x, h]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def tanh_mlp(depth=6, width=32):
    layers = [keras.layers.Dense(width, activation="tanh") for _ in range(depth)]
    return keras.Sequential([keras.Input((16,)), *layers, keras.layers.Dense(10)])


def run(model, x, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = keras_lsuv.lsuv_init(model, x, seed=0, verbose=0, **options)
    return report, [str(w.message) for w in caught if "unstable under SGD" in str(w.message)]


def test_a_centered_residual_cnn_gets_the_note():
    keras.utils.set_random_seed(0)
    model = resnet()
    x = np.random.default_rng(0).normal(size=(128, 8, 8, 1)).astype("float32")

    report, warned = run(model, x, center=True)

    scaled = [record.layer.kernel for record in report.records if not record.skipped]
    measured = kernel_curvature(model, x, scaled)  # the model as LSUV left it
    assert measured == pytest.approx(report.curvature, rel=1e-6)
    assert measured >= CURVATURE_NOTE
    assert len(report.notes) == 1 and "unstable under SGD" in report.notes[0]
    assert warned == [f"LSUV: {report.notes[0]}"]
    assert f"Note: {report.notes[0]}" in str(report)
    assert 'class="lsuv-note"' in report._repr_html_()
    rebuilt = LSUVReport.from_dict(report.to_dict())
    assert (rebuilt.notes, rebuilt.curvature) == (report.notes, report.curvature)


def test_a_centered_tanh_mlp_and_plain_lsuv_get_none():
    x = np.random.default_rng(0).normal(size=(128, 16)).astype("float32")
    keras.utils.set_random_seed(0)
    model = tanh_mlp()
    report, warned = run(model, x, center=True)
    scaled = [record.layer.kernel for record in report.records]
    assert kernel_curvature(model, x, scaled) < CURVATURE_NOTE
    assert (report.notes, warned) == ([], [])

    keras.utils.set_random_seed(0)
    plain, warned = run(resnet(), np.random.default_rng(0).normal(size=(128, 8, 8, 1)).astype("float32"))
    assert (plain.curvature, plain.notes, warned) == (None, [], [])  # measured for the options beyond the paper
