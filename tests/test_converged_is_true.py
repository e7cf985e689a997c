"""Every "converged" is true: each case of issue 11, measured on the model independently of the report."""

import warnings

import keras
import numpy as np
import pytest
import zoo
from keras import layers, ops

import keras_lsuv
from keras_lsuv.interception import intercepted_calls

BACKEND = keras.backend.backend()


def run(model, x, **options):
    options.setdefault("verbose", 0)
    options.setdefault("seed", 0)
    return keras_lsuv.lsuv_init(model, x, **options)


def initialize_and_check(model, x, **options):
    """Runs LSUV and checks the report against the model; returns the report."""
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    report = run(model, x, **options)
    zoo.assert_report_is_true(model, x, report, before)
    return report


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")


def mlp():
    return keras.Sequential([keras.Input((16,)), layers.Dense(32, activation="relu"), layers.Dense(4)])


def cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.SeparableConv2D(8, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(4),
        ]
    )


def attention():
    return zoo.transformer_block(seq=4, dim=8)


def scaled_batch(model, scale, n=128):
    return zoo.batch_for(model, n=n) * np.float32(scale)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("factory", [mlp, cnn, attention])
def test_mixed_precision_rescale_reaches_the_float32_kernels(policy, factory):
    model = factory()
    x = scaled_batch(model, 30.0)
    report = initialize_and_check(model, x)
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
    model = mlp()
    x = scaled_batch(model, 1e-5)
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run(model, x)
    zoo.assert_report_is_true(model, x, report, before)
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
        x = scaled_batch(model, 3e-5)  # unit variance needs a scale of ~3e4: kernel entries beyond float16's range
        model(x[:2])
        with pytest.warns(UserWarning, match=r"kernel scale of .* beyond what float16 can hold"):
            report = run(model, x)
    finally:
        keras.config.set_dtype_policy("float32")
    assert not report.converged
    assert np.isfinite(zoo.weights_of(model)[0]).all()
    assert np.isfinite(ops.convert_to_numpy(model(x))).all()


def time_distributed():
    inputs = keras.Input((5, 8))
    h = layers.TimeDistributed(layers.Dense(16, activation="relu"))(inputs)
    return keras.Model(inputs, layers.Dense(3)(layers.Flatten()(h)))


def test_time_distributed_is_measured_over_every_step():
    model = time_distributed()
    x = zoo.batch_for(model)
    x[:, 0] *= 0.01  # step 0 alone would ask for a 100x larger kernel
    report = initialize_and_check(model, x)
    assert report.converged


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
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run(model, x)
    zoo.assert_report_is_true(model, x, report, before)
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
    report = initialize_and_check(model, x)
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
    report = initialize_and_check(model, x)
    assert report.converged
    if activation is None:
        assert first.activation is None
        assert (ops.convert_to_numpy(first(x)) < 0).any()  # no activation
    else:
        assert isinstance(first.activation, keras.layers.ReLU)
        out = ops.convert_to_numpy(first(x))
        assert (out >= 0).all() and (out == 0).any()  # the ReLU layer is still applied


class TwoHeads(keras.Model):
    """`unused` is never called; `dropout_only` only when training."""

    def __init__(self):
        super().__init__()
        self.body = layers.Dense(16, activation="relu")
        self.unused = layers.Dense(4)
        self.dropout_only = layers.Dense(16)
        self.head = layers.Dense(4)

    def call(self, x, training=False):
        h = self.body(x)
        if training:
            h = self.dropout_only(h)
        return self.head(h)


def test_unreached_layers_keep_their_kernels_and_are_reported():
    model = TwoHeads()
    x = zoo.batch_for(model)
    model(x[:2], training=True)
    model.unused.build((None, 16))
    before = zoo.kernels_by_layer(model)
    with pytest.warns(UserWarning, match="not measured") as caught:
        report = run(model, x)
    for name in (model.unused.name, model.dropout_only.name):
        assert report[name].skipped and "not reached" in report[name].reason
        assert any(name in str(w.message) for w in caught)
    zoo.assert_report_is_true(model, x, report, before)
    assert report[model.body.name].converged and report[model.head.name].converged


def test_a_layer_the_model_never_builds_is_skipped_and_the_rest_initialized():
    model = TwoHeads()  # `unused` and `dropout_only` are never called, so never built
    x = zoo.batch_for(model)
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    with pytest.warns(UserWarning, match="not measured") as caught:
        report = run(model, x)
    for layer in (model.unused, model.dropout_only):
        assert not layer.built and report[layer].skipped and "never built" in report[layer].reason
        assert any(f"'{layer.name}' (never built" in str(w.message) for w in caught)
    zoo.assert_report_is_true(model, x, report, before)
    assert report[model.body].converged and report[model.head].converged


def nested_blocks_named_alike():
    """Two nested models each holding a Dense named "proj" (Keras allows equal names across models)."""
    inputs = keras.Input((16,))
    block1 = keras.Sequential([keras.Input((16,)), layers.Dense(16, name="proj")], name="block1")
    block2 = keras.Sequential([keras.Input((16,)), layers.Dense(16, name="proj")], name="block2")
    model = keras.Model(inputs, layers.Dense(2, name="head")(block2(block1(inputs))))
    block2.trainable = False
    return model, block1.layers[0], block2.layers[0]


class NamedAlike(keras.Model):
    """Two Dense layers named "proj"; the second is built but never called."""

    def __init__(self):
        super().__init__()
        self.proj = layers.Dense(16, name="proj")
        self.spare = layers.Dense(16, name="proj")
        self.head = layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.proj(x))


def subclassed_named_alike():
    model = NamedAlike()
    model.spare.build((None, 16))
    return model, model.proj, model.spare


@pytest.mark.parametrize("factory", [nested_blocks_named_alike, subclassed_named_alike])
def test_layers_sharing_a_name_are_told_apart_by_object(factory):
    model, measured_layer, left_alone = factory()
    assert measured_layer.name == left_alone.name
    x = zoo.batch_for(model) * np.float32(3.0)  # far from unit variance: the measured layer must be rescaled
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    report = run(model, x)
    zoo.assert_report_is_true(model, x, report, before)  # re-measured layer by layer, matched by object
    assert report[measured_layer].converged and report[measured_layer].iterations >= 1
    assert report[left_alone].skipped
    assert abs(zoo.preactivation_variances(model, x)[measured_layer] - 1.0) < 0.1
    assert not np.array_equal(before[measured_layer][0], zoo.kernels_by_layer(model)[measured_layer][0])
    with pytest.raises(ValueError, match="2 layers of the report are named 'proj'"):
        report["proj"]


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
        report = run(model, x)
    assert report[inner].skipped and "cannot be measured eagerly" in report[inner].reason
    zoo.assert_report_is_true(model, x, report, before)
    assert [r.converged for r in report.records if r.layer is not inner] == [True, True]


def test_a_users_instance_call_and_attributes_are_left_as_found():
    model = mlp()
    layer = model.layers[0]
    calls = []
    class_call = layer.call

    def own_call(*args, **kwargs):
        calls.append(1)
        return class_call(*args, **kwargs)

    layer.call = own_call
    state = dict(vars(layer))
    run(model, zoo.batch_for(model))
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


def test_stateful_rnn_state_is_restored():
    inputs = keras.Input(batch_shape=(32, 5, 8))
    model = keras.Model(inputs, layers.Dense(3)(layers.SimpleRNN(4, stateful=True)(inputs)))
    x = np.random.default_rng(0).normal(size=(32, 5, 8)).astype("float32")
    model(x)  # the state is now the last step's output
    rnn = model.layers[1]
    state = ops.convert_to_numpy(rnn.states[0]).copy()
    assert np.any(state != 0)
    report = run(model, x * np.float32(3.0), num_samples=32)
    assert report.converged
    np.testing.assert_array_equal(ops.convert_to_numpy(rnn.states[0]), state)


def test_violated_kernel_constraint_is_reported():
    model = keras.Sequential([keras.Input((16,)), layers.Dense(8, kernel_constraint=keras.constraints.MaxNorm(0.5))])
    with pytest.warns(UserWarning, match="kernel_constraint .MaxNorm."):
        report = run(model, zoo.batch_for(model) * np.float32(0.1))
    assert report.converged


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
        run(model, zoo.batch_for(model))
    message = str(error.value)
    assert message.startswith("LSUV: layer 'after'") and "Exception encountered" not in message


def test_a_bias_above_the_target_keeps_the_kernel_and_says_why():
    model = keras.Sequential([keras.Input((16,)), layers.Dense(8, activation="relu"), layers.Dense(4)])
    x = zoo.batch_for(model)
    model(x[:2])
    model.layers[0].bias.assign(np.linspace(-3.0, 3.0, 8).astype("float32"))  # variance 3.9 from the bias alone
    with pytest.warns(UserWarning, match=r"the bias alone gives a variance of 3\.8"):
        report = run(model, x)
    record = report.records[0]
    assert not record.converged and record.scale == 1.0
    assert report.records[1].converged


def test_submodel_engine_refuses_a_shared_layer():
    inputs = keras.Input((16,))
    shared = layers.Dense(16, name="shared")
    model = keras.Model(inputs, shared(shared(inputs)))
    x = zoo.batch_for(model)
    before = zoo.weights_of(model)
    with pytest.raises(ValueError, match="'shared' is called 2 times"):
        run(model, x, engine="submodel")
    for a, b in zip(before, zoo.weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_callback_under_mixed_precision_sets_what_fit_trains_from(policy):
    model = mlp()
    x = scaled_batch(model, 300.0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    callback = keras_lsuv.LSUVCallback(x, seed=0, verbose=0)
    model.fit(x, np.zeros((len(x), 4), "float32"), epochs=1, batch_size=len(x), verbose=0, callbacks=[callback])
    assert callback.report.converged
    zoo.assert_report_is_true(model, x, callback.report, before)
