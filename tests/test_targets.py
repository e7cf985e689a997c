import keras
import numpy as np
import pytest
import zoo

import keras_lsuv
from keras_lsuv.targets import TARGET_CLASSES, find_targets


def built(layer, input_shape):
    layer.build(input_shape)
    return layer


def test_targets_are_found_in_nested_models_and_composite_layers_once():
    inner = keras.Sequential([keras.layers.Dense(8)], name="inner")
    inputs = keras.Input((4, 8))
    attention = keras.layers.MultiHeadAttention(2, 4, name="mha")
    h = attention(inputs, inputs)
    shared = keras.layers.Dense(8, name="shared")
    h = shared(shared(inner(h)))
    model = keras.Model(inputs, keras.layers.LayerNormalization()(h))
    names = [t.layer.name for t in find_targets(model)]
    assert sorted(names) == sorted(["query", "key", "value", "attention_output", "dense", "shared"])
    assert len(names) == len(set(names))


def test_linear_shortcut_only_for_keras_own_call():
    class Custom(keras.layers.Dense):
        def call(self, x):
            return super().call(x) ** 2

    plain, custom = built(keras.layers.Dense(2), (None, 3)), built(Custom(2), (None, 3))
    targets = find_targets(keras.Sequential([plain, custom]))
    assert [t.is_linear_in_kernel for t in targets] == [True, False]


def test_channels_first_bias_broadcasts_over_the_channel_axis():
    layer = built(keras.layers.Conv2D(3, 1, data_format="channels_first"), (None, 2, 4, 4))
    layer.bias.assign(np.array([1.0, 2.0, 3.0], "float32"))
    target = find_targets(keras.Sequential([layer]))[0]
    bias = keras.ops.convert_to_numpy(target.bias_term(keras.ops.zeros((5, 3, 4, 4))))
    assert bias.shape == (1, 3, 1, 1)


def classifier():
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Dense(32, activation="relu", name="more")(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(h))


def test_targets_leaves_the_layers_it_does_not_choose_untouched_and_unreported():
    model = classifier()
    x = zoo.batch_for(model)
    logits = model.get_layer("logits")
    kept = [np.array(keras.ops.convert_to_numpy(w)) for w in logits.weights]

    def select(layer):
        return keras_lsuv.default_targets(layer) and layer.name != "logits"

    report = zoo.initialize_and_check(model, x, targets=select)
    assert [r.name for r in report.records] == ["hidden", "more"]
    for a, b in zip(kept, logits.weights, strict=True):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))


@pytest.mark.parametrize("engine", ["single_pass", "submodel"])
def test_a_chosen_layer_lsuv_cannot_initialize_is_named_before_anything_changes(engine):
    model = classifier()
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match=r"targets selects layer 'norm' \(LayerNormalization\), which LSUV cannot"):
        zoo.run(model, zoo.batch_for(model), engine=engine, targets=lambda layer: layer.name != "hidden")
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def attention_model():
    inputs = keras.Input((4, 8))
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(inputs, inputs)
    h = keras.layers.Dense(8, activation="relu", name="hidden")(keras.layers.LayerNormalization()(h))
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h))


@pytest.mark.parametrize("engine", ["single_pass", "submodel"])
def test_targets_is_called_exactly_once_on_every_layer(engine):
    model = attention_model()
    x = zoo.batch_for(model)
    calls = []

    def select(layer):  # the attention's projections are EinsumDense: left out, so the submodel engine can run
        calls.append(layer)
        return isinstance(layer, keras.layers.Dense)

    report = zoo.run(model, x, targets=select, engine=engine)
    assert [r.name for r in report.records] == ["hidden", "logits"]
    every = zoo.target_layers(model, lambda layer: not isinstance(layer, keras.layers.InputLayer))
    assert any(layer.name == "query" for layer in every)  # the sub-layers of the attention are layers to choose
    assert sorted(id(layer) for layer in calls) == sorted(id(layer) for layer in every)  # each once


@pytest.mark.parametrize("engine", ["single_pass", "submodel"])
@pytest.mark.parametrize("result", ["hidden", np.array([True]), None, 1], ids=["str", "array", "None", "int"])
def test_targets_returning_anything_but_a_bool_is_a_type_error_before_any_weight_changes(result, engine):
    model = classifier()
    before = zoo.weights_of(model)
    with pytest.raises(TypeError, match=r"targets must return a bool for each layer, .* for layer 'hidden' \(Dense\)"):
        zoo.run(model, zoo.batch_for(model), engine=engine, targets=lambda layer: result)
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_targets_may_return_a_numpy_bool():
    model = classifier()
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, targets=lambda layer: np.bool_(layer.name == "more"))
    assert [r.name for r in report.records] == ["more"]


def test_default_targets_is_what_targets_none_chooses():
    model = classifier()
    chosen = [t.layer for t in find_targets(model, keras_lsuv.default_targets)]
    expected = [layer for layer in model.layers if isinstance(layer, TARGET_CLASSES)]
    assert chosen == [t.layer for t in find_targets(model)] == expected


def token_model(mask_zero=False):
    ids = keras.Input((12,), dtype="int32")
    h = keras.layers.Embedding(50, 16, mask_zero=mask_zero, name="tokens")(ids)
    h = keras.layers.Dense(16, activation="relu")(h)
    return keras.Model(ids, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(h)))


def token_ids(padding=0):
    ids = np.random.default_rng(0).integers(1, 50, size=(64, 12)).astype("int32")
    ids[:, 12 - padding :] = 0
    return ids


def with_embeddings(layer):
    return keras_lsuv.default_targets(layer) or isinstance(layer, keras.layers.Embedding)


def test_an_embedding_chosen_by_targets_is_scaled_to_unit_variance_and_not_redrawn():
    model = token_model()
    x = token_ids()
    model(x[:2])
    table = keras.ops.convert_to_numpy(model.get_layer("tokens").embeddings).copy()
    assert np.var(table) < 0.01  # Keras's uniform(-0.05, 0.05): three orders of magnitude below 1
    report = zoo.initialize_and_check(model, x, targets=with_embeddings)
    record = report[model.get_layer("tokens")]
    assert record.converged and record.class_name == "Embedding"
    scaled = keras.ops.convert_to_numpy(model.get_layer("tokens").embeddings)
    np.testing.assert_allclose(scaled, table * record.scale, rtol=1e-6)  # scaled, never redrawn by step 1


def test_an_embedding_is_left_alone_unless_chosen():
    model = token_model()
    x = token_ids()
    model(x[:2])
    table = keras.ops.convert_to_numpy(model.get_layer("tokens").embeddings).copy()
    report = zoo.initialize_and_check(model, x)
    assert len(report.records) == 2
    np.testing.assert_array_equal(table, keras.ops.convert_to_numpy(model.get_layer("tokens").embeddings))


@pytest.mark.parametrize("engine", ["single_pass", "submodel"])
def test_an_embedding_with_a_mask_is_measured_where_the_mask_lets_tokens_through(engine):
    model = token_model(mask_zero=True)
    x = token_ids(padding=6)  # half of every sequence is padding
    model(x[:2])
    table = model.get_layer("tokens").embeddings
    values = keras.ops.convert_to_numpy(table).copy()
    values[0] = 0.0  # a zero vector for padding
    table.assign(values)
    zoo.run(model, x, targets=with_embeddings, engine=engine, seed=None)
    vectors = keras.ops.convert_to_numpy(model.get_layer("tokens")(x))
    assert abs(np.var(vectors[x != 0]) - 1.0) < 0.1
    assert np.var(vectors) < 0.6  # over every position, padding included, the scale would be another


ReversibleEmbedding = getattr(keras.layers, "ReversibleEmbedding", None)  # Keras 3.12+; keras-hub's subclasses it
needs_reversible_embedding = pytest.mark.skipif(ReversibleEmbedding is None, reason="Keras < 3.12")


def tied_token_model(normalized):
    """ids -> ReversibleEmbedding(mask_zero=True) -> Dense -> the same embedding with `reverse=True` (logits over the
    vocabulary through its matrix), with a LayerNormalization before the logits if `normalized`."""
    ids = keras.Input((12,), dtype="int32")
    embedding = ReversibleEmbedding(20, 32, mask_zero=True, name="tokens")
    h = keras.layers.Dense(32, activation="relu")(embedding(ids))
    if normalized:
        h = keras.layers.LayerNormalization()(h)
    return keras.Model(ids, embedding(h, reverse=True))


@needs_reversible_embedding
@pytest.mark.parametrize("normalized", [True, False])
def test_a_tied_reversible_embedding_is_measured_over_its_lookup_less_padding_and_its_logits(normalized):
    model = tied_token_model(normalized)
    x = np.random.default_rng(0).integers(1, 20, size=(64, 12)).astype("int32")
    x[:, 6:] = 0  # half of every sequence is padding
    model(x[:2])
    table = model.get_layer("tokens").embeddings
    values = keras.ops.convert_to_numpy(table).copy()
    values[0] = 0.0  # a zero vector for padding: counting it would lower the lookup's variance by half
    table.assign(values)
    # The oracle leaves the padding out of the lookup's vectors and measures the logits whole, over both calls.
    report = zoo.initialize_and_check(model, x, warned=[], targets=with_embeddings)
    record = report[model.get_layer("tokens")]
    assert not record.skipped and record.final_variance is not None
    # Normalized, the logits scale with the matrix once; without, with its square (the lookup's output feeds its own
    # reverse call): the prediction of both calls follows the exponent measured between passes, and converges
    # (before, the paper's step settled by sweeps did not, and said so).
    assert record.converged


@needs_reversible_embedding
@pytest.mark.parametrize("options", [{"logit_soft_cap": 2.0}, {"tie_weights": False}], ids=["soft_cap", "untied"])
def test_a_reversible_embedding_whose_logits_do_not_scale_with_its_matrix_is_measured_again(options):
    ids = keras.Input((12,), dtype="int32")
    h = keras.layers.Dense(32)(keras.layers.Embedding(20, 32)(ids))
    logits = ReversibleEmbedding(20, 32, name="tokens", **options)(keras.layers.LayerNormalization()(h), reverse=True)
    model = keras.Model(ids, logits)  # only its reverse call: a tanh cap, or a matrix of its own
    x = np.random.default_rng(0).integers(1, 20, size=(64, 12)).astype("int32")
    zoo.initialize_and_check(model, x, warned=[], targets=with_embeddings)  # each converged record measures so
