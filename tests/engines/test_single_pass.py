"""The single-pass engine on models that test its contract: layers called several times or inside traced
functions, activations, interceptors left as found, errors raised inside a layer, the device path."""

import warnings

import keras
import numpy as np
import pytest
import zoo
from keras import layers, ops

import keras_lsuv
from benchmarks.harness import counted_host_reads
from keras_lsuv import statistics
from keras_lsuv.engines import single_pass
from keras_lsuv.interception import intercepted_calls
from keras_lsuv.options import LSUVOptions
from keras_lsuv.targets import find_targets

BACKEND = keras.backend.backend()


def time_distributed():
    inputs = keras.Input((5, 8))
    h = layers.TimeDistributed(layers.Dense(16, activation="relu"))(inputs)
    return keras.Model(inputs, layers.Dense(3)(layers.Flatten()(h)))


def test_time_distributed_is_measured_over_every_step():
    model = time_distributed()
    x = zoo.batch_for(model)
    x[:, 0] *= 0.01  # step 0 alone would ask for a 100x larger kernel
    report = zoo.initialize_and_check(model, x)
    assert report.converged


def test_time_distributed_after_masking_is_measured_truly():
    # Where the backend carries the mask eagerly (TensorFlow, torch), the frames run their loop (`engines/frames.py`).
    inputs = keras.Input((5, 8))
    h = layers.TimeDistributed(layers.Dense(16, activation="relu"))(layers.Masking(mask_value=0.0)(inputs))
    model = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling1D()(h)))
    x = zoo.batch_for(model)
    x[:, -1] = 0.0  # the last frame masked
    assert zoo.initialize_and_check(model, x).converged  # every call re-measured


class ConcatCell(layers.Layer):
    """An RNN cell whose step is a target Dense on [input, state]."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.state_size, self.output_size = units, units, units
        self.dense = layers.Dense(units, activation="tanh")

    def build(self, input_shape):
        self.dense.build((input_shape[0], input_shape[-1] + self.units))

    def call(self, x, states):
        h = self.dense(ops.concatenate([x, states[0]], axis=-1))
        return h, [h]


def rnn_model():
    inputs = keras.Input((5, 8))
    h = layers.RNN(ConcatCell(16))(inputs)
    return keras.Model(inputs, layers.Dense(3)(h))


class Mapped(keras.Model):
    """A target applied to each sample by `ops.map` (a `lax.map` on JAX)."""

    def __init__(self):
        super().__init__()
        self.inner = layers.Dense(8, activation="relu")
        self.head = layers.Dense(3)

    def call(self, x):
        return self.head(ops.map(lambda row: self.inner(row[None])[0], x))


class EagerThenMapped(keras.Model):
    """One target called eagerly, then on each sample by `ops.map` (traced on JAX)."""

    def __init__(self):
        super().__init__()
        self.inner = layers.Dense(16, activation="tanh")
        self.head = layers.Dense(3)

    def call(self, x):
        h = self.inner(x)
        return self.head(ops.map(lambda row: self.inner(row[None])[0], h))


@pytest.mark.parametrize("factory", [rnn_model, Mapped, EagerThenMapped])
def test_targets_in_loops_are_measured_over_every_call_or_skipped_when_traced(factory):
    model = factory()
    shape = (5, 8) if factory is rnn_model else (16,)
    x = np.random.default_rng(0).normal(size=(32, *shape)).astype("float32")
    caught = []
    report = zoo.initialize_and_check(model, x, warned=caught)
    loop_layer = report.records[0]
    if BACKEND == "jax":  # lax.scan / lax.map: the layer only ever sees tracers
        assert loop_layer.skipped and "JAX control flow" in loop_layer.reason
        assert any("not measured" in str(w.message) and loop_layer.name in str(w.message) for w in caught)
    else:
        assert loop_layer.converged
    assert report.records[-1].converged


def test_shared_layer_on_differently_scaled_inputs_is_measured_over_both_calls():
    inputs = keras.Input((16,))
    shared = layers.Dense(16, activation="tanh", name="shared")
    a = shared(inputs)
    b = shared(layers.Rescaling(50.0)(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.Concatenate()([a, b])))
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x)
    assert report["shared"].converged


@pytest.mark.parametrize("activation", [None, "layer"])
def test_activation_none_and_layer_activations(activation):
    first = layers.Dense(32, activation=keras.layers.ReLU() if activation == "layer" else "relu")
    model = keras.Sequential([keras.Input((16,)), first, layers.Dense(4)])
    x = zoo.batch_for(model)
    model(x[:2])
    if activation is None:
        first.activation = None  # Keras's Dense.call accepts it
    assert np.isfinite(ops.convert_to_numpy(model(x))).all()
    report = zoo.initialize_and_check(model, x)
    assert report.converged
    if activation is None:
        assert first.activation is None
        assert (ops.convert_to_numpy(first(x)) < 0).any()  # no activation
    else:
        assert isinstance(first.activation, keras.layers.ReLU)
        out = ops.convert_to_numpy(first(x))
        assert (out >= 0).all() and (out == 0).any()  # the ReLU layer is still applied


class VectorizedMapped(keras.Model):
    """`inner` is only called inside `ops.vectorized_map` (JAX's vmap, TF's pfor, torch's vmap)."""

    def __init__(self):
        super().__init__()
        self.first = layers.Dense(16, activation="relu")
        self.inner = layers.Dense(8, activation="relu")
        self.head = layers.Dense(3)

    def call(self, x):
        h = self.first(x)
        return self.head(ops.vectorized_map(lambda row: self.inner(row[None])[0], h))


def test_a_layer_called_under_vectorized_map_is_skipped_on_every_backend():
    model = VectorizedMapped()
    inner = model.inner
    x = zoo.batch_for(model)
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    with pytest.warns(UserWarning, match="not measured"):
        report = zoo.run(model, x)
    assert report[inner].skipped and "cannot be measured eagerly" in report[inner].reason
    zoo.assert_report_is_true(model, x, report, before)
    assert [r.converged for r in report.records if r.layer is not inner] == [True, True]


def test_a_users_instance_call_and_attributes_are_left_as_found():
    model = zoo.small_mlp()
    layer = model.layers[0]
    calls = []
    class_call = layer.call

    def own_call(*args, **kwargs):
        calls.append(1)
        return class_call(*args, **kwargs)

    layer.call = own_call
    state = dict(vars(layer))
    zoo.run(model, zoo.batch_for(model))
    assert vars(layer)["call"] is own_call and calls
    assert set(vars(layer)) == set(state)
    assert all(vars(layer)[key] is value for key, value in state.items() if key != "_tracker")


@pytest.mark.parametrize("where", ["installing", "pass"])
def test_interrupt_leaves_no_interceptor(where):
    model = keras.Sequential([keras.Input((16,))] + [layers.Dense(8) for _ in range(4)])
    x = zoo.batch_for(model)
    model(x[:2])
    made = []

    def make_call(layer, call):
        made.append(layer)
        if where == "installing" and len(made) == 3:
            raise KeyboardInterrupt

        def intercepted(*args, **kwargs):
            if where == "pass" and layer is model.layers[2]:
                raise KeyboardInterrupt
            return call(*args, **kwargs)

        return intercepted

    with pytest.raises(KeyboardInterrupt), intercepted_calls(model.layers, make_call):
        model(x)
    assert all("call" not in vars(layer) for layer in model.layers)


def test_lsuv_error_from_inside_a_layer_reads_as_lsuv_message():
    class Blowup(layers.Layer):
        armed = False

        def call(self, x):
            return x / 0.0 if self.armed else x

    inputs = keras.Input((16,))
    blowup = Blowup()
    model = keras.Model(inputs, layers.Dense(4, name="after")(blowup(layers.Dense(16)(inputs))))
    blowup.armed = True
    with pytest.raises(ValueError) as error:
        zoo.run(model, zoo.batch_for(model))
    message = str(error.value)
    assert message.startswith("LSUV: layer 'after'") and "Exception encountered" not in message


def test_shared_layer_is_processed_once_over_both_calls():
    model = zoo.Subclassed()
    x = zoo.batch_for(model)
    report = zoo.run(model, x)
    names = [r.name for r in report.records]
    assert names.count(model.shared.name) == 1
    assert names == [model.first.name, model.shared.name, model.conv.name, model.head.name]
    assert report[model.shared.name].converged
    assert abs(zoo.preactivation_variances(model, x)[model.shared] - 1) < 0.1  # over both calls


def test_records_follow_execution_order():
    model = zoo.residual_cnn()
    report = zoo.run(model, zoo.batch_for(model))
    order = [r.class_name for r in report.records]
    assert order[:4] == ["Conv2D", "SeparableConv2D", "DepthwiseConv2D", "Conv2DTranspose"]


def test_custom_call_is_reevaluated_and_converges():
    class SquashedDense(keras.layers.Dense):
        """Not linear in its kernel: the closed-form shortcut would be wrong."""

        def call(self, x):
            return self.activation(keras.ops.tanh(keras.ops.matmul(x, self.kernel)) * 3.0 + self.bias)

    model = keras.Sequential([keras.Input((16,)), SquashedDense(32), SquashedDense(32)])
    x = zoo.batch_for(model)
    report = zoo.run(model, x)
    assert report.converged
    for value in zoo.preactivation_variances(model, x).values():
        assert abs(value - 1) < 0.1


class AfterActivation(keras.layers.Dense):
    """A `call` of its own that does more after `Dense.call` has applied the activation."""

    def call(self, x):
        return super().call(x) + 0.1 * keras.ops.square(super().call(x))


@pytest.mark.parametrize("shared", [False, True], ids=["called_once", "shared"])
def test_the_pass_goes_on_with_what_a_custom_call_returns_not_its_activation_of_the_preactivation(shared):
    # The layers after it are measured on its real output: before, the pass went on with tanh(pre-activation),
    # which is not what this layer returns, and the next layer was scaled on inputs the model never gives it.
    inputs = keras.Input((16,))
    custom = AfterActivation(24, activation="tanh")
    h = custom(custom(layers.Dense(24)(inputs))) if shared else custom(inputs)
    model = keras.Model(inputs, layers.Dense(4)(layers.Dense(24, activation="relu")(h)))
    report = zoo.initialize_and_check(model, zoo.batch_for(model) + np.float32(1.0))
    assert report.converged


# The device path (on an accelerator: float32, no bias, pre-activation), forced here by `scale_on_device=True`, so that
# it runs on a CPU too: the same operations that run on a GPU. The scale is found on the device and read back once per
# pass: the same result as the paper's loop on the host, and errors raised for the first failing layer in order.
ON_DEVICE = LSUVOptions(scale_on_device=True)


@pytest.fixture
def accelerator(monkeypatch):
    """Every tensor counts as on an accelerator: what LSUV reads back is what it would read back on one (on a CPU,
    small tensors are computed on in NumPy instead: `statistics.on_host`)."""
    monkeypatch.setattr(statistics, "on_accelerator", lambda z: True)


@pytest.mark.parametrize("factory", [zoo.deep_mlp, zoo.residual_cnn, zoo.transformer_block, zoo.Subclassed])
def test_device_and_host_loop_give_the_same_kernels_and_records(factory, accelerator):
    # Both on the device's statistics, as on an accelerator: the two ways of finding a scale from them are compared.
    model = factory()
    x = zoo.batch_for(model)
    model(x[:2])
    start, before = zoo.weights_of(model), zoo.kernels_by_layer(model)
    on_device = zoo.run(model, x, scale_on_device=True)
    zoo.assert_report_is_true(model, x, on_device, before)  # measured on the model, every call of each layer
    after_device = zoo.weights_of(model)
    for weight, value in zip(model.weights, start, strict=True):
        weight.assign(value)
    on_host = zoo.run(model, x, scale_on_device=False)
    for a, b in zip(after_device, zoo.weights_of(model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert [r.name for r in on_device.records] == [r.name for r in on_host.records]
    for a, b in zip(on_device.records, on_host.records, strict=True):
        assert (a.iterations, a.converged, a.reason) == (b.iterations, b.converged, b.reason), a.name
        assert a.initial_variance == pytest.approx(b.initial_variance, rel=1e-5), a.name
        assert a.final_variance == pytest.approx(b.final_variance, rel=1e-5), a.name


def test_a_fresh_model_is_rescaled_with_one_read_back_per_pass(accelerator):
    model = keras.Sequential(
        [keras.Input((8, 8, 3))]
        + [layers.Conv2D(8, 3, padding="same", activation="relu") for _ in range(6)]
        + [layers.Flatten(), layers.Dense(16, activation="relu"), layers.Dense(4)]
    )
    x = zoo.batch_for(model)
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    targets = find_targets(model)
    with counted_host_reads() as reads:
        records = single_pass.run_single_pass(model, x, targets, ON_DEVICE, lambda _: None)
    # One read of every bias (LSUV never changes them), one of every layer's variance, scale and code, after the pass.
    assert reads == [(8 * 6 + 16 + 4,), (3 * len(targets),)]
    report = keras_lsuv.LSUVReport(records=list(records.values()))
    assert list(records) == targets and all(record.layer is t.layer for t, record in records.items())
    assert report.converged
    assert all(r.iterations <= 1 for r in report.records) and any(r.iterations == 1 for r in report.records)
    zoo.assert_report_is_true(model, x, report, before)


def test_layers_with_a_bias_read_the_device_layers_before_them_back(accelerator):
    model = zoo.deep_mlp(depth=4)
    model.layers[2].bias.assign(np.full((32,), 0.5, "float32"))  # this one goes through the host loop
    x = zoo.batch_for(model)
    model(x[:2])
    before, targets = zoo.kernels_by_layer(model), find_targets(model)
    with counted_host_reads() as reads:
        records = single_pass.run_single_pass(model, x, targets, ON_DEVICE, lambda _: None)
    # Biases; then, at the biased layer, the two device layers before it and the layer's own moments; then the rest.
    assert reads == [(32 * 4 + 10,), (6,), (2, 32), (6,)]
    zoo.assert_report_is_true(model, x, keras_lsuv.LSUVReport(records=list(records.values())), before)


class Poison(layers.Layer):
    """Turns its input non-finite once armed."""

    armed = False

    def call(self, x):
        return x / 0.0 if self.armed else x


class OwnCall(layers.Dense):
    """A Dense with a `call` of its own: rescaled by re-evaluation, on the host."""

    def call(self, x):
        return super().call(x)


@pytest.mark.parametrize("after_kind", ["device", "bias", "own_call"])
def test_the_first_non_finite_layer_is_named_and_every_weight_restored(after_kind):
    inputs = keras.Input((16,))
    h = layers.Dense(16, activation="relu", name="fine")(inputs)
    poison = Poison()
    h = layers.Dense(16, activation="relu", name="first_bad")(poison(h))
    after = (OwnCall if after_kind == "own_call" else layers.Dense)(4, name="after")
    model = keras.Model(inputs, after(h))
    if after_kind == "bias":  # the host loop measures 'after' non-finite too, before the pass ends
        after.bias.assign(np.ones((4,), "float32"))
    poison.armed = True
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match="layer 'first_bad' .* non-finite"):
        zoo.run(model, zoo.batch_for(model), force=True, scale_on_device=True)
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_block_shared_along_the_chain_converges_for_nearly_every_seed():
    # Each call of the block feeds the next, so the variance over every call of `ffn1` and `ffn2` moves with both
    # scales: rescaled at once, for a prediction from the pass before, with secant steps and halved steps where they
    # overshoot. Before (a sweep of the paper's step per layer, a pass per measure), depth 4 converged within the
    # default 10 rescales for 4 of 20 seeds.
    converged = 0
    for seed in range(20):
        keras.utils.set_random_seed(seed)
        model = zoo.SharedAlongTheChain(depth=4)
        x = zoo.batch_for(model, n=128, seed=seed) * np.float32(3.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a seed that does not converge says so: the oracle checks the rest
            report = zoo.initialize_and_check(model, x)  # every call of every layer re-measured against the report
        converged += report.converged
    assert converged >= 19


class Counted(layers.Layer):
    """Counts the forward passes through it."""

    passes = 0

    def call(self, x):
        Counted.passes += 1
        return x


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("kind", ["time_distributed", "siamese", "time_distributed_unlike_frames"])
def test_layers_called_several_times_take_passes_by_iterations_not_by_layers(kind, center):
    # Five layers each called four (or two) times, their calls not feeding each other: all rescaled in the same
    # passes. Before, each one halted a pass and was rescaled by passes of its own: 16 passes or more. The frames of
    # a TimeDistributed layer run as one call during the passes (`engines/frames.py`): one pass, even where one
    # frame is 3x the others and with `center=True` (it took up to 6 passes, and 2 centered). The siamese tower's
    # first call stands for the other input's in the first pass, and the channel means of `center=True` need more
    # (3 passes here).
    Counted.passes = 0
    rng = np.random.default_rng(1)
    if kind.startswith("time_distributed"):
        inputs = keras.Input((4, 12))
        h = Counted()(inputs)
        for _ in range(5):
            h = layers.TimeDistributed(layers.Dense(16, activation="tanh"))(h)
        model = keras.Model(inputs, layers.Dense(3)(layers.Flatten()(h)))
        x = rng.normal(size=(128, 4, 12)).astype("float32")
        if kind == "time_distributed_unlike_frames":
            x[:, 0] *= 3.0
    else:
        tower = keras.Sequential([layers.Dense(16, activation="relu") for _ in range(5)])
        a, b = keras.Input((12,)), keras.Input((12,))
        merged = layers.Concatenate()([tower(Counted()(a)), tower(b)])
        model = keras.Model([a, b], layers.Dense(3)(merged))
        x = [rng.normal(size=(128, 12)).astype("float32") for _ in range(2)]
    model(x)
    before = zoo.kernels_by_layer(model)
    Counted.passes = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note on SGD of a stiff centered start
        report = zoo.run(model, x, center=center)
    passes = Counted.passes - (2 if center else 0)  # `report.curvature` takes two passes more
    if kind.startswith("time_distributed") or not center:
        assert passes == 1, Counted.passes
    else:
        assert passes <= 3, Counted.passes
    zoo.assert_report_is_true(model, x, report, before)  # every call of every layer re-measured
    assert report.converged
