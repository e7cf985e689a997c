"""Kernel layers: layers of one's own holding kernels of their own (`add_weight`) are targets, measured on their whole
output over every call and rescaled by evaluating them again; their kernels are drawn orthonormal in step 1 (per
expert for an `(experts, in, out)` kernel). A layer whose output is not one tensor is left alone, bit for bit, and
a layer holding target sub-layers beside a kernel of its own is left to its sub-layers, its kernel listed as not
reached.

The oracle is `zoo.assert_report_is_true`: it re-evaluates each kernel layer's every call in a plain forward pass.
"""

import keras
import numpy as np
import pytest
import zoo
from keras import layers, ops

import keras_lsuv
from keras_lsuv.centering import NO_BIAS_REASON
from keras_lsuv.coverage import HOLDS_TARGETS


class MatMul(layers.Layer):
    """`x @ w`: the user layer whose chain of four decays in variance when LSUV does not reach it."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], self.units), name="w")

    def call(self, x):
        return x @ self.w


class GraphAttention(layers.Layer):
    """keras.io's graph attention, on a fully connected graph: `kernel` and `kernel_attention` of its own, the
    activation applied inside `call`."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.activation = keras.activations.elu

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.kernel_attention = self.add_weight(shape=(2 * self.units, 1), name="kernel_attention")

    def call(self, x):  # (batch, nodes, features)
        h = x @ self.kernel
        nodes = h.shape[1]
        pairs = ops.concatenate([ops.repeat(h[:, :, None], nodes, 2), ops.repeat(h[:, None], nodes, 1)], axis=-1)
        scores = ops.leaky_relu(ops.squeeze(pairs @ self.kernel_attention, -1), 0.2)
        return self.activation(ops.softmax(scores, axis=-1) @ h)


class Experts(layers.Layer):
    """keras-hub's expert bank in small: `(experts, in, out)` kernels, a gated feed-forward per expert, every
    expert on every token, its activation (the gate's) inside `call`."""

    def __init__(self, experts=3, hidden=12, **kwargs):
        super().__init__(**kwargs)
        self.experts, self.hidden = experts, hidden
        self.activation = keras.activations.silu

    def build(self, input_shape):
        dim = input_shape[-1]
        self.gate = self.add_weight(shape=(self.experts, dim, self.hidden), name="expert_gate")
        self.up = self.add_weight(shape=(self.experts, dim, self.hidden), name="expert_up")
        self.down = self.add_weight(shape=(self.experts, self.hidden, dim), name="expert_down")

    def call(self, x):  # (tokens, dim) -> (experts, tokens, dim)
        gate = self.activation(ops.einsum("th,ehm->etm", x, self.gate))
        return ops.einsum("etm,emh->eth", gate * ops.einsum("th,ehm->etm", x, self.up), self.down)


class WithRouter(layers.Layer):
    """A kernel of its own beside a `Dense` sub-layer: the sub-layer is the target, the kernel is not reached."""

    def build(self, input_shape):
        self.router = layers.Dense(4)
        self.router.build(input_shape)
        self.experts = self.add_weight(shape=(4, input_shape[-1], input_shape[-1]), name="expert_kernel")

    def call(self, x):
        weights = ops.softmax(self.router(x), axis=-1)
        return ops.einsum("be,ebo->bo", weights, ops.einsum("bi,eio->ebo", x, self.experts))


class Pair(layers.Layer):
    """A kernel layer whose output is a tuple: it cannot be measured."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], input_shape[-1]), name="w")

    def call(self, x):
        return x @ self.w, x


NODES, FEATURES = 5, 6


def graph_model(shared_chain=False):
    """Graph attention, four `x @ w` layers (the last one called twice when `shared_chain`), experts, a head."""
    inputs = keras.Input((NODES, FEATURES))
    h = GraphAttention(8)(inputs)
    chain = [MatMul(8) for _ in range(4)]
    for layer in chain:
        h = layer(h)
    if shared_chain:
        h = chain[-1](h)
    h = layers.Flatten()(h)
    h = layers.Dense(16, activation="relu")(h)
    h = ops.mean(Experts()(h), axis=0)
    return keras.Model(inputs, layers.Dense(3)(h))


def graph_batch(n=64):
    return np.random.default_rng(0).normal(size=(n, NODES, FEATURES)).astype("float32")


def kernel_layers(model):
    return [layer for layer in model._flatten_layers(include_self=False) if keras_lsuv.is_kernel_layer(layer)]


@pytest.mark.parametrize("engine", ["single_pass", "submodel"])
def test_kernel_layers_are_measured_over_every_call_and_reach_unit_variance(engine):
    model = graph_model(shared_chain=engine == "single_pass")
    x = graph_batch()
    found = kernel_layers(model)
    assert [type(layer) for layer in found] == [GraphAttention] + [MatMul] * 4 + [Experts]
    report = zoo.initialize_and_check(model, x, engine=engine)
    records = {record.layer: record for record in report.records}
    for layer in found:
        assert records[layer].converged, records[layer]
        assert records[layer].class_name == type(layer).__name__
    assert report.coverage == 1.0 and report.uncovered == []
    variances = zoo.pooled_variances(zoo.preactivations(model, x))
    for layer in found:  # the oracle measures them again here, the shared one over both its calls
        assert abs(variances[layer] - 1.0) < 0.1, (layer.name, variances[layer])


def test_step_1_draws_each_expert_orthonormal_and_every_kernel_of_a_layer():
    model = graph_model()
    x = graph_batch()
    model(x[:2])
    experts = next(layer for layer in model._flatten_layers() if isinstance(layer, Experts))
    attention = next(layer for layer in model._flatten_layers() if isinstance(layer, GraphAttention))
    before = ops.convert_to_numpy(attention.kernel_attention).copy()
    zoo.run(model, x)
    gate = ops.convert_to_numpy(experts.gate).astype("float64")  # not the scaled kernel: as step 1 drew it
    for matrix in gate:  # (in 16, out 12): orthonormal columns, one matrix per expert
        np.testing.assert_allclose(matrix.T @ matrix, np.eye(12), atol=1e-5)
    down = ops.convert_to_numpy(experts.down).astype("float64")  # the scaled kernel: orthogonal times one scale
    gram = down[0] @ down[0].T
    np.testing.assert_allclose(gram, gram[0, 0] * np.eye(12), atol=1e-5 * gram[0, 0])
    assert not np.array_equal(before, ops.convert_to_numpy(attention.kernel_attention))
    # the scaled kernel is the one held as `kernel`, else the last created
    assert keras_lsuv.targets.scaled_kernel_of(attention) is attention.kernel
    assert keras_lsuv.targets.scaled_kernel_of(experts) is experts.down


def test_an_output_that_is_not_one_tensor_is_left_alone_bit_for_bit():
    inputs = keras.Input((FEATURES,))
    pair = Pair()
    h, _ = pair(layers.Dense(FEATURES)(inputs))
    model = keras.Model(inputs, layers.Dense(2)(h))
    x = graph_batch()[:, 0]
    warned = []
    report = zoo.initialize_and_check(model, x, warned=warned)
    assert any("'pair' (its output is not one tensor (tuple)" in str(warning.message) for warning in warned)
    record = next(record for record in report.records if record.layer is pair)
    assert record.skipped and "its output is not one tensor (tuple)" in record.reason
    assert [entry.layer for entry in report.uncovered] == [pair]


def test_a_kernel_beside_target_sub_layers_is_listed_not_reached():
    inputs = keras.Input((FEATURES,))
    routed = WithRouter()
    model = keras.Model(inputs, layers.Dense(2)(routed(inputs)))
    x = graph_batch()[:, 0]
    model(x[:2])
    assert not keras_lsuv.is_kernel_layer(routed) and not keras_lsuv.default_targets(routed)
    before = ops.convert_to_numpy(routed.experts).copy()
    with pytest.warns(UserWarning, match="LSUV reached"):
        report = zoo.initialize_and_check(model, x)
    assert routed.router in [record.layer for record in report.records]
    [entry] = report.uncovered
    assert entry.layer is routed and entry.reason == HOLDS_TARGETS
    np.testing.assert_array_equal(before, ops.convert_to_numpy(routed.experts))
    with pytest.raises(ValueError, match="kernel layers"):
        zoo.run(model, x, targets=lambda layer: layer is routed)


def test_which_layers_are_kernel_layers():
    model = graph_model()
    model(graph_batch()[:2])
    lstm = layers.LSTM(4)
    lstm(np.zeros((1, 3, 2), "float32"))
    embedding = layers.Embedding(10, 4)
    embedding(np.zeros((1, 3), "int32"))

    class Token(layers.Layer):  # a class token and a positional table: no maps
        def build(self, input_shape):
            self.class_token = self.add_weight(shape=(1, 1, input_shape[-1]), name="class_token")
            self.pos_table = self.add_weight(shape=(8, input_shape[-1]), name="pos_table")

        def call(self, x):
            return x + self.class_token

    token = Token()
    token(np.zeros((1, 3, 2), "float32"))
    assert not any(keras_lsuv.is_kernel_layer(layer) for layer in (lstm.cell, embedding, token, model))
    assert not keras_lsuv.is_kernel_layer(Pair())  # not built: no kernel yet
    zeros = MatMul(3)
    zeros.build((None, 4))
    zeros.w.assign(np.zeros((4, 3)))  # a deliberate start: kept
    assert keras_lsuv.is_kernel_layer(zeros) and not keras_lsuv.default_targets(zeros)


def test_a_kernel_layer_chosen_with_targets_and_centering():
    model = graph_model()
    x = graph_batch()
    chain = [layer for layer in kernel_layers(model) if isinstance(layer, MatMul)]
    report = zoo.initialize_and_check(model, x, targets=lambda layer: layer in chain, center=True)
    assert [record.layer for record in report.records] == chain
    assert all(record.converged for record in report.records)


class WindowAttention(layers.Layer):
    """keras.io's Swin window attention in small: `Dense` projections of its own and a relative position bias table
    (`add_weight`, a table added to the scores, no map)."""

    def __init__(self, dim, heads=2, window=4, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.window = dim, heads, window
        self.qkv = layers.Dense(3 * dim)
        self.proj = layers.Dense(dim)

    def build(self, input_shape):
        self.relative_position_bias_table = self.add_weight(
            shape=((2 * self.window - 1), self.heads), name="relative_position_bias_table"
        )
        self.qkv.build(input_shape)
        self.proj.build(input_shape[:-1] + (self.dim,))

    def call(self, x):  # (batch, window, dim)
        q, k, v = ops.split(self.qkv(x), 3, axis=-1)
        scores = q @ ops.swapaxes(k, 1, 2) / np.sqrt(self.dim)
        offsets = np.arange(self.window)[:, None] - np.arange(self.window)[None] + self.window - 1
        table = ops.take(self.relative_position_bias_table, offsets.reshape(-1), axis=0)
        scores = scores + ops.reshape(ops.mean(table, axis=-1), (self.window, self.window))
        return self.proj(ops.softmax(scores, axis=-1) @ v)


def test_swin_window_attention_is_reached_through_its_dense_layers():
    inputs = keras.Input((4, FEATURES))
    attention = WindowAttention(FEATURES)
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(attention(inputs))))
    x = graph_batch()[:, :4]
    model(x[:2])
    assert not keras_lsuv.is_kernel_layer(attention)  # its table is no kernel, and its projections are targets
    report = zoo.initialize_and_check(model, x)
    assert {attention.qkv, attention.proj} <= {record.layer for record in report.records}
    assert report.coverage == 1.0 and all(record.converged for record in report.records)
    [entry] = report.uncovered  # the table is listed, not counted
    assert entry.layer is attention and entry.kernel_parameters == 0


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_kernel_layers_under_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = graph_model(shared_chain=True)
        report = zoo.initialize_and_check(model, graph_batch())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(record.converged for record in report.records)
    assert all(kernel.dtype == "float32" for layer in kernel_layers(model) for kernel in layer.weights)


def expert_variances(model, x, bank):
    """Each expert's variance over every call of `bank`, from the oracle's outputs `(experts, tokens, dim)`."""
    outputs = zoo.preactivations(model, x)[bank]
    return np.concatenate([output.reshape(output.shape[0], -1) for output in outputs], axis=1).var(axis=1)


@pytest.mark.parametrize("center", [False, True])
def test_each_expert_of_a_bank_is_scaled_on_its_own(center):
    inputs = keras.Input((FEATURES,))
    bank = Experts(experts=4)
    model = keras.Model(inputs, layers.Dense(2)(ops.mean(bank(layers.Dense(16)(inputs)), axis=0)))
    x = graph_batch()[:, 0]
    model(x[:2])
    bank.down.assign(ops.convert_to_numpy(bank.down) * np.array([1.0, 10.0, 0.1, 3.0])[:, None, None])
    report = zoo.initialize_and_check(model, x, orthonormal=False, center=center)  # the experts' spread kept
    [record] = [record for record in report.records if record.layer is bank]
    assert record.converged, record
    assert (record.reason == NO_BIAS_REASON) == center
    np.testing.assert_allclose(expert_variances(model, x, bank), 1.0, atol=0.1)


def test_a_bank_called_twice_is_scaled_whole_over_both_calls():
    inputs = keras.Input((FEATURES,))
    bank = Experts(experts=2, hidden=6)
    first = ops.mean(bank(layers.Dense(FEATURES)(inputs)), axis=0)
    model = keras.Model(inputs, layers.Dense(2)(ops.mean(bank(first), axis=0)))
    report = zoo.initialize_and_check(model, graph_batch()[:, 0])
    [record] = [record for record in report.records if record.layer is bank]
    assert record.converged and "over its 2 calls" not in (record.reason or "")
