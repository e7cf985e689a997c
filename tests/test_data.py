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
    # batch_size is None with a batch_sampler, and with a dataset whose items are batches already; fit takes both.
    "torch DataLoader batch_sampler": lambda: torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)),
        batch_sampler=torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(len(X))), 16, False),
    ),
    "torch DataLoader of batches": lambda: torch.utils.data.DataLoader(
        [(X[i : i + 16], Y[i : i + 16]) for i in range(0, len(X), 16)], batch_size=None
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


@pytest.mark.parametrize(
    "source",
    sources(
        "tf.data (x, y)",
        "PyDataset (x, y)",
        "generator",
        "torch DataLoader",
        "torch DataLoader batch_sampler",
        "torch DataLoader of batches",
    ),
)
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


# Inputs `fit` takes beyond plain arrays. Each gives the same kernels as the equivalent NumPy array.
def pandas_frame():
    pd = pytest.importorskip("pandas")
    return pd.DataFrame(X.astype("float64"), columns=[f"f{i}" for i in range(16)])


def scipy_matrix(kind):
    sparse = pytest.importorskip("scipy.sparse")
    data = np.where(np.abs(X) > 0.5, X, 0).astype("float32")
    return getattr(sparse, f"{kind}_matrix")(data), data


def tf_sparse():
    tf = pytest.importorskip("tensorflow")
    data = np.where(np.abs(X) > 0.5, X, 0).astype("float32")
    return tf.sparse.from_dense(data), data


def bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    data = X.astype(ml_dtypes.bfloat16)
    return data, data.astype("float32")


ACCEPTED = {
    "pandas DataFrame": lambda: (pandas_frame(), X),
    "bfloat16 array": bfloat16,
    "scipy CSR": lambda: scipy_matrix("csr"),
    "scipy COO": lambda: scipy_matrix("coo"),
    "tf.SparseTensor": tf_sparse,
    "dict for a single-input Sequential": lambda: ({"features": X}, X),
}


def named_input_mlp():
    model = keras.Sequential([keras.Input((16,), name="features")])
    for _ in range(2):
        model.add(keras.layers.Dense(32, activation="tanh"))
    model.add(keras.layers.Dense(10, activation="softmax"))
    return model


@pytest.mark.parametrize("kind", ACCEPTED)
def test_accepted_inputs_give_the_kernels_of_the_equivalent_numpy_array(kind):
    source, equivalent = ACCEPTED[kind]()
    from_source, from_array = named_input_mlp(), named_input_mlp()
    from_array.set_weights(from_source.get_weights())
    a = keras_lsuv.lsuv_init(from_array, equivalent[:64], seed=1, verbose=0)
    b = keras_lsuv.lsuv_init(from_source, source, seed=1, verbose=0, num_samples=64)
    assert a.converged and b.converged
    for wa, wb in zip(zoo.weights_of(from_array), zoo.weights_of(from_source), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    measured = zoo.preactivation_variances(from_source, equivalent[:64].astype("float32"))
    assert all(abs(v - 1) < 0.1 for v in measured.values())


def test_pandas_series_is_one_feature_as_in_fit():
    pd = pytest.importorskip("pandas")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    batch = prepare_batch(model, pd.Series(X[:, 0]), num_samples=30)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(batch), X[:30, :1])
    assert keras_lsuv.lsuv_init(model, pd.Series(X[:, 0]), seed=0, verbose=0).converged


def test_iterable_of_pandas_and_sparse_batches_is_read_like_arrays():
    pd = pytest.importorskip("pandas")
    sparse = pytest.importorskip("scipy.sparse")
    source = iter([(pd.DataFrame(X[:30]), Y[:30]), (sparse.csr_matrix(X[30:60]), Y[30:60])])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(prepare_batch(zoo.deep_mlp(1), source, 50)), X[:50])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="ragged model inputs are TensorFlow-only")
def test_ragged_input_reaches_a_model_built_for_it():
    import tensorflow as tf

    class MeanOverTime(keras.layers.Layer):
        def call(self, x):
            return tf.tile(tf.expand_dims(tf.reduce_mean(x, axis=1), -1), (1, 8))

    inputs = keras.Input((None,), ragged=True)
    h = keras.layers.Dense(16, activation="relu")(MeanOverTime()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    ragged = tf.ragged.constant([list(row[: 1 + i % 5]) for i, row in enumerate(X)])
    report = keras_lsuv.lsuv_init(model, ragged, seed=0, verbose=0, num_samples=64)
    assert report.converged
    measured = zoo.preactivation_variances(model, ragged[:64])
    assert len(measured) == 2 and all(abs(v - 1) < 0.1 for v in measured.values())


def empty_batches_forever():
    while True:
        yield np.zeros((0, 16), "float32")


def ragged():
    tf = pytest.importorskip("tensorflow")
    return tf.ragged.constant([[1.0] * 16, [2.0] * 15] * 4)


def unbatched_dataset():
    pytest.importorskip("tensorflow")
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(X)


REJECTED = {
    "str": (lambda: "hello", r"x is a str \('hello'\); LSUV needs numeric"),
    "symbolic KerasTensor": (lambda: keras.Input((16,)), "symbolic KerasTensor"),
    "str inside a list": (lambda: [X, "a"], "an entry of x is a str"),
    "generator of scalars": (lambda: (float(v) for v in X[:, 0]), r"yields \['float'\], not batches"),
    "unbatched tf.data": (unbatched_dataset, "looks unbatched.*call .batch"),
    "unbatched DataLoader": (
        lambda: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(X)), batch_size=None),
        "looks unbatched.*give a torch DataLoader a batch_size",
    ),
    "ragged for a dense model": (ragged, "tf.RaggedTensor.*cannot take.*to_tensor"),
    "dict with another name": (lambda: {"other": X}, r"missing the model input\(s\) \['features'\]"),
    "empty batches forever": (empty_batches_forever, "100 empty batches in a row"),
    "string pandas frame": (lambda: pandas_frame().astype(str), "must be numeric; the DataFrame's columns"),
    "one string pandas column": (
        lambda: pandas_frame().assign(f3=["a"] * len(X)),
        r"must be numeric; the DataFrame's columns \{'f3': '(str|object)'\} are not",
    ),
}


@pytest.mark.parametrize("kind", REJECTED)
def test_rejected_inputs_name_the_problem_and_change_nothing(kind):
    source, message = REJECTED[kind]
    model = named_input_mlp()
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match=message):
        keras_lsuv.lsuv_init(model, source(), verbose=0)
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


# Pins the behaviour of Keras's private array slicing (keras.src.trainers.data_adapters.array_slicing), which
# keras_lsuv.data uses for everything but NumPy arrays and this backend's own tensors.
@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: pandas_frame().iloc[:5], X[:5]),
        (lambda: scipy_matrix("csr")[0][:5], np.where(np.abs(X[:5]) > 0.5, X[:5], 0)),
        (lambda: bfloat16()[0][:5], bfloat16()[1][:5]),
        pytest.param(lambda: tf_sparse()[0], np.where(np.abs(X[:5]) > 0.5, X[:5], 0), marks=requires_tf),
    ],
    ids=["pandas", "scipy", "bfloat16", "tf.SparseTensor"],
)
def test_keras_array_slicing_densifies_and_casts_to_floatx(make, expected):
    from keras_lsuv.data import _keras_array_to_numpy

    out = _keras_array_to_numpy(make(), 5)
    assert type(out) is np.ndarray and out.dtype == np.dtype(keras.config.floatx())
    np.testing.assert_array_equal(out, expected.astype("float32"))


@pytest.mark.parametrize(
    "x, message", [(None, "x is None"), ("hello", "x is a str"), (keras.Input((16,)), "symbolic KerasTensor")]
)
def test_callback_rejects_what_is_no_data_at_construction(x, message):
    with pytest.raises(ValueError, match=message):
        keras_lsuv.LSUVCallback(x)


def test_empty_batches_forever_stop_within_the_bound_quickly():
    import time

    from keras_lsuv.data import MAX_EMPTY_BATCHES

    read = []

    def counting():
        while True:
            read.append(1)
            yield np.zeros((0, 16), "float32")

    start = time.perf_counter()
    with pytest.raises(ValueError, match="empty batches in a row"):
        prepare_batch(named_input_mlp(), counting())
    assert len(read) == MAX_EMPTY_BATCHES
    assert time.perf_counter() - start < 5  # a bound on hanging, not a benchmark


# Models whose inputs are nested structures, fed the same structure (as `fit` and `predict` take it).
def nested_input_model(structure):
    """Three inputs of 4, 5 and 7 features in the `structure` given, then one Dense per input and a head."""
    names = ("first", "second", "b") if structure == "dict of list" else ("first", "p", "q")  # a dict's keys
    first, second, third = (keras.Input((n,), name=name) for n, name in zip((4, 5, 7), names, strict=True))
    declared = {"a": [first, second], "b": third} if structure == "dict of list" else [first, {"p": second, "q": third}]
    h = keras.layers.Concatenate()([keras.layers.Dense(8, activation="relu")(t) for t in (first, second, third)])
    return keras.Model(declared, keras.layers.Dense(3)(h))


def nested_arrays(structure, rows=slice(None), sequence=list):
    first, second, third = X[rows, :4], X[rows, 4:9], X[rows, 9:16]
    if structure == "dict of list":
        return {"a": sequence([first, second]), "b": third}
    return sequence([first, {"p": second, "q": third}])


NESTED_SOURCES = {
    "arrays": lambda structure: nested_arrays(structure),
    "generator": lambda structure: (
        (nested_arrays(structure, slice(i, i + 16)), Y[i : i + 16]) for i in range(0, 100, 16)
    ),
    # tf.data makes a list of arrays one tensor: a tuple is its sequence, which the model's call flattens as a list.
    "tf.data": lambda structure: tf_data(nested_arrays(structure, sequence=tuple), Y, batch_size=16),
    "torch DataLoader": lambda structure: torch.utils.data.DataLoader(
        [(nested_arrays(structure, i), Y[i]) for i in range(len(X))], batch_size=16
    ),
}


@pytest.mark.parametrize("structure", ["dict of list", "list with a dict"])
@pytest.mark.parametrize("source", sources(*NESTED_SOURCES))
def test_nested_input_structures_reach_the_inputs_they_name(structure, source):
    model = nested_input_model(structure)
    before = zoo.kernels_by_layer(model)
    report = keras_lsuv.lsuv_init(model, NESTED_SOURCES[source](structure), seed=0, verbose=0, num_samples=64)
    assert report.converged and len(report.records) == 4
    zoo.assert_report_is_true(model, nested_arrays(structure, slice(64)), report, before)


def test_nested_dicts_give_the_declared_entries_by_key_and_name_what_is_missing():
    model = nested_input_model("list with a dict")
    extra = [X[:, :4], {"q": X[:, 9:16], "p": X[:, 4:9], "unused": X}]
    batch = prepare_batch(model, extra, num_samples=10)
    assert list(batch[1]) == ["p", "q"]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(batch[1]["p"]), X[:10, 4:9])
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match=r"missing the model input\(s\) \['q'\] in x\[1\]; got keys \['p'\]"):
        keras_lsuv.lsuv_init(model, [X[:, :4], {"p": X[:, 4:9]}], verbose=0)
    with pytest.raises(ValueError, match=r"has 3 input\(s\) but the LSUV batch has 2 array\(s\); the model's inputs"):
        keras_lsuv.lsuv_init(model, [X[:, :4], X[:, 4:9]], verbose=0)
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def two_input_model():
    a, b = keras.Input((16,), name="a"), keras.Input((16,), name="b")
    h = keras.layers.Add()([keras.layers.Dense(8)(a), keras.layers.Dense(8)(b)])
    return keras.Model([a, b], keras.layers.Dense(2)(h))


@pytest.mark.parametrize(
    "source, message",
    [
        # Fewer samples than both are asked for: slicing first would hide the difference (fit rejects these).
        pytest.param(lambda: [X, X[:80]], r"arrays in x have different numbers of samples: \[80, 100\]", id="list"),
        pytest.param(lambda: {"a": X[:90], "b": X}, r"different numbers of samples: \[90, 100\]", id="dict"),
        pytest.param(
            lambda: iter([([X[:16], X[:12]], Y[:16])]),
            r"a batch of the list_iterator .* samples: \[12, 16\]",
            id="iterator",
        ),
    ],
)
def test_inputs_with_different_numbers_of_samples_are_rejected(source, message):
    model = two_input_model()
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match=message):
        keras_lsuv.lsuv_init(model, source(), verbose=0, num_samples=8)
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="ragged model inputs are TensorFlow-only")
@pytest.mark.parametrize("with_labels", [False, True])
def test_dataset_of_ragged_batches_gives_the_result_of_the_ragged_tensor(with_labels):
    import tensorflow as tf

    class MeanOverTime(keras.layers.Layer):
        def call(self, x):
            return tf.tile(tf.expand_dims(tf.reduce_mean(x, axis=1), -1), (1, 8))

    def model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((None,), ragged=True)
        h = keras.layers.Dense(16, activation="relu")(MeanOverTime()(inputs))
        return keras.Model(inputs, keras.layers.Dense(3)(h))

    ragged = tf.ragged.constant([list(row[: 1 + i % 5]) for i, row in enumerate(X)])
    from_tensor, from_dataset = model(), model()
    slices = (ragged, Y) if with_labels else ragged
    dataset = tf.data.Dataset.from_tensor_slices(slices).batch(16)  # each batch a tf.RaggedTensor
    a = keras_lsuv.lsuv_init(from_tensor, ragged[:40], seed=0, verbose=0)
    b = keras_lsuv.lsuv_init(from_dataset, dataset, seed=0, verbose=0, num_samples=40)
    assert a.converged and b.converged
    for wa, wb in zip(zoo.weights_of(from_tensor), zoo.weights_of(from_dataset), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


@requires_tf
def test_dataset_of_ragged_batches_for_a_dense_model_says_to_pad():
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1.0] * 16, [2.0] * 15] * 8)).batch(4)
    model = named_input_mlp()
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match="tf.RaggedTensor, which the model's input 'features' cannot take"):
        keras_lsuv.lsuv_init(model, dataset, verbose=0)
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("engine", ["single_pass", "submodel"])
@pytest.mark.parametrize("bias", ["zeros", "ones"])
def test_inputs_too_large_for_float32_statistics_say_what_overflowed(engine, bias):
    # Finite inputs (std 1e20) give finite outputs whose variance (about 1e40) overflows float32 on every backend.
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, bias_initializer=bias, name="first")])
    model.add(keras.layers.Dense(2))
    before = zoo.weights_of(model)
    with pytest.raises(
        ValueError, match=r"output variance of layer 'first' \(Dense\) overflowed float32 .* outputs are finite.*Scale"
    ):
        keras_lsuv.lsuv_init(model, X * np.float32(1e20), engine=engine, verbose=0)
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
