"""Every option of `lsuv_init` and `LSUVCallback` is checked before anything runs; valid NumPy scalars are taken."""

import ast
import dataclasses
import pathlib
import re

import keras
import numpy as np
import pytest
import zoo

import keras_lsuv
from keras_lsuv import options
from keras_lsuv.engines import ENGINES
from keras_lsuv.options import Measure
from keras_lsuv.rescale import Criterion

X = zoo.batch_for(keras.Sequential([keras.Input((16,))]), n=32)

BAD = [
    ("seed", "a"),
    ("seed", 1.5),
    ("seed", -1),
    ("seed", True),
    ("seed", np.float64(3.0)),
    ("orthonormal", "no"),
    ("orthonormal", 1),
    ("force", "no"),
    ("force", None),
    ("target_variance", True),
    ("target_variance", 0),
    ("target_variance", float("inf")),
    ("target_variance", "1"),
    ("tolerance", -1),
    ("tolerance", np.float32("nan")),
    ("max_iterations", 1.5),
    ("max_iterations", -1),
    ("max_iterations", True),
    ("num_samples", 0),
    ("num_samples", np.float32(64)),
    ("num_samples", False),
    ("measure", "post"),
    ("measure", ["preactivation"]),
    ("engine", "fast"),
    ("verbose", 3),
    ("verbose", "yes"),
    ("scale_on_device", "yes"),
    ("scale_on_device", 1),
    ("center", "yes"),
    ("center", 1),
    ("targets", "dense"),
    ("targets", ["dense"]),
]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_option_fails_in_lsuv_init_and_nothing_changes(name, value):
    model = zoo.deep_mlp(depth=2)
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match=rf"^{name} must be .*got {re.escape(repr(value))}"):
        keras_lsuv.lsuv_init(model, X, **{"verbose": 0, name: value})
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_option_fails_at_callback_construction(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        keras_lsuv.LSUVCallback(X, **{name: value})


def test_numpy_scalars_give_the_same_run_as_python_numbers():
    python, numpy = zoo.deep_mlp(depth=2), zoo.deep_mlp(depth=2)
    keras_lsuv.lsuv_init(python, X, seed=3, tolerance=0.05, target_variance=2.0, num_samples=24, verbose=0)
    report = keras_lsuv.lsuv_init(
        numpy,
        X,
        seed=np.int64(3),
        tolerance=np.float32(0.05),
        target_variance=np.float64(2.0),
        max_iterations=np.int32(10),
        num_samples=np.int64(24),
        orthonormal=np.bool_(True),
        verbose=np.int64(0),
    )
    for a, b in zip(zoo.weights_of(python), zoo.weights_of(numpy), strict=True):
        np.testing.assert_array_equal(a, b)
    assert report.converged
    assert all(abs(v - 2.0) < 0.05 for v in zoo.preactivation_variances(numpy, X[:24]).values())


def test_seed_generator_is_a_seed_and_advances_like_keras_initializers():
    runs = []
    for _ in range(2):
        generator = keras.random.SeedGenerator(7)
        models = [zoo.deep_mlp(depth=2), zoo.deep_mlp(depth=2)]
        for model in models:
            keras_lsuv.lsuv_init(model, X, seed=generator, verbose=0)
        runs.append([zoo.weights_of(m)[0] for m in models])
    np.testing.assert_array_equal(runs[0][0], runs[1][0])  # same generator seed, same first draw
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.allclose(runs[0][0], runs[0][1])  # the generator advanced between the two runs
    callback = keras_lsuv.LSUVCallback(X, seed=keras.random.SeedGenerator(1), verbose=0)
    model = zoo.deep_mlp(depth=2)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="sparse_categorical_crossentropy")
    model.fit(X, np.zeros(len(X), "int32"), batch_size=16, verbose=0, callbacks=[callback])
    assert callback.report.converged


@pytest.mark.parametrize("gain", ["a", None, True, float("nan")])
def test_orthonormal_gain_is_checked_at_construction(gain):
    with pytest.raises(ValueError, match="gain"):
        keras_lsuv.Orthonormal(gain=gain)


def test_orthonormal_takes_a_numpy_gain():
    kernel = keras_lsuv.Orthonormal(gain=np.float32(2.0), seed=0)(shape=(8, 4))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.matmul(keras.ops.transpose(kernel), kernel)), 4 * np.eye(4), atol=1e-5
    )


def test_unreachable_target_reads_as_such():
    model = zoo.deep_mlp(depth=1)
    before = zoo.preactivation_variances(model, X)
    with pytest.warns(UserWarning, match=r"target variance 1e\+30 is out of reach from output variance"):
        report = keras_lsuv.lsuv_init(model, X, target_variance=1e30, seed=0, verbose=0)
    assert not report.converged
    measured = zoo.preactivation_variances(model, X)
    assert all(v < 1e3 for v in measured.values()) and set(measured) == set(before)  # no kernel was blown up


def test_options_are_one_frozen_dataclass_shared_by_the_function_and_the_callback():
    options = keras_lsuv.LSUVOptions(tolerance=np.float32(0.05), max_iterations=np.int64(3), measure="output")
    assert type(options.tolerance) is float and type(options.max_iterations) is int
    assert options.measure is Measure.OUTPUT and options.criterion == Criterion(1.0, float(np.float32(0.05)), 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.tolerance = 0.2
    callback = keras_lsuv.LSUVCallback(X, tolerance=np.float32(0.05), max_iterations=3, measure="output")
    assert callback.options == options
    with pytest.raises(TypeError, match="tolerence"):
        keras_lsuv.lsuv_init(zoo.deep_mlp(depth=1), X, tolerence=0.1)
    with pytest.raises(TypeError, match="tolerence"):
        keras_lsuv.LSUVCallback(X, tolerence=0.1)


def test_centering_needs_the_preactivation_measured():
    with pytest.raises(
        ValueError, match=r"center=True centers the pre-activation, so it needs measure='preactivation'"
    ):
        keras_lsuv.LSUVCallback(X, center=True, measure="output")


def test_the_options_import_no_engine():
    # The engines read their options from `keras_lsuv.options`: the options importing an engine (even lazily, in a
    # function) closed a circle.
    tree = ast.parse(pathlib.Path(options.__file__).read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert "keras_lsuv.data" in imported
    assert not [name for name in imported if name and name.startswith("keras_lsuv.engines")]
    assert tuple(ENGINES) == options.ENGINE_NAMES
