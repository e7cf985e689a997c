"""A deliberate start is kept: a layer whose author initialized its kernel to zeros (a PointNet T-net starting at the
identity transform, a ReZero-style branch starting at zero) keeps its kernel and bias bit-identical by default, with
the reason in its record; `targets=` can still choose it."""

import keras
import numpy as np
import pytest
import zoo
from keras import layers

import keras_lsuv
from keras_lsuv.guard import training_evidence

POINTS, FEATURES = 32, 3


def pointnet():
    """A small PointNet: a T-net predicts a 3x3 transform of the points, starting at the identity (its last Dense has
    a zero kernel and the identity as bias, as in the keras.io example); the model, and the T-net's last Dense."""
    points = keras.Input((POINTS, FEATURES))
    h = layers.Conv1D(16, 1, activation="relu")(points)
    h = layers.GlobalMaxPooling1D()(h)
    h = layers.Dense(16, activation="relu")(h)
    identity = keras.initializers.Constant(np.eye(FEATURES).flatten())
    transform = layers.Dense(FEATURES * FEATURES, kernel_initializer="zeros", bias_initializer=identity, name="tnet")
    matrix = layers.Reshape((FEATURES, FEATURES))(transform(h))
    aligned = layers.Dot(axes=(2, 1))([points, matrix])
    h = layers.Conv1D(32, 1, activation="relu")(aligned)
    h = layers.GlobalMaxPooling1D()(h)
    return keras.Model(points, layers.Dense(4)(h)), transform


def rezero():
    """A residual block whose branch ends at a zero-initialized Dense (ReZero/SkipInit style); the model and it."""
    inputs = keras.Input((16,))
    h = layers.Dense(16, activation="relu")(inputs)
    branch = layers.Dense(16, activation="relu")(h)
    zero = layers.Dense(16, kernel_initializer=keras.initializers.Constant(0.0), name="zero_branch")
    h = layers.Add()([h, zero(branch)])
    return keras.Model(inputs, layers.Dense(4)(h)), zero


MODELS = {"pointnet": pointnet, "rezero": rezero}


def batch(model, n=64):
    return np.random.default_rng(0).normal(size=(n, *model.inputs[0].shape[1:])).astype("float32")


def values(layer):
    return [np.array(keras.ops.convert_to_numpy(w)) for w in layer.weights]


def assert_kept(layer, before):
    for a, b in zip(before, values(layer), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{layer.name} changed")


@pytest.mark.parametrize("engine", ["single_pass", "submodel"])
@pytest.mark.parametrize("name", MODELS)
def test_a_zero_kernel_is_kept_bit_identical_with_its_reason_and_the_rest_initialized(name, engine):
    model, start = MODELS[name]()
    x = batch(model)
    kept = values(start)
    report = zoo.initialize_and_check(model, x, engine=engine)  # the oracle: every other layer measures 1
    assert_kept(start, kept)
    record = report[start]
    assert record.skipped and "deliberate start" in record.reason and "targets=" in record.reason
    assert all(r.converged for r in report.records if r.layer is not start) and report.converged
    assert not keras_lsuv.default_targets(start)


def test_targets_can_still_choose_it_and_default_targets_keeps_it():
    model, tnet = pointnet()
    x = batch(model)
    before = values(tnet)
    by_default = model.get_layer(index=-1)
    kept = zoo.initialize_and_check(
        model, x, targets=lambda layer: keras_lsuv.default_targets(layer) and layer is not by_default
    )
    assert_kept(tnet, before)  # built on default_targets, it is left out (without a record) as by default
    assert all(record.layer is not tnet for record in kept.records)

    chosen = zoo.initialize_and_check(
        model, x, targets=lambda layer: keras_lsuv.default_targets(layer) or layer is tnet
    )  # the oracle measures it at 1, as any other layer
    assert chosen[tnet].converged and not chosen[tnet].skipped
    assert np.any(keras.ops.convert_to_numpy(tnet.kernel))
    assert keras_lsuv.default_targets(tnet)  # its kernel no longer holds zeros: no deliberate start any more


def test_the_callback_keeps_it_and_does_not_take_the_identity_bias_for_training():
    model, tnet = pointnet()
    x = batch(model)
    model(x[:2])
    before = values(tnet)
    assert training_evidence(model) is None  # a bias initialized to a non-scalar constant is not read as trained
    lsuv = keras_lsuv.LSUVCallback(x, seed=0, verbose=0)
    seen = []

    def check(trained_model):
        assert lsuv.report.skipped_reason is None, lsuv.report.skipped_reason
        assert lsuv.report[tnet].skipped and "deliberate start" in lsuv.report[tnet].reason
        assert_kept(tnet, before)
        variances = zoo.preactivation_variances(trained_model, x)
        assert all(abs(v - 1.0) < 0.1 for layer, v in variances.items() if layer is not tnet), variances
        seen.append(True)

    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    model.fit(
        x,
        np.zeros((len(x), 4), "float32"),
        batch_size=len(x),
        epochs=1,
        verbose=0,
        callbacks=[lsuv, zoo.CheckWhenTrainingBegins(check)],
    )
    assert seen
