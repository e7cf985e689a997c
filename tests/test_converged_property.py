"""Property: whatever the architecture, input scale and dtype policy, the report is true of the model."""

import warnings

import keras
import numpy as np
import zoo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import layers

import keras_lsuv

STEPS, FEATURES = 4, 8  # one input shape and widths from a small set: JAX compiles once per new shape
ACTIVATIONS = [None, "relu", "tanh", "relu-layer"]

block = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["dense", "time_distributed", "shared"]),
        "width": st.sampled_from([8, 16]),
        "activation": st.sampled_from(ACTIVATIONS),
        "use_bias": st.booleans(),
    }
)


def make_activation(name):
    return layers.ReLU() if name == "relu-layer" else name


def build(blocks):
    inputs = keras.Input((STEPS, FEATURES))
    h = inputs
    for spec in blocks:
        dense = layers.Dense(spec["width"], activation=make_activation(spec["activation"]), use_bias=spec["use_bias"])
        if spec["kind"] == "dense":
            h = dense(h)
        elif spec["kind"] == "time_distributed":
            h = layers.TimeDistributed(dense)(h)
        else:  # one layer on two differently scaled inputs
            h = layers.Concatenate()([dense(h), dense(layers.Rescaling(10.0)(h))])
    return keras.Model(inputs, layers.Dense(3)(layers.Flatten()(h)))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blocks=st.lists(block, min_size=1, max_size=3),
    scale=st.sampled_from([1e-4, 1.0, 300.0]),
    policy=st.sampled_from(["float32", "mixed_float16", "mixed_bfloat16", "float16"]),
    nonzero_bias=st.booleans(),
)
def test_every_converged_layer_measures_within_tolerance(blocks, scale, policy, nonzero_bias):
    keras.backend.clear_session(free_memory=False)
    keras.config.set_dtype_policy(policy)
    try:
        model = build(blocks)
        rng = np.random.default_rng(0)
        x = (rng.normal(size=(64, STEPS, FEATURES)) * scale).astype("float32")
        model(x[:2])
        if nonzero_bias:
            for layer in zoo.target_layers(model):
                if layer.bias is not None:
                    layer.bias.assign(rng.normal(0, 0.5, size=layer.bias.shape))
        before = zoo.kernels_by_layer(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = keras_lsuv.lsuv_init(model, x, seed=0, verbose=0)
        zoo.assert_report_is_true(model, x, report, before)
        messages = " ".join(str(w.message) for w in caught)
        for record in report.records:
            assert record.converged or record.reason, record
            if not record.skipped and not record.converged:
                assert record.name in messages
    finally:
        keras.config.set_dtype_policy("float32")
