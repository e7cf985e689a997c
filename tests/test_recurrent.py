"""Recurrent layers: the input kernel of `SimpleRNN`, `LSTM` and `GRU` is scaled so that the input projection
`x_t @ kernel` (a `ConvLSTM`'s input convolution) has unit variance over every step of every call (masked steps left
out), the recurrent kernel is drawn orthonormal per gate and left unscaled; `Bidirectional`'s two directions,
`unroll`, a layer called twice and JAX's `scan` included.

The oracle is `zoo.assert_report_is_true`: it records each recurrent layer's calls in a plain forward pass and
computes their input projections again in NumPy.
"""

import keras
import numpy as np
import pytest
import zoo
from keras import layers, ops

import keras_lsuv
from keras_lsuv.centering import RECURRENT_REASON

TOKENS, VOCABULARY = 7, 30


def text_model(bidirectional=True):
    """Embedding with padding -> LSTM -> GRU (unrolled) -> Bidirectional SimpleRNN (or one SimpleRNN backwards:
    `engine="submodel"` does not enter a `Bidirectional`) -> Dense."""
    ids = keras.Input((TOKENS,), dtype="int32")
    h = layers.Embedding(VOCABULARY, 6, mask_zero=True)(ids)
    h = layers.LSTM(8, return_sequences=True)(h)
    h = layers.GRU(5, return_sequences=True, unroll=True)(h)
    h = layers.Bidirectional(layers.SimpleRNN(4))(h) if bidirectional else layers.SimpleRNN(4, go_backwards=True)(h)
    return keras.Model(ids, layers.Dense(3)(h))


def token_batch(n=48):
    ids = np.random.default_rng(0).integers(1, VOCABULARY, size=(n, TOKENS)).astype("int32")
    ids[: n // 2, 4:] = 0  # half the sequences padded: their last steps are masked
    return ids


def recurrent_layers(model):
    return [layer for layer in model._flatten_layers(include_self=False) if keras_lsuv.targets.is_recurrent(layer)]


@pytest.mark.parametrize("engine", ["single_pass", "submodel"])
def test_input_projections_reach_unit_variance_over_every_unmasked_step(engine):
    model = text_model(bidirectional=engine == "single_pass")
    x = token_batch()
    found = recurrent_layers(model)
    assert [type(layer).__name__ for layer in found] == ["LSTM", "GRU", "SimpleRNN", "SimpleRNN"][: len(found)]
    assert len(found) == (4 if engine == "single_pass" else 3)
    report = zoo.initialize_and_check(model, x, engine=engine)
    records = {record.layer: record for record in report.records}
    projections = zoo.preactivations(model, x)
    for layer in found:
        assert records[layer].converged, records[layer]
        rows = np.concatenate(projections[layer])
        assert abs(np.var(rows) - 1.0) < 0.1
    # the masked steps are left out: 24 sequences of 4 steps and 24 of 7 for the LSTM
    assert len(np.concatenate(projections[found[0]])) == 24 * 4 + 24 * 7
    assert report.coverage == 1.0  # what is listed is the embedding table and the GRU's (2, 15) bias
    assert all(entry.kernel_parameters == 0 for entry in report.uncovered)


def test_recurrent_kernels_are_orthonormal_per_gate_and_not_scaled():
    model = text_model()
    x = token_batch()
    zoo.run(model, x)
    for layer in recurrent_layers(model):
        cell = layer.cell
        units, gates = cell.units, cell.kernel.shape[-1] // cell.units
        recurrent = ops.convert_to_numpy(cell.recurrent_kernel).astype("float64")
        kernel = ops.convert_to_numpy(cell.kernel).astype("float64")
        for gate in range(gates):
            block = recurrent[:, gate * units : (gate + 1) * units]
            np.testing.assert_allclose(block.T @ block, np.eye(units), atol=1e-5)
            block = kernel[:, gate * units : (gate + 1) * units]  # orthonormal times the one scale of the layer
            small = min(block.shape)
            gram = block.T @ block if block.shape[0] >= block.shape[1] else block @ block.T
            scale = gram[0, 0]
            np.testing.assert_allclose(gram, scale * np.eye(small), atol=1e-4 * scale)


def test_a_recurrent_layer_called_twice_is_measured_over_both_calls():
    left, right = keras.Input((5, 3)), keras.Input((5, 3))
    encoder = layers.GRU(6)
    merged = layers.Concatenate()([encoder(left), encoder(right)])
    model = keras.Model([left, right], layers.Dense(2)(merged))
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(32, 5, 3)).astype("float32"), 3 * rng.normal(size=(32, 5, 3)).astype("float32")]
    report = zoo.initialize_and_check(model, x)
    [record] = [record for record in report.records if record.layer is encoder]
    assert record.converged
    projections = zoo.preactivations(model, x)[encoder]
    assert len(projections) == 2  # both calls, pooled by the oracle
    assert abs(np.var(np.concatenate(projections)) - 1.0) < 0.1


def test_centering_leaves_a_recurrent_layer_scaled_only_with_its_reason():
    model = text_model()
    x = token_batch()
    model(x[:2])
    biases = {layer: ops.convert_to_numpy(layer.cell.bias).copy() for layer in recurrent_layers(model)}
    report = zoo.initialize_and_check(model, x, center=True)
    for layer, bias in biases.items():
        [record] = [record for record in report.records if record.layer is layer]
        assert record.converged and record.reason == RECURRENT_REASON
        np.testing.assert_array_equal(bias, ops.convert_to_numpy(layer.cell.bias))  # the gates' offsets kept


def test_conv_lstm_input_convolution_reaches_unit_variance_and_its_kernels_are_orthonormal_per_gate():
    inputs = keras.Input((4, 6, 6, 2))
    conv_lstm = layers.ConvLSTM2D(3, 3, padding="same", return_sequences=True)
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(conv_lstm(inputs))))
    x = np.random.default_rng(2).normal(size=(16, 4, 6, 6, 2)).astype("float32")
    assert keras_lsuv.targets.is_recurrent(conv_lstm)
    report = zoo.initialize_and_check(model, x)
    [record] = [record for record in report.records if record.layer is conv_lstm]
    assert record.converged and report.coverage == 1.0
    rows = np.concatenate(zoo.preactivations(model, x)[conv_lstm])
    assert abs(np.var(rows) - 1.0) < 0.1
    recurrent = ops.convert_to_numpy(conv_lstm.cell.recurrent_kernel).astype("float64").reshape(27, 12)
    for gate in range(4):  # (3·3·3, 3) per gate: orthonormal columns
        block = recurrent[:, gate * 3 : (gate + 1) * 3]
        np.testing.assert_allclose(block.T @ block, np.eye(3), atol=1e-5)


def test_targets_can_leave_recurrent_layers_out():
    lstm_model = text_model()
    report = zoo.run(lstm_model, token_batch(), targets=lambda layer: isinstance(layer, layers.Dense))
    assert [type(record.layer) for record in report.records] == [layers.Dense]
    cells = [layer.cell for layer in recurrent_layers(lstm_model)]
    listed = [entry for entry in report.uncovered if entry.layer in cells]
    assert len(listed) == 4 and all("targets= can choose it" in entry.reason for entry in listed)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_recurrent_layers_under_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        report = zoo.initialize_and_check(text_model(), token_batch())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(record.converged for record in report.records)
