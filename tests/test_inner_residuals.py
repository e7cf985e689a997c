"""`residual="stream"` on additions inside a subclassed layer's `call`, found by tracing the call into a graph."""

import keras
import numpy as np
import pytest
import zoo

from keras_lsuv.targets import find_targets
from keras_lsuv.tracing import candidates, trace_calls

layers = keras.layers
ops = keras.ops


class TransformerBlock(layers.Layer):
    """A pre-LN block as users write it: `x = x + ...` twice, in its own `call`."""

    def __init__(self, width, heads=2, **kwargs):
        super().__init__(**kwargs)
        self.attention_norm = layers.LayerNormalization()
        self.attention = layers.MultiHeadAttention(heads, width // heads)
        self.mlp_norm = layers.LayerNormalization()
        self.up = layers.Dense(2 * width, activation="gelu")
        self.down = layers.Dense(width)

    def call(self, x):
        h = self.attention_norm(x)
        x = x + self.attention(h, h)
        return x + self.down(self.up(self.mlp_norm(x)))


class SharedDropoutBlock(TransformerBlock):
    """One `Dropout` after both branches, as keras-hub's ViT and Bloom blocks apply theirs."""

    def __init__(self, width, **kwargs):
        super().__init__(width, **kwargs)
        self.dropout = layers.Dropout(0.1)

    def call(self, x):
        h = self.attention_norm(x)
        x = x + self.dropout(self.attention(h, h))
        return x + self.dropout(self.down(self.up(self.mlp_norm(x))))


class HostBlock(TransformerBlock):
    """A block whose `call` reads a value on the host: it cannot be traced on Keras tensors."""

    def call(self, x):
        if float(ops.convert_to_numpy(ops.max(x))) > 1e9:
            return x
        return super().call(x)


class Stack(keras.Model):
    """Blocks called by a subclassed model's `call`: eagerly, never on Keras tensors."""

    def __init__(self, blocks, **kwargs):
        super().__init__(**kwargs)
        self.blocks = blocks
        self.head = layers.Dense(3)

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ScoredBlock(TransformerBlock):
    """A block that returns a tuple with a `None` in it, as attention blocks return `(x, scores)` or `(x, None)`."""

    def call(self, x):
        return super().call(x), None


class ScoredStack(keras.Model):
    """`ScoredBlock`s called by a subclassed model's `call`, each tuple's first item going on."""

    def __init__(self, depth=2, width=16, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [ScoredBlock(width) for _ in range(depth)]
        self.head = layers.Dense(3)

    def call(self, x):
        for block in self.blocks:
            x, _ = block(x)
        return self.head(x)


def stacked(block=TransformerBlock, depth=4, width=16, tokens=6, functional=True):
    """`depth` blocks on the input itself (the stream starts at the data's variance), then a head: a Functional
    model, or a subclassed one (`Stack`)."""
    if not functional:
        return Stack([block(width) for _ in range(depth)])
    inputs = keras.Input((tokens, width))
    x = inputs
    for _ in range(depth):
        x = block(width)(x)
    return keras.Model(inputs, layers.Dense(3)(x))


def stream_batch(n=64, scale=0.5):
    """Normal inputs of deviation `scale` for `stacked`: the first merge needs its branches at a positive scale."""
    return scale * np.random.default_rng(0).normal(size=(n, 6, 16)).astype("float32")


def streams(model, x, points):
    """The variance, in a plain forward pass, of each `(layer, "input" | "output")` in `points`: the input of a
    layer's call, or its output (its first item, for a tuple)."""
    found = {}

    def record(layer, args, kwargs, output):
        value = output if points[layer] == "output" else (args[0] if args else next(iter(kwargs.values())))
        value = value[0] if isinstance(value, tuple) else value  # a `(x, None)` output: its tensor
        found[layer] = float(np.var(ops.convert_to_numpy(value).astype("float64")))

    with zoo.recorded_calls(list(points), record):
        model(x, training=False)
    return found


def check_blocks(model, x, report, blocks, mlp_norm, attention_end, mlp_end, tolerance=0.1):
    """Each block's two merges found and solved as reported, each measured on the model: the stream after the first
    addition as the input of the block's MLP norm, after the second as the block's output."""
    solved = [m for m in report.merges if not m.skipped]
    assert len(solved) == 2 * len(blocks), str(report)
    points = {mlp_norm(block): "input" for block in blocks} | {block: "output" for block in blocks}
    measured = streams(model, x, points)
    for i, block in enumerate(blocks):
        first, second = solved[2 * i], solved[2 * i + 1]
        assert first.branch_layers == [attention_end(block)] and second.branch_layers == [mlp_end(block)], (
            first,
            second,
        )
        for merge, point in ((first, mlp_norm(block)), (second, block)):
            value = measured[point]
            assert merge.converged and abs(value - 1.0) < tolerance, f"{merge.name}: {merge} measures {value}"
            assert abs(merge.final_variance - value) <= 2e-2 * value, f"{merge.name}: {merge} vs {value}"
    return measured


@pytest.mark.parametrize(
    "functional, block",
    [(True, TransformerBlock), (False, TransformerBlock), (True, SharedDropoutBlock)],
    ids=["functional", "subclassed", "shared_dropout"],
)
def test_both_additions_of_each_block_are_found_and_the_stream_measures_the_target_after_each(functional, block):
    model = stacked(block, functional=functional)
    x = stream_batch()
    model(x[:2])
    report = zoo.run(model, x, residual="stream")
    blocks = [layer for layer in model._flatten_layers() if isinstance(layer, TransformerBlock)]
    measured = check_blocks(
        model, x, report, blocks, lambda b: b.mlp_norm, lambda b: b.attention._output_dense, lambda b: b.down
    )
    assert report.merges[0].scale > 0.1, report.merges[0]  # the data's 0.25 raised to 1 by the first branch
    records = {record.layer: record for record in report.records}
    for merge in report.merges:
        for layer in merge.branch_layers:
            assert records[layer].merge == merge.name, records[layer]
    assert len(measured) == 8


def test_plain_lsuv_traces_nothing_and_the_stream_grows_with_depth():
    model = stacked()
    x = stream_batch()
    model(x[:2])
    report = zoo.run(model, x)
    assert report.merges == []
    blocks = [layer for layer in model.layers if isinstance(layer, TransformerBlock)]
    measured = streams(model, x, {block: "output" for block in blocks})
    assert measured[blocks[-1]] > 4.0, measured  # each unit-variance branch adds to the stream


def test_tracing_leaves_the_model_as_it_was():
    model = stacked(depth=2)
    x = stream_batch()
    before = ops.convert_to_numpy(model(x))
    every = list(model._flatten_layers(include_self=True))
    state = [(layer, dict(vars(layer)), list(layer._inbound_nodes), list(layer._outbound_nodes)) for layer in every]
    tracing = trace_calls(model, x, candidates(model, find_targets(model, None)))
    assert len(tracing.traced) == 2 and not tracing.untraced, tracing
    for layer, attributes, inbound, outbound in state:
        assert vars(layer).keys() == attributes.keys(), layer.name
        assert all(vars(layer)[k] is v for k, v in attributes.items()), layer.name
        assert layer._inbound_nodes == inbound and layer._outbound_nodes == outbound, layer.name
    np.testing.assert_array_equal(ops.convert_to_numpy(model(x)), before)
    for call in tracing.traced:  # each graph holds both additions of its block
        assert len([op for op in call.function.operations if type(op).__name__ == "Add"]) == 2


def test_after_the_run_no_instance_attribute_is_left_on_any_layer():
    model = stacked(depth=2)
    x = stream_batch()
    model(x[:2])
    every = list(model._flatten_layers(include_self=True))
    attributes = {id(layer): set(vars(layer)) for layer in every}
    zoo.run(model, x, residual="stream")
    assert all(set(vars(layer)) == attributes[id(layer)] for layer in every)


def test_a_block_that_cannot_be_traced_has_a_record_saying_why():
    model = stacked(HostBlock, depth=2, functional=False)
    x = stream_batch()
    model(x[:2])
    with pytest.warns(UserWarning, match="solved no merge"):
        report = zoo.run(model, x, residual="stream")
    assert [m.class_name for m in report.merges] == ["HostBlock", "HostBlock"]
    for merge in report.merges:
        assert merge.skipped and "cannot be traced on Keras tensors" in merge.reason, merge


def test_a_block_called_twice_is_not_traced():
    inputs = keras.Input((6, 16))
    block = TransformerBlock(16)
    model = keras.Model(inputs, layers.Dense(3)(block(block(inputs))))
    x = stream_batch()
    model(x[:2])
    with pytest.warns(UserWarning, match="solved no merge"):
        report = zoo.run(model, x, residual="stream")
    (merge,) = report.merges
    assert merge.skipped and "called 2 times per forward pass" in merge.reason, merge


def test_keras_hub_gpt2_has_both_residuals_of_every_block_solved_as_measured():
    keras_hub = pytest.importorskip("keras_hub")
    model = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16
    )
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, 64, (16, 8)).astype("int32"), "padding_mask": np.ones((16, 8), "int32")}
    model(x)
    report = zoo.run(model, x, residual="stream")
    blocks = [layer for layer in model.layers if isinstance(layer, keras_hub.layers.TransformerDecoder)]
    assert len(blocks) == 2
    check_blocks(
        model,
        x,
        report,
        blocks,
        lambda b: b._feedforward_layer_norm,
        lambda b: b._self_attention_layer._output_dense,
        lambda b: b._feedforward_output_dense,
    )


def test_a_block_returning_a_tuple_with_none_is_traced_and_solved():
    model = ScoredStack()
    x = stream_batch()
    model(x[:2])
    report = zoo.run(model, x, residual="stream")
    check_blocks(
        model, x, report, model.blocks, lambda b: b.mlp_norm, lambda b: b.attention._output_dense, lambda b: b.down
    )
