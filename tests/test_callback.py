import keras
import numpy as np
import pytest
import zoo

import keras_lsuv


def frozen_sgd_fit(model, x, callback, epochs=1):
    """fit() with learning rate 0: the weights after training are the ones the first step started from."""
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="sparse_categorical_crossentropy")
    model.fit(x, np.zeros(len(x), "int32"), epochs=epochs, batch_size=16, verbose=0, callbacks=[callback])


@pytest.mark.parametrize("with_input", [True, False], ids=["built", "unbuilt"])
def test_lsuv_weights_are_the_ones_fit_trains_from(with_input):
    def make():
        head = [keras.Input((16,))] if with_input else []
        return keras.Sequential(
            head
            + [keras.layers.Dense(32, activation="relu") for _ in range(3)]
            + [keras.layers.Dense(3, activation="softmax")]
        )

    x = zoo.batch_for(keras.Sequential([keras.Input((16,))]))
    model, reference = make(), make()
    keras_lsuv.lsuv_init(reference, x, seed=4, verbose=0)
    callback = keras_lsuv.LSUVCallback(x, seed=4, verbose=0)
    frozen_sgd_fit(model, x, callback)
    assert callback.report is not None and callback.report.converged
    for a, b in zip(zoo.weights_of(model), zoo.weights_of(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    variances = zoo.preactivation_variances(model, x)
    assert all(abs(v - 1) < 0.1 for v in variances.values())


def test_second_fit_never_reinitializes():
    model = zoo.deep_mlp(depth=3)
    x = zoo.batch_for(model)
    callback = keras_lsuv.LSUVCallback(x, seed=0, verbose=0)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="sparse_categorical_crossentropy")
    model.fit(x, np.zeros(len(x), "int32"), epochs=1, batch_size=16, verbose=0, callbacks=[callback])
    first = callback.report
    trained = zoo.weights_of(model)
    model.optimizer.learning_rate.assign(0.0)
    with pytest.warns(UserWarning, match="already been trained"):
        model.fit(x, np.zeros(len(x), "int32"), epochs=1, batch_size=16, verbose=0, callbacks=[callback])
    assert first.converged and callback.report.skipped_reason
    for a, b in zip(trained, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_option_fails_at_construction():
    with pytest.raises(ValueError, match="measure"):
        keras_lsuv.LSUVCallback(np.zeros((4, 4)), measure="logits")


def test_report_is_none_before_training():
    assert keras_lsuv.LSUVCallback(np.zeros((4, 4))).report is None


def test_callback_reads_the_same_kinds_of_data_fit_takes():
    tf = pytest.importorskip("tensorflow")
    import torch

    x = zoo.batch_for(keras.Sequential([keras.Input((16,))]), n=48)
    reference = zoo.deep_mlp(depth=2)
    keras_lsuv.lsuv_init(reference, x, seed=2, verbose=0)
    labels = np.zeros(len(x), "int32")
    sources = [
        tf.data.Dataset.from_tensor_slices((x, labels)).batch(16),
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x)), batch_size=16),
        (pair for pair in [(x[:24], labels[:24]), (x[24:], labels[24:])]),
    ]
    for source in sources:
        model = zoo.deep_mlp(depth=2)
        frozen_sgd_fit(model, x, keras_lsuv.LSUVCallback(source, seed=2, verbose=0))
        for a, b in zip(zoo.weights_of(model), zoo.weights_of(reference), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_variables_keep_their_identity_and_the_optimizer_trains_them():
    """On torch, `assign` copies in place: the Parameters the optimizer holds are the ones LSUV set."""
    model = zoo.deep_mlp(depth=2)
    x = zoo.batch_for(model)
    tensors = [id(w.value) for w in model.weights]
    reference = zoo.deep_mlp(depth=2)
    keras_lsuv.lsuv_init(reference, x, seed=0, verbose=0)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="sparse_categorical_crossentropy")
    callback = keras_lsuv.LSUVCallback(x, seed=0, verbose=0)
    model.fit(x, np.ones(len(x), "int32"), epochs=1, batch_size=len(x), verbose=0, callbacks=[callback])
    if keras.backend.backend() == "torch":
        assert [id(w.value) for w in model.weights] == tensors
    # One step of SGD moved every weight away from the LSUV values it started from.
    moved = [not np.allclose(a, b) for a, b in zip(zoo.weights_of(model), zoo.weights_of(reference), strict=True)]
    assert all(moved)


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_callback_under_mixed_precision_sets_what_fit_trains_from(policy):
    model = zoo.small_mlp()
    x = zoo.scaled_batch(model, 300.0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    callback = keras_lsuv.LSUVCallback(x, seed=0, verbose=0)
    model.fit(x, np.zeros((len(x), 4), "float32"), epochs=1, batch_size=len(x), verbose=0, callbacks=[callback])
    assert callback.report.converged
    zoo.assert_report_is_true(model, x, callback.report, before)
