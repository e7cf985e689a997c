import math

import keras
import numpy as np
import pytest
import zoo
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_lsuv
from keras_lsuv import orthonormal
from keras_lsuv.orthonormal import (
    host_orthonormal_matrices,
    orthonormal_matrices,
    redraw_orthonormal,
)
from keras_lsuv.targets import find_targets


def as_matrix(kernel):
    values = keras.ops.convert_to_numpy(keras.ops.cast(kernel, "float32"))
    return values.reshape(-1, values.shape[-1])


# `haar_orthonormal`, compiled once per shape on JAX (eager JAX compiles each of its operations per shape).
compiled = orthonormal._compiled_haar_orthonormal


def assert_orthonormal(matrix, gain=1.0, atol=1e-5):
    rows, cols = matrix.shape
    gram = matrix.T @ matrix if rows >= cols else matrix @ matrix.T
    np.testing.assert_allclose(gram, gain**2 * np.eye(min(rows, cols)), atol=atol)


@pytest.mark.parametrize(
    "shape",
    [
        (64, 16),  # tall: orthonormal columns
        (16, 64),  # wide: orthonormal rows
        (32, 32),  # square
        (5, 12, 24),  # Conv1D
        (3, 3, 8, 16),  # Conv2D, tall
        (3, 3, 4, 64),  # Conv2D, wide
        (2, 2, 2, 4, 8),  # Conv3D
    ],
)
def test_kernel_is_orthonormal(shape):
    kernel = keras_lsuv.Orthonormal(seed=1)(shape)
    assert tuple(kernel.shape) == shape
    assert_orthonormal(as_matrix(kernel))


def test_gain_scales_the_kernel():
    kernel = keras_lsuv.Orthonormal(gain=2.5, seed=3)((40, 10))
    assert_orthonormal(as_matrix(kernel), gain=2.5, atol=1e-4)


def test_not_the_identity_or_a_permutation():
    matrix = as_matrix(keras_lsuv.Orthonormal(seed=0)((32, 32)))
    assert np.count_nonzero(np.abs(matrix) > 1e-3) > 32 * 16


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_honoured_and_low_precision_stays_orthonormal(dtype):
    kernel = keras_lsuv.Orthonormal(seed=2)((48, 24), dtype=dtype)
    assert keras.backend.standardize_dtype(kernel.dtype) == dtype
    assert_orthonormal(as_matrix(kernel), atol=2e-2)


def test_default_dtype_is_floatx():
    kernel = keras_lsuv.Orthonormal(seed=2)((8, 8))
    assert keras.backend.standardize_dtype(kernel.dtype) == keras.config.floatx()


def test_integer_seed_is_reproducible_across_instances():
    a = keras_lsuv.Orthonormal(seed=7)((20, 10))
    b = keras_lsuv.Orthonormal(seed=7)((20, 10))
    c = keras_lsuv.Orthonormal(seed=8)((20, 10))
    np.testing.assert_array_equal(as_matrix(a), as_matrix(b))
    assert not np.allclose(as_matrix(a), as_matrix(c))


def test_unseeded_instances_differ_but_each_repeats_itself():
    # Keras's convention: an unseeded initializer picks a seed once, at construction.
    first, second = keras_lsuv.Orthonormal(), keras_lsuv.Orthonormal()
    assert not np.allclose(as_matrix(first((16, 16))), as_matrix(second((16, 16))))
    np.testing.assert_array_equal(as_matrix(first((16, 16))), as_matrix(first((16, 16))))


def test_seed_generator_advances():
    initializer = keras_lsuv.Orthonormal(seed=keras.random.SeedGenerator(5))
    a, b = initializer((16, 16)), initializer((16, 16))
    assert not np.allclose(as_matrix(a), as_matrix(b))
    assert_orthonormal(as_matrix(b))


@pytest.mark.parametrize("shape", [(), (7,)])
def test_rank_below_two_is_rejected(shape):
    with pytest.raises(ValueError, match="rank 2 or more"):
        keras_lsuv.Orthonormal()(shape)


@pytest.mark.parametrize("seed", ["1", 1.5, [1]])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        keras_lsuv.Orthonormal(seed=seed)


def test_config_round_trip_gives_the_same_values():
    initializer = keras_lsuv.Orthonormal(gain=0.5, seed=11)
    config = initializer.get_config()
    assert config == {"gain": 0.5, "seed": 11}
    clone = keras_lsuv.Orthonormal.from_config(config)
    np.testing.assert_array_equal(as_matrix(initializer((9, 6))), as_matrix(clone((9, 6))))


def test_serialize_deserialize_through_keras():
    config = keras.initializers.serialize(keras_lsuv.Orthonormal(gain=2.0, seed=4))
    restored = keras.initializers.deserialize(config)
    assert isinstance(restored, keras_lsuv.Orthonormal)
    assert restored.gain == 2.0 and restored.seed == 4


def test_string_alias_builds_a_layer_with_orthonormal_kernel():
    assert isinstance(keras.initializers.get("orthonormal"), keras_lsuv.Orthonormal)
    layer = keras.layers.Conv2D(16, 3, kernel_initializer="orthonormal")
    layer.build((None, 8, 8, 4))
    assert_orthonormal(as_matrix(layer.kernel))


@pytest.mark.parametrize(
    "identifier",
    ["orthonormal", "Orthonormal", {"class_name": "Orthonormal", "config": {"gain": 2.0, "seed": 3}}],
    ids=["snake_case", "class_name", "config"],
)
def test_keras_initializers_get_takes_each_spelling_keras_takes_for_its_own(identifier):
    for keras_own in ("orthogonal", "Orthogonal", {"class_name": "Orthogonal", "config": {"gain": 2.0, "seed": 3}}):
        assert isinstance(keras.initializers.get(keras_own), keras.initializers.Orthogonal)
    initializer = keras.initializers.get(identifier)
    assert isinstance(initializer, keras_lsuv.Orthonormal)
    gain = identifier["config"]["gain"] if isinstance(identifier, dict) else 1.0
    assert_orthonormal(as_matrix(initializer((9, 6))), gain=gain)


@pytest.mark.parametrize("spelling", ["orthonormal", "Orthonormal"])
def test_model_round_trips_through_keras_file(tmp_path, spelling):
    inputs = keras.Input((12,))
    outputs = keras.layers.Dense(6, kernel_initializer=spelling)(inputs)
    hidden = keras.layers.Dense(4, kernel_initializer=keras_lsuv.Orthonormal(gain=3.0, seed=1))(outputs)
    model = keras.Model(inputs, hidden)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for original, restored in zip(model.layers[1:], loaded.layers[1:], strict=True):
        assert isinstance(restored.kernel_initializer, keras_lsuv.Orthonormal)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(original.kernel), keras.ops.convert_to_numpy(restored.kernel)
        )
    assert loaded.layers[2].kernel_initializer.gain == 3.0


def test_loading_a_model_that_uses_orthonormal_without_keras_lsuv_registered_fails_as_the_guide_says(
    tmp_path, monkeypatch
):
    inputs = keras.Input((12,))
    model = keras.Model(inputs, keras.layers.Dense(6, kernel_initializer="orthonormal")(inputs))
    model.save(tmp_path / "m.keras")
    for name in ("keras_lsuv>Orthonormal", "orthonormal", "Orthonormal"):  # as before `import keras_lsuv`
        monkeypatch.delitem(keras.saving.get_custom_objects(), name, raising=False)
    with pytest.raises(TypeError, match="Could not interpret initializer identifier: .*'class_name': 'Orthonormal'"):
        keras.models.load_model(tmp_path / "m.keras")


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=3),
    st.integers(1, 40),
    st.floats(0.1, 4.0),
    st.integers(0, 2**20),
)
def test_property_any_shape_is_orthonormal(leading, last, gain, seed):
    shape = (*leading, last)
    if len(shape) < 2:
        shape = (1, *shape)
    kernel = keras_lsuv.Orthonormal(gain=gain, seed=seed)(shape)
    assert tuple(kernel.shape) == shape
    matrix = as_matrix(kernel)
    assert matrix.shape == (math.prod(shape[:-1]), shape[-1])
    assert_orthonormal(matrix, gain=gain, atol=1e-4 * max(gain, 1) ** 2)


# Step 1: the layer-aware redraw, the draw's distribution, and restore on failure.


def built(layer, input_shape):
    layer.build(input_shape)
    return layer


def redrawn(layer, input_shape, seed=0):
    """Builds `layer`, redraws it as step 1 does, and returns it."""
    target = find_targets(keras.Sequential([built(layer, input_shape)]))[0]
    redraw_orthonormal([target], seed=seed)
    return layer


def kernel(variable):
    return keras.ops.convert_to_numpy(variable).astype("float64")


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (keras.layers.Dense(12), (None, 30)),
        (keras.layers.Dense(40), (None, 30)),
        (keras.layers.EinsumDense("abc,cde->abde", (5, 4, 8), bias_axes="e"), (None, 5, 16)),
        (keras.layers.Conv1D(6, 3), (None, 10, 4)),
        (keras.layers.Conv2D(16, 3), (None, 8, 8, 3)),
        (keras.layers.Conv3D(4, 2), (None, 4, 4, 4, 2)),
    ],
)
def test_redraw_plain_kernels_are_orthonormal_as_fan_in_by_fan_out(layer, input_shape):
    w = kernel(redrawn(layer, input_shape).kernel)
    assert_orthonormal(w.reshape(-1, w.shape[-1]))


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (keras.layers.Conv1DTranspose(5, 3, strides=2), (None, 6, 4)),
        (keras.layers.Conv2DTranspose(3, 3, strides=2), (None, 6, 6, 8)),
        (keras.layers.Conv3DTranspose(2, 2), (None, 3, 3, 3, 16)),
    ],
)
def test_redraw_transposed_kernels_are_orthonormal_over_their_own_fan_in(layer, input_shape):
    w = kernel(redrawn(layer, input_shape).kernel)  # (*k, filters, in_channels)
    channels = w.shape[-1]
    assert_orthonormal(np.moveaxis(w, -1, 0).reshape(channels, -1))  # (in, prod(k)·filters)


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (None, 8, 8, 5)),
        (keras.layers.DepthwiseConv1D(4, depth_multiplier=3), (None, 9, 6)),
    ],
)
def test_redraw_depthwise_kernels_are_orthonormal_per_channel(layer, input_shape):
    w = kernel(redrawn(layer, input_shape).kernel)  # (*k, in, multiplier)
    per_channel = np.moveaxis(w, -2, 0).reshape(w.shape[-2], -1, w.shape[-1])
    for matrix in per_channel:
        assert_orthonormal(matrix)
    assert not np.allclose(per_channel[0], per_channel[1])


def test_redraw_separable_conv_redraws_both_kernels():
    layer = redrawn(keras.layers.SeparableConv2D(6, 3, depth_multiplier=2), (None, 8, 8, 4))
    for matrix in np.moveaxis(kernel(layer.depthwise_kernel), -2, 0).reshape(4, 9, 2):
        assert_orthonormal(matrix)
    assert_orthonormal(kernel(layer.pointwise_kernel).reshape(-1, 6))


def test_redraw_kernels_of_one_shape_are_drawn_together_and_independent():
    model = keras.Sequential([keras.Input((16,))] + [keras.layers.Dense(16) for _ in range(4)])
    redraw_orthonormal(find_targets(model), seed=0)
    kernels = [kernel(layer.kernel) for layer in model.layers]
    for w in kernels:
        assert_orthonormal(w)
    for i in range(4):
        for j in range(i):
            assert not np.allclose(kernels[i], kernels[j])


def test_redraw_same_seed_same_kernels_other_seed_others():
    def draw(seed):
        return kernel(redrawn(keras.layers.Dense(8), (None, 8), seed=seed).kernel)

    np.testing.assert_array_equal(draw(1), draw(1))
    assert not np.allclose(draw(1), draw(2))
    assert not np.allclose(draw(None), draw(None))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_redraw_casts_to_the_variable_dtype(dtype):
    layer = redrawn(keras.layers.Dense(24, dtype=dtype), (None, 48))
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == dtype
    assert_orthonormal(as_matrix(layer.kernel), atol=2e-2)


def test_redraw_keeps_the_variable_objects():
    """On torch `assign` copies into the same Parameter, which an optimizer may already hold."""
    layer = built(keras.layers.Dense(8), (None, 8))
    variable, value = layer.kernel, layer.kernel.value
    redraw_orthonormal(find_targets(keras.Sequential([layer])), seed=0)
    assert layer.kernel is variable
    if keras.backend.backend() == "torch":
        assert layer.kernel.value is value


def reflections_product(gaussian):
    """Stewart's construction in float64 NumPy, one reflection at a time: H₁⋯Hₙ[:, :n] · diag(-sign(xₖ₁))."""
    rows, cols = gaussian.shape
    q = np.eye(rows)[:, :cols]
    signs = []
    for k in reversed(range(cols)):
        x = gaussian[k:, k].astype("float64")
        sign = 1.0 if x[0] >= 0 else -1.0
        v = x.copy()
        v[0] += sign * np.linalg.norm(x)
        q[k:] -= 2 * np.outer(v, v @ q[k:]) / (v @ v)
        signs.insert(0, -sign)
    return q * np.array(signs)


@pytest.mark.parametrize("block", [4, 256])
@pytest.mark.parametrize("rows, cols", [(24, 24), (40, 10), (13, 11)])
def test_haar_orthonormal_is_the_product_of_the_householder_reflections(block, rows, cols):
    """The blocked (compact WY) accumulation equals the reflections applied one by one, block edges included."""
    gaussian = keras.random.normal((2, rows, cols), seed=rows * cols)
    fast = keras.ops.convert_to_numpy(compiled(gaussian, block))
    for matrix, q in zip(keras.ops.convert_to_numpy(gaussian), fast, strict=True):
        np.testing.assert_allclose(q, reflections_product(matrix), atol=2e-5)
        assert_orthonormal(q)


def test_haar_orthonormal_first_column_is_the_gaussians_first_column_normalized():
    """As for Householder QR with R's diagonal positive: q₁ = a₁ / ‖a₁‖ (the sign convention is the Haar one)."""
    gaussian = keras.random.normal((1, 30, 30), seed=4)
    q = keras.ops.convert_to_numpy(compiled(gaussian))[0]
    first = keras.ops.convert_to_numpy(gaussian)[0, :, 0]
    np.testing.assert_allclose(q[:, 0], first / np.linalg.norm(first), atol=1e-6)


def test_haar_orthonormal_survives_a_zero_column():
    """A zero Householder vector (probability zero, but possible in float32) stands for the identity."""
    gaussian = np.random.default_rng(0).normal(size=(1, 16, 8)).astype("float32")
    gaussian[0, 7:, 7] = 0
    q = keras.ops.convert_to_numpy(compiled(keras.ops.convert_to_tensor(gaussian)))[0]
    assert np.isfinite(q).all()
    assert_orthonormal(q)


@pytest.mark.parametrize("shape", [(1, 1100, 600), (3, 260, 260)])
def test_haar_orthonormal_across_blocks_stays_orthonormal(shape):
    """One block, or more than one block of `BLOCK` reflections with a partial last block: orthonormal to 1e-5."""
    q = keras.ops.convert_to_numpy(orthonormal_matrices(shape[0], shape[1], shape[2], seed=1))
    for matrix in q:
        assert_orthonormal(matrix)


def haar_violations(matrices):
    """Departures of a batch of 3-row matrices with orthonormal rows or columns, or 3x3 ones, from Haar's law.

    Each column (or row) of a Haar-distributed matrix with 3 rows (or 3 columns) is uniform on the sphere S², so
    each entry is uniform on [-1, 1] (Archimedes). Checked with a Kolmogorov-Smirnov distance per entry position,
    against a threshold (1.95 / sqrt(n)) that a uniform sample exceeds with probability 0.001.
    """
    n = len(matrices)
    positions = [(i, j) for i in range(matrices.shape[1]) for j in range(matrices.shape[2])]
    violations = []
    for i, j in positions:
        entries = np.sort(matrices[:, i, j])
        cdf = (entries + 1) / 2
        distance = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
        if distance > 1.95 / np.sqrt(n):
            violations.append(((i, j), round(float(distance), 3)))
    return violations


def haar_draw(count, rows, cols, seed, block=orthonormal.BLOCK):
    """`orthonormal_matrices` by `haar_orthonormal` whatever the size (small draws use Householder QR)."""
    q = compiled(keras.random.normal((count, max(rows, cols), min(rows, cols)), seed=seed), block)
    return keras.ops.swapaxes(q, -1, -2) if rows < cols else q


def blocked_draw(count, rows, cols, seed):
    """`haar_draw` with blocks of 2 reflections, so that 3-column matrices take two blocks."""
    return haar_draw(count, rows, cols, seed, block=2)


@pytest.mark.parametrize("draw", [orthonormal_matrices, host_orthonormal_matrices, haar_draw, blocked_draw])
@pytest.mark.parametrize("rows, cols", [(3, 3), (3, 2), (2, 3)])
def test_draw_is_haar_entries_uniform_on_the_sphere(draw, rows, cols):
    matrices = keras.ops.convert_to_numpy(draw(2000, rows, cols, 5)).astype("float64")
    assert haar_violations(matrices) == []


def test_haar_check_rejects_a_draw_without_sign_correction():
    """The check can fail: QR of Gaussian matrices without folding in the signs of R's diagonal is not Haar."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(2000, 3, 3)))
    assert haar_violations(q) != []


@pytest.mark.parametrize("draw", [orthonormal_matrices, host_orthonormal_matrices, haar_draw, blocked_draw])
def test_draw_is_haar_trace_moments(draw):
    """For Haar Q in O(n), n >= 2: E[tr Q] = 0, E[(tr Q)²] = 1, E[tr Q²] = 1 (Diaconis & Shahshahani, 1994)."""
    q = keras.ops.convert_to_numpy(draw(4000, 16, 16, 3)).astype("float64")
    trace = np.trace(q, axis1=-2, axis2=-1)
    trace_of_square = np.trace(q @ q, axis1=-2, axis2=-1)
    # Standard errors: 1/sqrt(4000) = 0.016 and sqrt(2/4000) = 0.022; tolerances are about 5 of them.
    assert abs(trace.mean()) < 0.08
    assert abs((trace**2).mean() - 1) < 0.12
    assert abs(trace_of_square.mean() - 1) < 0.12


def test_failure_midway_through_step_1_restores_every_kernel(monkeypatch):
    model = zoo.residual_cnn()
    x = zoo.batch_for(model)
    before = zoo.weights_of(model)
    calls = []

    def failing(draw):
        def failing_draw(*args, **kwargs):
            calls.append(args)
            if len(calls) == 3:
                changed = [not np.array_equal(a, b) for a, b in zip(before, zoo.weights_of(model), strict=True)]
                assert any(changed), "two groups of kernels were redrawn before the failure"
                raise RuntimeError("draw failed")
            return draw(*args, **kwargs)

        return failing_draw

    for name in ("orthonormal_matrices", "host_orthonormal_matrices"):
        monkeypatch.setattr(orthonormal, name, failing(getattr(orthonormal, name)))
    with pytest.raises(RuntimeError, match="draw failed"):
        keras_lsuv.lsuv_init(model, x, seed=0, verbose=0)
    assert len(calls) == 3
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jax_on_cpu", [False, True])
def test_large_groups_are_drawn_on_the_device_small_ones_on_the_host(monkeypatch, jax_on_cpu):
    """Groups up to `SMALL_SIZE` are drawn on the host; with JAX on a CPU (a compilation per device shape), groups up
    to `JAX_CPU_HOST_SIZE` too (here lowered to 512³, one 512 x 512 matrix)."""
    calls = {"device": [], "host": []}
    for name, where in (("orthonormal_matrices", "device"), ("host_orthonormal_matrices", "host")):
        draw = getattr(orthonormal, name)
        monkeypatch.setattr(
            orthonormal, name, lambda *args, draw=draw, where=where: calls[where].append(args[:3]) or draw(*args)
        )
    monkeypatch.setattr(orthonormal, "_jax_on_cpu", lambda kernel: jax_on_cpu)
    monkeypatch.setattr(orthonormal, "JAX_CPU_HOST_SIZE", 512**3)
    layers = [keras.layers.Dense(512), keras.layers.Dense(1024), keras.layers.Dense(8)]
    model = keras.Sequential([keras.Input((512,)), *layers])
    redraw_orthonormal(find_targets(model), seed=0)
    if jax_on_cpu:
        assert calls == {"device": [(1, 512, 1024)], "host": [(1, 512, 512), (1, 1024, 8)]}
    else:
        assert calls == {"device": [(1, 512, 512), (1, 512, 1024)], "host": [(1, 1024, 8)]}
    for layer in model.layers:
        assert_orthonormal(as_matrix(layer.kernel))


def test_host_draw_is_float32_and_reproducible():
    """The host draw runs `haar_orthonormal` on NumPy float32 arrays (`HOST_OPS` keeps Python scalars float32)."""
    first = orthonormal.host_orthonormal_matrices(3, 40, 24, seed=7)
    assert first.dtype == np.float32 and first.shape == (3, 40, 24)
    np.testing.assert_array_equal(first, orthonormal.host_orthonormal_matrices(3, 40, 24, seed=7))
    assert not np.array_equal(first, orthonormal.host_orthonormal_matrices(3, 40, 24, seed=8))
    for matrix in first:
        assert_orthonormal(matrix)


def test_small_draws_use_householder_qr_large_ones_the_reflections(monkeypatch):
    used = []
    for name in ("householder_qr", "haar_orthonormal"):
        draw = getattr(orthonormal, name)
        monkeypatch.setattr(orthonormal, name, lambda *args, draw=draw, name=name: used.append(name) or draw(*args))
    monkeypatch.setattr(orthonormal, "_jax_haar_orthonormal", lambda: orthonormal.haar_orthonormal)
    assert_orthonormal(as_matrix(keras_lsuv.Orthonormal(seed=0)((256, 256))))
    assert_orthonormal(as_matrix(keras_lsuv.Orthonormal(seed=0)((3, 3, 256, 300))))
    assert used == ["householder_qr", "haar_orthonormal"]
