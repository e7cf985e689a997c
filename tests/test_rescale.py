"""The paper's loop for one layer: its stopping rule (`rescale.next_scale`) as a function of numbers, host and device
alike; and the scale limits of narrow dtypes, mixed precision and a bias above the target, measured on models."""

import math

import keras
import numpy as np
import pytest
import zoo
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import layers, ops

from keras_lsuv.rescale import (
    MIN_RELATIVE_VARIANCE,
    SCALARS,
    Criterion,
    Stop,
    find_scale,
    next_scale,
    secant_exponent,
    unit_scale,
    unit_scale_record,
)
from keras_lsuv.targets import Target

criteria = st.builds(
    Criterion,
    target_variance=st.floats(0.01, 100.0),
    tolerance=st.floats(1e-3, 0.5),
    max_iterations=st.integers(0, 12),
)
variances = st.one_of(st.floats(0.0, 1e12), st.sampled_from([math.nan, math.inf, 1e-13, 1.0]))
scales = st.floats(1e-3, 1e3)


DEFAULT = Criterion()


def decide(variance, scale=1.0, iterations=0, criterion=DEFAULT, **options):
    stop, proposed = next_scale(variance, scale, iterations, criterion, **options)
    return Stop(int(stop)), float(proposed)


@settings(max_examples=300, deadline=None)
@given(variances, scales, st.integers(0, 12), criteria, st.sampled_from([math.inf, 10.0, 1.5]))
def test_each_rule_stops_the_loop_in_order(variance, scale, iterations, criterion, limit):
    stop, proposed = decide(variance, scale, iterations, criterion, limit=limit)
    goal = criterion.target_variance
    if not math.isfinite(variance):
        assert stop == Stop.NOT_FINITE
    elif abs(variance - goal) < criterion.tolerance or iterations >= criterion.max_iterations:
        assert stop == Stop.DONE
    elif variance <= MIN_RELATIVE_VARIANCE * goal:
        assert stop == Stop.TOO_SMALL
    elif scale * math.sqrt(goal / variance) > limit:
        assert stop == Stop.BEYOND_DTYPE
    else:
        assert stop == Stop.RESCALE
        assert proposed == pytest.approx(scale * math.sqrt(goal / variance), rel=1e-12)


@settings(max_examples=300, deadline=None)
@given(
    variances,
    scales,
    st.integers(0, 12),
    criteria,
    st.sampled_from([math.inf, 10.0, 1.5]),
    st.sampled_from([-math.inf, 0.5, 1.5, 1e3]),
)
def test_python_floats_take_numpys_decision_bit_for_bit(variance, scale, iterations, criterion, limit, floor):
    on_floats = next_scale(variance, scale, iterations, criterion, limit, floor, SCALARS)
    on_numpy = next_scale(variance, scale, iterations, criterion, limit, floor)
    assert int(on_floats[0]) == int(on_numpy[0])
    assert np.float64(on_floats[1]).tobytes() == np.float64(on_numpy[1]).tobytes()


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-6, 1e6), criteria)
def test_a_variance_quadratic_in_the_scale_reaches_the_target_in_one_rescale(variance, criterion):
    """The pre-activation `s·z` of a layer without bias: `var(s) = s²·var(1)`, the closed form `unit_scale` uses."""
    stop, proposed = decide(variance, criterion=criterion)
    if stop == Stop.RESCALE:
        after = proposed * proposed * variance
        assert abs(after - criterion.target_variance) < criterion.tolerance
        assert decide(after, proposed, 1, criterion)[0] == Stop.DONE
    else:
        assert stop == Stop.DONE


@settings(max_examples=100, deadline=None)
@given(st.floats(1.5, 100.0), st.floats(0.0, 1.0))
def test_a_bias_above_the_target_stops_only_a_variance_above_it(floor, below):
    assert decide(floor + 1.0, floor=floor)[0] == Stop.BIAS_FLOOR
    assert decide(below * 0.8, floor=floor)[0] != Stop.BIAS_FLOOR  # below the target: scaling up still helps


@pytest.mark.parametrize(
    "criterion", [Criterion(), Criterion(target_variance=2.0, tolerance=0.01), Criterion(0.5, 0.1, 0)]
)
@pytest.mark.parametrize("variance", [0.0, 1e-15, 1e-9, 0.5, 0.95, 1.05, 7.0, 1e8, math.nan, math.inf])
def test_the_device_takes_the_hosts_decision(variance, criterion):
    """The same function on a float32 device scalar (`keras.ops`), with no branch on its value."""
    host_stop, host_proposed = decide(float(np.float32(variance)), criterion=criterion)
    stop, proposed = next_scale(ops.convert_to_tensor(np.float32(variance)), 1.0, 0, criterion, xp=ops)
    assert Stop(int(ops.convert_to_numpy(stop))) == host_stop
    if host_stop == Stop.RESCALE:
        assert float(ops.convert_to_numpy(proposed)) == pytest.approx(host_proposed, rel=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("factory", [zoo.small_mlp, zoo.small_cnn, zoo.small_attention])
def test_mixed_precision_rescale_reaches_the_float32_kernels(policy, factory):
    model = factory()
    x = zoo.scaled_batch(model, 30.0)
    report = zoo.initialize_and_check(model, x)
    assert report.converged
    compute = policy.split("_")[1]
    for layer in zoo.target_layers(model):
        assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in layer.trainable_weights)
    # The kernels are float32 values scaled in float32, not casts of the compute dtype.
    kernels = np.concatenate([k.ravel() for ks in zoo.kernels_by_layer(model).values() for k in ks])
    cast = ops.convert_to_numpy(ops.cast(ops.cast(kernels, compute), "float32"))
    assert np.mean(cast != kernels) > 0.5


@pytest.mark.parametrize("policy", ["float16", "mixed_float16"], indirect=True)
def test_tiny_inputs_never_give_an_infinite_kernel(policy):
    model = zoo.small_mlp()
    x = zoo.scaled_batch(model, 1e-5)
    caught = []
    report = zoo.initialize_and_check(model, x, warned=caught)
    assert np.isfinite(ops.convert_to_numpy(model(x))).all()
    for record in report.records:
        if not record.converged:
            assert any(record.name in str(w.message) for w in caught)
            if "beyond what" in record.reason:
                assert "float16" in record.reason and "kernel scale" in record.reason


def test_float16_kernel_limit_stops_with_a_warning_naming_dtype_and_scale():
    keras.config.set_dtype_policy("float16")
    try:
        model = keras.Sequential([keras.Input((16,)), layers.Dense(4)])
        x = zoo.scaled_batch(model, 3e-5)  # unit variance needs a scale of ~3e4: kernel entries beyond float16's range
        model(x[:2])
        with pytest.warns(UserWarning, match=r"kernel scale of .* beyond what float16 can hold"):
            report = zoo.run(model, x)
    finally:
        keras.config.set_dtype_policy("float32")
    assert not report.converged
    assert np.isfinite(zoo.weights_of(model)[0]).all()
    assert np.isfinite(ops.convert_to_numpy(model(x))).all()


def test_a_bias_above_the_target_keeps_the_kernel_and_says_why():
    model = keras.Sequential([keras.Input((16,)), layers.Dense(8, activation="relu"), layers.Dense(4)])
    x = zoo.batch_for(model)
    model(x[:2])
    model.layers[0].bias.assign(np.linspace(-3.0, 3.0, 8).astype("float32"))  # variance 3.9 from the bias alone
    with pytest.warns(UserWarning, match=r"the bias alone gives a variance of 3\.8"):
        report = zoo.run(model, x)
    record = report.records[0]
    assert not record.converged and record.scale == 1.0
    assert report.records[1].converged


VARIANCES = [0.0, 1e-15, 1e-9, 0.5, 0.9, 0.95, 1.05, 1.2, 7.0, 1e8]
CRITERIA = [Criterion(), Criterion(target_variance=2.0, tolerance=0.01), Criterion(max_iterations=0)]


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("variance", VARIANCES)
def test_unit_scale_makes_the_choice_of_the_loop(variance, criterion):
    target = Target(layers.Dense(2, name="dense"))
    variance = float(np.float32(variance))  # as measured on the device
    expected = find_scale(target, lambda s: s * s * variance, criterion)
    scale, stop = (
        float(ops.convert_to_numpy(v)) for v in unit_scale(ops.convert_to_tensor(np.float32(variance)), criterion)
    )
    record = unit_scale_record(target, variance, scale, stop, criterion)
    assert record.scale == pytest.approx(expected.scale, rel=1e-6)
    assert record.final_variance == pytest.approx(expected.final_variance, rel=1e-6)
    assert (record.iterations, record.converged, record.reason) == (
        expected.iterations,
        expected.converged,
        expected.reason,
    )


@pytest.mark.parametrize(
    ("variance", "message"),
    [(math.nan, "'dense' .* produced non-finite values"), (math.inf, "'dense' .* overflowed float32")],
)
def test_non_finite_variance_is_not_rescaled_and_its_record_raises(variance, message):
    scale, stop = (
        float(ops.convert_to_numpy(v)) for v in unit_scale(ops.convert_to_tensor(np.float32(variance)), Criterion())
    )
    assert scale == 1.0 and stop == Stop.NOT_FINITE
    with pytest.raises(ValueError, match=message):
        unit_scale_record(Target(layers.Dense(2, name="dense")), variance, scale, stop, Criterion())


@pytest.mark.parametrize("variance", [0.01, 0.5, 7.0, 1e4])
def test_secant_steps_are_the_papers_where_the_variance_goes_with_the_square_of_the_scale(variance):
    target = Target(layers.Dense(2, name="dense"))
    paper = find_scale(target, lambda s: s * s * variance, Criterion())
    secant = find_scale(target, lambda s: s * s * variance, Criterion(), exponent=2.0)
    assert (secant.scale, secant.iterations, secant.final_variance) == (
        paper.scale,
        paper.iterations,
        paper.final_variance,
    )


@pytest.mark.parametrize("power", [0.7, 5.0, 12.0])
def test_secant_steps_converge_where_the_papers_do_not(power):
    # A layer feeding its own later calls: the variance over every call goes as scale**power, not scale**2. The
    # paper's step overshoots (power > 4: it diverges) or crawls; the secant measures the power after one step.
    target = Target(layers.Dense(2, name="dense"))
    variance_at = lambda s: 9.0 * s**power  # noqa: E731
    paper = find_scale(target, variance_at, Criterion(max_iterations=4))
    secant = find_scale(target, variance_at, Criterion(max_iterations=4), exponent=2.0)
    assert not paper.converged
    assert secant.converged and abs(variance_at(secant.scale) - 1.0) < 0.1


def test_secant_exponent_is_the_slope_in_log_space_within_its_bounds():
    assert secant_exponent((1.0, 4.0), (0.5, 1.0)) == pytest.approx(2.0)
    assert secant_exponent((1.0, 1.0), (2.0, 2.0**6)) == pytest.approx(6.0)
    assert secant_exponent((1.0, 1.0), (2.0, 2.0**20)) == 8.0  # the bound
    assert secant_exponent((1.0, 1.0), (1.0 + 1e-6, 5.0), default=3.0) == 3.0  # the scale hardly moved
    assert secant_exponent((1.0, 0.0), (2.0, 5.0), default=3.0) == 3.0  # not positive
