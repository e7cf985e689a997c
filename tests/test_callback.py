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
