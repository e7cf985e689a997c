"""Layers rescaled on the device (on an accelerator; float32, no bias, pre-activation): the same result as the
paper's loop on the host, read back once per pass, and errors raised for the first failing layer in processing order.

This machine may have no accelerator: `on_accelerator` is patched to say it has one, so the device path runs here on
the CPU, the same operations that run on a GPU.
"""

import math

import keras
import numpy as np
import pytest
import zoo
from keras import layers, ops

import keras_lsuv
from benchmarks.harness import counted_host_reads
from keras_lsuv.engines import single_pass
from keras_lsuv.options import LSUVOptions
from keras_lsuv.rescale import Criterion, Stop, find_scale, unit_scale, unit_scale_record
from keras_lsuv.statistics import on_accelerator
from keras_lsuv.targets import Target, find_targets

VARIANCES = [0.0, 1e-15, 1e-9, 0.5, 0.9, 0.95, 1.05, 1.2, 7.0, 1e8]
CRITERIA = [Criterion(), Criterion(target_variance=2.0, tolerance=0.01), Criterion(max_iterations=0)]


def run(model, x, **options):
    return keras_lsuv.lsuv_init(model, x, verbose=0, seed=0, **options)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("variance", VARIANCES)
def test_unit_scale_makes_the_choice_of_the_loop(variance, criterion):
    target = Target(layers.Dense(2, name="dense"))
    variance = float(np.float32(variance))  # as measured on the device
    expected = find_scale(target, lambda s: s * s * variance, criterion)
    scale, stop = (
        float(ops.convert_to_numpy(v)) for v in unit_scale(ops.convert_to_tensor(np.float32(variance)), criterion)
    )
    record = unit_scale_record(target, variance, scale, stop, criterion)
    assert record.scale == pytest.approx(expected.scale, rel=1e-6)
    assert record.final_variance == pytest.approx(expected.final_variance, rel=1e-6)
    assert (record.iterations, record.converged, record.reason) == (
        expected.iterations,
        expected.converged,
        expected.reason,
    )


@pytest.mark.parametrize(
    ("variance", "message"),
    [(math.nan, "'dense' .* produced non-finite values"), (math.inf, "'dense' .* overflowed float32")],
)
def test_non_finite_variance_is_not_rescaled_and_its_record_raises(variance, message):
    scale, stop = (
        float(ops.convert_to_numpy(v)) for v in unit_scale(ops.convert_to_tensor(np.float32(variance)), Criterion())
    )
    assert scale == 1.0 and stop == Stop.NOT_FINITE
    with pytest.raises(ValueError, match=message):
        unit_scale_record(Target(layers.Dense(2, name="dense")), variance, scale, stop, Criterion())


def test_on_accelerator_says_where_the_backend_computes():
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        expected = jax.default_backend() != "cpu"
    elif backend == "torch":
        import torch

        expected = torch.cuda.is_available()
    else:
        import tensorflow as tf

        expected = bool(tf.config.list_logical_devices("GPU"))
    assert on_accelerator(ops.ones((2, 3))) is expected


def accelerator(monkeypatch, present=True):
    monkeypatch.setattr(single_pass, "on_accelerator", lambda z: present)


@pytest.fixture
def device_path(monkeypatch):
    accelerator(monkeypatch)


@pytest.mark.parametrize("factory", [zoo.deep_mlp, zoo.residual_cnn, zoo.transformer_block, zoo.Subclassed])
def test_device_and_host_loop_give_the_same_kernels_and_records(factory, monkeypatch):
    model = factory()
    x = zoo.batch_for(model)
    model(x[:2])
    start, before = zoo.weights_of(model), zoo.kernels_by_layer(model)
    accelerator(monkeypatch, True)
    on_device = run(model, x)
    zoo.assert_report_is_true(model, x, on_device, before)  # measured on the model, every call of each layer
    after_device = zoo.weights_of(model)
    for weight, value in zip(model.weights, start, strict=True):
        weight.assign(value)
    accelerator(monkeypatch, False)
    on_host = run(model, x)
    for a, b in zip(after_device, zoo.weights_of(model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert [r.name for r in on_device.records] == [r.name for r in on_host.records]
    for a, b in zip(on_device.records, on_host.records, strict=True):
        assert (a.iterations, a.converged, a.reason) == (b.iterations, b.converged, b.reason), a.name
        assert a.initial_variance == pytest.approx(b.initial_variance, rel=1e-5), a.name
        assert a.final_variance == pytest.approx(b.final_variance, rel=1e-5), a.name


def test_a_fresh_model_is_rescaled_with_one_read_back_per_pass(device_path):
    model = keras.Sequential(
        [keras.Input((8, 8, 3))]
        + [layers.Conv2D(8, 3, padding="same", activation="relu") for _ in range(6)]
        + [layers.Flatten(), layers.Dense(16, activation="relu"), layers.Dense(4)]
    )
    x = zoo.batch_for(model)
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    targets = find_targets(model)
    with counted_host_reads() as reads:
        records = single_pass.run_single_pass(model, x, targets, LSUVOptions(), lambda _: None)
    # One read of every bias (LSUV never changes them), one of every layer's variance, scale and code, after the pass.
    assert reads == [(8 * 6 + 16 + 4,), (3 * len(targets),)]
    report = keras_lsuv.LSUVReport(records=list(records.values()))
    assert list(records) == targets and all(record.layer is t.layer for t, record in records.items())
    assert report.converged
    assert all(r.iterations <= 1 for r in report.records) and any(r.iterations == 1 for r in report.records)
    zoo.assert_report_is_true(model, x, report, before)


def test_layers_with_a_bias_read_the_device_layers_before_them_back(device_path):
    model = zoo.deep_mlp(depth=4)
    model.layers[2].bias.assign(np.full((32,), 0.5, "float32"))  # this one goes through the host loop
    x = zoo.batch_for(model)
    model(x[:2])
    before, targets = zoo.kernels_by_layer(model), find_targets(model)
    with counted_host_reads() as reads:
        records = single_pass.run_single_pass(model, x, targets, LSUVOptions(), lambda _: None)
    # Biases; then, at the biased layer, the two device layers before it and the layer's own moments; then the rest.
    assert reads == [(32 * 4 + 10,), (6,), (2, 32), (6,)]
    zoo.assert_report_is_true(model, x, keras_lsuv.LSUVReport(records=list(records.values())), before)


class Poison(layers.Layer):
    """Turns its input non-finite once armed."""

    armed = False

    def call(self, x):
        return x / 0.0 if self.armed else x


class OwnCall(layers.Dense):
    """A Dense with a `call` of its own: rescaled by re-evaluation, on the host."""

    def call(self, x):
        return super().call(x)


@pytest.mark.parametrize("after_kind", ["device", "bias", "own_call"])
def test_the_first_non_finite_layer_is_named_and_every_weight_restored(after_kind, device_path):
    inputs = keras.Input((16,))
    h = layers.Dense(16, activation="relu", name="fine")(inputs)
    poison = Poison()
    h = layers.Dense(16, activation="relu", name="first_bad")(poison(h))
    after = (OwnCall if after_kind == "own_call" else layers.Dense)(4, name="after")
    model = keras.Model(inputs, after(h))
    if after_kind == "bias":  # the host loop measures 'after' non-finite too, before the pass ends
        after.bias.assign(np.ones((4,), "float32"))
    poison.armed = True
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match="layer 'first_bad' .* non-finite"):
        run(model, zoo.batch_for(model), force=True)
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
