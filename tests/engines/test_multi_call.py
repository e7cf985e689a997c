"""`engines.multi_call`: the prediction of every call of a layer from its first call's, as numbers."""

import numpy as np
import pytest

from keras_lsuv.engines.multi_call import MIN_GAIN, Prediction, every_call, predict
from keras_lsuv.rescale import Criterion
from keras_lsuv.statistics import Moments


def stats(mean, variance, count=100.0):
    mean = np.atleast_1d(np.asarray(mean, "float64"))
    return Moments(count, mean, np.full(mean.shape, variance * count))


def test_with_exponent_two_the_ratio_holds_at_every_scale():
    prediction = Prediction(ratio=3.0, scale=0.5)
    first = lambda s: 2.0 * s * s  # noqa: E731
    for scale in (0.1, 0.5, 4.0):
        assert prediction.variance(first)(scale) == pytest.approx(3.0 * first(scale))


def test_a_larger_exponent_moves_the_ratio_with_the_scale_and_a_half_step_doubles_it():
    prediction = Prediction(ratio=3.0, scale=1.0, exponent=4.0)
    assert prediction.factor(2.0) == pytest.approx(3.0 * 2.0**2)
    damped = Prediction(ratio=3.0, scale=1.0, exponent=4.0, step=0.5)
    assert damped.power == 8.0 and damped.factor(2.0) == pytest.approx(3.0 * 2.0**6)


def test_the_ratio_is_measured_and_the_exponent_is_the_secant_through_two_passes():
    criterion = Criterion()
    first, every = stats(0.0, 1.0), stats(0.0, 4.0)
    earlier = predict(first, every, 1.0, None, criterion)
    assert (earlier.ratio, earlier.exponent, earlier.step) == (pytest.approx(4.0), 2.0, 1.0)
    # At half the scale the first call's variance is a quarter, every call's a sixteenth: the ratio went as s².
    later = predict(stats(0.0, 0.25), stats(0.0, 0.25), 0.5, earlier, criterion)
    assert later.ratio == pytest.approx(1.0) and later.exponent == pytest.approx(4.0)


def test_the_step_halves_where_the_variance_went_past_the_target_and_grows_back_where_it_did_not():
    criterion = Criterion()
    coupled = predict(stats(0.0, 1.0), stats(0.0, 9.0), 1.0, None, criterion, coupled=True)
    assert coupled.step == 0.5
    overshot = predict(stats(0.0, 0.1), stats(0.0, 0.2), 0.5, coupled, criterion)
    assert overshot.step == 0.25
    same_side = predict(stats(0.0, 0.2), stats(0.0, 0.5), 0.7, overshot, criterion)
    assert same_side.step == pytest.approx(0.375)


def test_the_centering_bias_zeroes_the_predicted_means_with_the_measured_feedback():
    criterion = Criterion()
    # Every call's channel means exceed the first call's by 0.5 + 2·(bias - 0): measured through two biases.
    first = stats([0.2, -0.1], 1.0)
    a = predict(first, stats([0.2 + 0.5, -0.1 + 0.5], 1.0), 1.0, None, criterion, bias=np.zeros(2))
    b = predict(
        first, stats([0.2 + 0.5 + 2 * 0.3, -0.1 + 0.5 - 2 * 0.1], 1.0), 1.0, a, criterion, bias=np.array([0.3, -0.1])
    )
    assert b.feedback == pytest.approx(2.0)
    mean_of_kernel_term = np.array([0.4, -0.3])
    bias = b.centering_bias(mean_of_kernel_term, 1.0)
    first_call = stats(mean_of_kernel_term + bias, 1.0)
    assert np.abs(b.moments(first_call, 1.0, bias).mean).max() == pytest.approx(0.0, abs=1e-9)
    runaway = predict(first, stats([0.0, 0.0], 1.0), 1.0, b, criterion, bias=np.array([10.3, -10.1]))
    assert runaway.feedback >= MIN_GAIN - 1.0


def test_every_call_merges_the_moments_of_the_calls():
    merged = every_call([stats(0.0, 1.0), stats(2.0, 1.0)])
    assert merged.count == 200.0 and merged.variance() == pytest.approx(2.0)
