"""Every data source `fit` takes gives the same LSUV batch, and bad sources fail clearly."""

import importlib.util

import keras
import numpy as np
import pytest
import torch
import zoo

import keras_lsuv
from keras_lsuv.data import prepare_batch

RNG = np.random.default_rng(0)
X = RNG.normal(size=(100, 16)).astype("float32")
Y = RNG.integers(0, 10, size=100)
W = np.ones(100, "float32")


class Sequence(keras.utils.PyDataset):
    def __init__(self, batch_size, with_weights=False):
        super().__init__()
        self.batch_size, self.with_weights = batch_size, with_weights

    def __len__(self):
        return -(-len(X) // self.batch_size)

    def __getitem__(self, index):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return (X[part], Y[part], W[part]) if self.with_weights else (X[part], Y[part])


def generator(batch_size):
    for start in range(0, len(X), batch_size):
        yield X[start : start + batch_size], Y[start : start + batch_size]


# tf.data needs TensorFlow, which GPU machines without it (scripts/gpu_check.sh) skip.
requires_tf = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs TensorFlow")


def tf_data(*arrays, batch_size):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(arrays[0] if len(arrays) == 1 else arrays).batch(batch_size)


SOURCES = {
    "numpy": lambda: X,
    "backend tensor": lambda: keras.ops.convert_to_tensor(X),
    "tf.data (x, y)": lambda: tf_data(X, Y, batch_size=16),
    "tf.data x only": lambda: tf_data(X, batch_size=7),
    "PyDataset (x, y)": lambda: Sequence(16),
    "PyDataset (x, y, w)": lambda: Sequence(9, with_weights=True),
    "generator": lambda: generator(16),
    "iterator": lambda: iter([(X[:30], Y[:30]), (X[30:60], Y[30:60])]),
    "torch DataLoader": lambda: torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)), batch_size=16
    ),
}


def sources(*names):
    names = names or tuple(SOURCES)
    return [pytest.param(n, marks=requires_tf) if n.startswith("tf.data") else n for n in names]


@pytest.mark.parametrize("source", sources())
def test_every_source_gives_the_same_first_samples(source):
    model = zoo.deep_mlp(depth=1)
    batch = keras.ops.convert_to_numpy(prepare_batch(model, SOURCES[source](), num_samples=40))
    np.testing.assert_array_equal(batch, X[:40])


@pytest.mark.parametrize("source", sources("tf.data (x, y)", "PyDataset (x, y)", "generator", "torch DataLoader"))
def test_same_samples_same_lsuv_result_whatever_the_container(source):
    from_arrays, from_source = zoo.deep_mlp(depth=3), zoo.deep_mlp(depth=3)
    a = keras_lsuv.lsuv_init(from_arrays, X[:48], seed=1, verbose=0)
    b = keras_lsuv.lsuv_init(from_source, SOURCES[source](), seed=1, verbose=0, num_samples=48)
    assert [r.final_variance for r in a.records] == pytest.approx([r.final_variance for r in b.records], rel=1e-5)
    for wa, wb in zip(zoo.weights_of(from_arrays), zoo.weights_of(from_source), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def test_default_num_samples_is_256_and_fewer_is_fine():
    model = zoo.deep_mlp(depth=1)
    many = np.zeros((300, 16), "float32")
    assert prepare_batch(model, many).shape[0] == 256
    assert prepare_batch(model, X).shape[0] == 100
    assert prepare_batch(model, generator(16)).shape[0] == 100  # all it has


@requires_tf
def test_dataset_of_dicts_for_a_multi_input_model():
    a, b = keras.Input((4,), name="a"), keras.Input((6,), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(8)(a), keras.layers.Dense(8)(b)])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(2)(h))
    inputs = {"a": X[:, :4], "b": X[:, 4:10]}
    dataset = tf_data(inputs, Y, batch_size=10)
    batch = prepare_batch(model, dataset, num_samples=25)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(batch["b"]), X[:25, 4:10])
    assert keras_lsuv.lsuv_init(model, dataset, verbose=0, num_samples=25).converged


@pytest.mark.parametrize(
    "source, message",
    [
        pytest.param(lambda: tf_data(X[:0], batch_size=4), "yielded no batch", marks=requires_tf),
        (lambda: iter([]), "yielded no batch"),
        (lambda: (x for x in []), "yielded no batch"),
        pytest.param(lambda: tf_data(np.array(["a", "b"] * 8), batch_size=4), "numeric", marks=requires_tf),
        (lambda: iter([X[:10], X[:10, :8]]), "do not fit together"),
        (lambda: iter([X[:10, :8]]), "does not match"),
        (lambda: [[0.5] * 16] * 4, "must be arrays or tensors"),
        (lambda: 3.0, "cannot read samples"),
    ],
)
def test_bad_sources_are_rejected_and_nothing_changes(source, message):
    model = zoo.deep_mlp(depth=2)
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match=message):
        keras_lsuv.lsuv_init(model, source(), verbose=0)
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True])
def test_bad_num_samples_is_rejected(num_samples):
    with pytest.raises(ValueError, match="num_samples"):
        keras_lsuv.lsuv_init(zoo.deep_mlp(depth=1), X, num_samples=num_samples)
