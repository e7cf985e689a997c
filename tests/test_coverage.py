"""What LSUV did not reach: every trainable weight of rank 2 or more that no record covers is listed by layer in the
report (`uncovered`, `coverage`), its table, HTML and dict, in one warning, and `assert_converged(min_coverage=)`.

The oracle here is the model: counts are computed from the layers' own `trainable_weights`, and every weight the
report lists must be bit-identical after LSUV while every other kernel-like weight was redrawn.
"""

import json
import math
import re
import warnings

import keras
import numpy as np
import pytest
import zoo
from keras import layers
from test_deliberate_start import pointnet

import keras_lsuv
from keras_lsuv import LSUVReport


class Experts(keras.layers.Layer):
    """Mixture-of-experts style: one `(experts, in, out)` kernel of its own (`add_weight`), used in an einsum, that
    returns its experts' outputs with their mean, a tuple: a kernel layer LSUV cannot measure."""

    def __init__(self, units, experts=2, **kwargs):
        super().__init__(**kwargs)
        self.units, self.experts = units, experts

    def build(self, input_shape):
        self.expert_kernel = self.add_weight(shape=(self.experts, input_shape[-1], self.units), name="expert_kernel")

    def call(self, x):
        outputs = keras.ops.einsum("bti,eio->ebto", x, self.expert_kernel)
        return keras.ops.mean(outputs, axis=0), outputs


TOKENS, VOCABULARY = 6, 40


def text_model():
    """Embedding -> experts -> Dense head: two layers LSUV does not reach (a table, and a kernel layer whose output is
    a tuple), one it does."""
    ids = keras.Input((TOKENS,), dtype="int32")
    embedding = layers.Embedding(VOCABULARY, 8)
    experts = Experts(10)
    h, _ = experts(embedding(ids))
    head = layers.Dense(3)
    model = keras.Model(ids, head(layers.GlobalAveragePooling1D()(h)))
    return model, {"embedding": embedding, "experts": experts, "head": head}


def token_batch(n=64):
    return np.random.default_rng(0).integers(0, VOCABULARY, size=(n, TOKENS)).astype("int32")


def kernel_like(layer):
    """The layer's trainable weights of rank 2 or more, from Keras itself."""
    return [w for w in layer.trainable_weights if len(w.shape) >= 2]


def size(weights):
    return sum(math.prod(w.shape) for w in weights)


def weight_values(model):
    return {id(w): np.array(keras.ops.convert_to_numpy(w)) for w in model.trainable_weights}


def assert_uncovered_is_true(model, report, before):
    """Every weight the report lists is bit-identical to `before`; every other trainable kernel of rank >= 2 changed."""
    listed = {path for entry in report.uncovered for path in entry.weights}
    for weight in model.trainable_weights:
        if len(weight.shape) < 2 or weight.name == "bias":  # a bias LSUV reached keeps its values unless centered
            continue
        same = np.array_equal(before[id(weight)], keras.ops.convert_to_numpy(weight))
        assert same == (weight.path in listed), f"{weight.path}: unchanged={same}, listed={weight.path in listed}"


@pytest.fixture(scope="module", params=["single_pass", "submodel"])
def text_run(request):
    model, parts = text_model()
    x = token_batch()
    model(x[:2])
    before = weight_values(model)
    with pytest.warns(UserWarning, match="LSUV reached") as caught:
        report = zoo.run(model, x, engine=request.param)
    return model, parts, x, before, report, caught


def test_weights_lsuv_does_not_reach_are_listed_by_layer_with_their_parameters(text_run):
    model, parts, x, before, report, _ = text_run
    zoo.assert_report_is_true(model, x, report, zoo.kernels_by_layer(model))
    assert_uncovered_is_true(model, report, before)
    owners = {"embedding": parts["embedding"], "experts": parts["experts"]}
    assert [entry.layer for entry in report.uncovered] == list(owners.values())  # the model's order
    total = size(model.weights)
    for name, layer in owners.items():
        entry = next(e for e in report.uncovered if e.layer is layer)
        expected = kernel_like(parts[name])  # the RNN's weights are its cell's
        assert entry.name == layer.name and entry.class_name == type(layer).__name__
        assert entry.weights == {w.path: list(w.shape) for w in expected}
        assert entry.parameters == size(expected)
        assert entry.kernel_parameters == (0 if name == "embedding" else size(expected))
        assert entry.share == pytest.approx(size(expected) / total)
    kernels = size([w for w in model.trainable_weights if len(w.shape) >= 2]) - size(kernel_like(parts["embedding"]))
    assert report.coverage == pytest.approx(size(kernel_like(parts["head"])) / kernels)
    assert 0 < report.coverage < 0.2


def test_one_warning_names_the_kernel_like_weights_not_the_embedding_table(text_run):
    _, parts, _, _, report, caught = text_run
    messages = [str(w.message) for w in caught if "kernel-like" in str(w.message)]
    assert len(messages) == 1
    message = messages[0]
    assert f"LSUV reached {report.coverage:.2%}" in message
    for weight in kernel_like(parts["experts"]):
        assert weight.path in message
    assert "embedding" not in message


def test_assert_converged_with_min_coverage_fails_with_the_list(text_run):
    _, parts, _, _, report, _ = text_run
    assert report.assert_converged() is report  # every measured layer converged
    assert report.assert_converged(min_coverage=report.coverage) is report
    listed = rf"below min_coverage=1; not reached:\n  '{re.escape(parts['experts'].name)}' \(Experts\)"
    with pytest.raises(AssertionError, match=listed) as e:
        report.assert_converged(min_coverage=1.0)
    assert parts["experts"].expert_kernel.path in str(e.value) and "embeddings" not in str(e.value)
    for bad in (1.5, -0.1, True, "all"):
        with pytest.raises(ValueError, match="min_coverage"):
            report.assert_converged(min_coverage=bad)
    without = LSUVReport.from_dict({**report.to_dict(), "coverage": None})
    with pytest.raises(AssertionError, match="no coverage figure"):
        without.assert_converged(min_coverage=0.5)


def test_the_list_round_trips_through_json_and_shows_in_the_table_and_html(text_run):
    _, parts, _, _, report, _ = text_run
    data = json.loads(json.dumps(report.to_dict()))
    assert [entry["name"] for entry in data["uncovered"]] == [e.name for e in report.uncovered]
    assert all("layer" not in entry for entry in data["uncovered"])
    assert data["coverage"] == report.coverage
    rebuilt = LSUVReport.from_dict(data)
    assert rebuilt == report and rebuilt.uncovered and all(entry.layer is None for entry in rebuilt.uncovered)
    with pytest.raises(ValueError, match=r"uncovered\[0\] has unknown keys \['size'\]"):
        LSUVReport.from_dict({"uncovered": [{"name": "a", "class_name": "B", "size": 1}]})
    text, page = str(report), report._repr_html_()
    assert "not reached" in text and f"kernel-like params reached {report.coverage:.1%}" in text.splitlines()[-1]
    assert parts["experts"].expert_kernel.path in text
    assert '<table class="lsuv-uncovered">' in page and parts["experts"].expert_kernel.path in page


def test_a_dense_model_is_fully_covered_without_a_warning_and_a_skipped_run_has_no_figure():
    model = zoo.small_mlp()
    x = zoo.batch_for(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = zoo.run(model, x)
    assert report.coverage == 1.0 and report.uncovered == []
    assert report.assert_converged(min_coverage=1.0) is report
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros((len(x), 4)), batch_size=len(x), epochs=1, verbose=0)
    with pytest.warns(UserWarning, match="already been trained"):
        skipped = zoo.run(model, x)
    assert skipped.skipped_reason and skipped.coverage is None and skipped.uncovered == []


def test_a_deliberate_start_counts_as_reached_and_a_layer_targets_left_out_is_listed_without_a_warning():
    model, tnet = pointnet()
    x = np.random.default_rng(0).normal(size=(64, *model.inputs[0].shape[1:])).astype("float32")
    model(x[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = zoo.run(model, x)
    assert report[tnet].skipped and report.coverage == 1.0 and report.uncovered == []
    head = model.layers[-1]
    before = weight_values(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the caller left the head out: listed, not warned about
        chosen = zoo.run(model, x, targets=lambda layer: keras_lsuv.default_targets(layer) and layer is not head)
    [entry] = chosen.uncovered
    assert entry.layer is head and "targets= can choose it" in entry.reason and entry.parameters == size([head.kernel])
    kernels = [w for w in model.trainable_weights if len(w.shape) >= 2]
    assert chosen.coverage == pytest.approx(1 - size([head.kernel]) / size(kernels))
    np.testing.assert_array_equal(before[id(head.kernel)], keras.ops.convert_to_numpy(head.kernel))


def test_a_target_the_pass_does_not_reach_is_listed_and_warned_about():
    class TwoHeads(keras.Model):
        def __init__(self):
            super().__init__()
            self.body, self.dropout_only, self.head = layers.Dense(16), layers.Dense(16), layers.Dense(4)

        def call(self, x, training=False):
            h = self.body(x)
            return self.head(self.dropout_only(h) if training else h)

    model = TwoHeads()
    x = zoo.batch_for(model)
    model(x[:2], training=True)
    before = weight_values(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = zoo.run(model, x)
    assert any("not measured" in str(w.message) for w in caught)
    [entry] = report.uncovered
    assert entry.layer is model.dropout_only and "not reached" in entry.reason
    assert entry.kernel_parameters == size(kernel_like(model.dropout_only))
    assert any(model.dropout_only.kernel.path in str(w.message) for w in caught)
    assert_uncovered_is_true(model, report, before)
