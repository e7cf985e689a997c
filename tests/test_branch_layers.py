"""`residual="stream"` through drop-path and layer-scale layers, and InceptionResNetV2's scaled additions: each merge
measured on the model, in inference and in the forward pass `fit` runs."""

import contextlib

import keras
import numpy as np
import pytest
import zoo

import keras_lsuv

layers = keras.layers

# keras.applications keeps `LayerScale`, `StochasticDepth`, `ConvNeXtBlock`, `CustomScaleLayer` and
# `inception_resnet_block` private (`keras.src`, not exported): a Keras that moves them skips these tests, as
# `keras_lsuv.residual` then does not know them either.
convnext = pytest.importorskip("keras.src.applications.convnext")
inception_resnet_v2 = pytest.importorskip("keras.src.applications.inception_resnet_v2")


class StochasticDepth(layers.Layer):
    """keras.io's drop-path (the CCT and ConvNeXt examples), as they write it."""

    def __init__(self, drop_prop, **kwargs):
        super().__init__(**kwargs)
        self.drop_prob = drop_prop
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, x, training=None):
        if training:
            keep_prob = 1 - self.drop_prob
            shape = (keras.ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
            random_tensor = keep_prob + keras.random.uniform(shape, 0, 1, seed=self.seed_generator)
            random_tensor = keras.ops.floor(random_tensor)
            return x / keep_prob * random_tensor
        return x


@keras_lsuv.scales_with_input
class DeclaredStochasticDepth(StochasticDepth):
    """The same, declared to scale with its input."""


class ShiftedStochasticDepth(DeclaredStochasticDepth):
    """A `call` of its own that adds a constant: not declared with its parent."""

    def call(self, x, training=None):
        return super().call(x, training) + 1.0


@contextlib.contextmanager
def drop_paths_off(model):
    """Every drop-path of `model` at rate 0 in the block, as the oracle's training pass turns dropout off: it measures
    the scales, not a random draw (LSUV itself runs in inference, where the rate does nothing)."""
    found = []
    for layer in model._flatten_layers(include_self=False):
        for attribute in ("drop_path_rate", "drop_prob"):
            if isinstance(layer, (convnext.StochasticDepth, StochasticDepth)) and hasattr(layer, attribute):
                found.append((layer, attribute, getattr(layer, attribute)))
                setattr(layer, attribute, 0.0)
    try:
        yield
    finally:
        for layer, attribute, value in found:
            setattr(layer, attribute, value)


def convnext_stream(layer_scale=1e-6, drop_path_rate=0.0, blocks=2, width=16):
    """keras.applications' own ConvNeXt blocks (depthwise conv, LayerNorm, Dense, gelu, Dense, `LayerScale`, then
    `StochasticDepth` if `drop_path_rate`) on a stream of variance 0.01: the first branch must reach the target."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Rescaling(0.1)(layers.Conv2D(width, 2, strides=2, name="stem")(inputs))
    for i in range(blocks):
        block = convnext.ConvNeXtBlock(width, drop_path_rate, layer_scale, name=f"block{i}")
        x = block(x)
    return keras.Model(inputs, layers.Dense(3, name="head")(layers.GlobalAveragePooling2D()(x)))


def transformer(drop_path, blocks=2, width=16, tokens=6):
    """keras.io's CCT encoder blocks: pre-LN attention and MLP branches, each through a drop-path before its `Add`,
    on a stream of variance 0.09."""
    inputs = keras.Input((tokens, width))
    x = layers.Rescaling(0.3)(layers.Dense(width, name="embed")(inputs))
    for i in range(blocks):
        h = layers.LayerNormalization()(x)
        h = layers.MultiHeadAttention(2, width // 2)(h, h)
        x = layers.Add()([drop_path(0.1 * (i + 1))(h), x])
        h = layers.LayerNormalization()(x)
        h = layers.Dense(width)(layers.Dense(2 * width, activation="gelu")(h))
        x = layers.Add()([drop_path(0.1 * (i + 1))(h), x])
    return keras.Model(inputs, layers.Dense(3)(x))


def inception_resnet(blocks=3, width=8, scale=0.17):
    """InceptionResNet blocks without normalization: `CustomScaleLayer(scale)([x, up])` then relu, `up` a linear
    1x1 convolution of the concatenated towers."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    for _ in range(blocks):
        a = layers.Conv2D(width, 1, activation="relu")(x)
        b = layers.Conv2D(width, 3, padding="same", activation="relu")(layers.Conv2D(width, 1, activation="relu")(x))
        up = layers.Conv2D(width, 1)(layers.Concatenate()([a, b]))
        x = layers.Activation("relu")(inception_resnet_v2.CustomScaleLayer(scale)([x, up]))
    return keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))


def of_class(model, kind):
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, kind)]


def assert_every_merge_solved_and_measured(model, x, report, count):
    """`count` merges, each solved and converged, and measured within tolerance of 1 in a plain forward pass."""
    assert len(report.merges) == count, str(report)
    assert all(not m.skipped and m.converged for m in report.merges), str(report)
    merged = zoo.output_variances(model, x, [m.operation for m in report.merges])
    assert all(abs(value - 1.0) < 0.1 for value in merged.values()), merged


@pytest.mark.parametrize("layer_scale, drop_path_rate", [(1e-6, 0.3), (1.0, 0.0)])
def test_a_convnext_branch_is_scaled_in_its_layer_scale_and_the_stream_measures_the_target(layer_scale, drop_path_rate):
    model = convnext_stream(layer_scale, drop_path_rate)
    x = zoo.batch_for(model)
    model(x[:2])
    scales = of_class(model, convnext.LayerScale)
    gammas = [np.array(keras.ops.convert_to_numpy(s.gamma)) for s in scales]
    with drop_paths_off(model):  # the oracle re-measures every layer, and every merge in inference and training
        report = zoo.initialize_and_check(model, x, residual="stream")
    assert_every_merge_solved_and_measured(model, x, report, count=2)
    for merge, scale, gamma in zip(report.merges, scales, gammas, strict=True):
        # the branch scale is in gamma; the branch's last Dense keeps the unit variance LSUV gave it
        np.testing.assert_allclose(keras.ops.convert_to_numpy(scale.gamma), gamma * merge.scale, rtol=1e-5)
        (dense,) = merge.branch_layers
        assert report[dense].merge == merge.name and abs(report[dense].final_variance - 1.0) < 0.1
    first = report.merges[0]  # the stream at 0.01: the branch, 1e-6 of it, must carry nearly all the target
    assert first.stream_variance < 0.02 and first.branch_variance == pytest.approx(layer_scale**2, rel=0.2)
    assert abs(first.scale * layer_scale - 1.0) < 0.1


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_a_layer_scale_of_1e6_holds_under_mixed_precision(policy):
    """gamma (a float32 variable) goes from 1e-6 to about 1, the branch computed in float16 or bfloat16: the merge's
    reported variance is what the model measures, in inference and training (the oracle)."""
    model = convnext_stream(layer_scale=1e-6)
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")
    assert_every_merge_solved_and_measured(model, x, report, count=2)
    assert report.merges[0].scale > 1e5, str(report)


def test_a_convnext_stream_already_at_the_target_keeps_its_layer_scales():
    inputs = keras.Input((8, 8, 3))
    x = layers.LayerNormalization()(layers.Conv2D(16, 2, strides=2)(inputs))  # ConvNeXt's stem: the stream at 1
    for i in range(2):
        x = convnext.ConvNeXtBlock(16, name=f"block{i}")(x)  # layer scale 1e-6: the branch adds 1e-12
    model = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")
    assert_every_merge_solved_and_measured(model, x, report, count=2)
    assert [m.scale for m in report.merges] == [1.0, 1.0]
    for scale in of_class(model, convnext.LayerScale):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(scale.gamma), np.float32(1e-6))


def test_a_stochastic_depth_in_training_carries_the_branch_scale():
    """The pass `fit` runs drops samples (rate 0.5): with the same draw, the first merge's branch is its scale times
    what it is with that scale undone, so the merge's output is `U + s·S` there too."""
    model = convnext_stream(layer_scale=1e-6, drop_path_rate=0.5)
    x = zoo.batch_for(model)
    report = zoo.run(model, x, residual="stream")
    merge = report.merges[0]
    drop, scale = of_class(model, convnext.StochasticDepth)[0], of_class(model, convnext.LayerScale)[0]
    assert merge.scale > 1e5, str(report)  # the stream at 0.01, gamma at 1e-6

    def branch_in_training():
        found = []
        keras.utils.set_random_seed(0)  # keras.applications' StochasticDepth draws from the global generator
        with zoo.recorded_calls([drop], lambda op, a, k, out: found.append(keras.ops.convert_to_numpy(out))):
            model(x, training=True)
        return found[0]

    scaled = branch_in_training()
    scale.gamma.assign(scale.gamma / merge.scale)
    unscaled = branch_in_training()
    dropped = np.all(unscaled == 0, axis=(1, 2, 3))
    assert dropped.any() and not dropped.all(), dropped  # a draw that drops some samples and keeps the others
    # The samples both draws keep (Keras 3.5 on JAX does not replay the global generator's draw after
    # `set_random_seed`; later versions draw the same samples, and then all kept samples are compared).
    kept = ~dropped & ~np.all(scaled == 0, axis=(1, 2, 3))
    assert kept.any()
    np.testing.assert_allclose(scaled[kept], merge.scale * unscaled[kept], rtol=1e-4, atol=1e-6)


def test_a_declared_drop_path_passes_a_branch_and_an_undeclared_one_does_not():
    undeclared = transformer(StochasticDepth)
    x = zoo.batch_for(undeclared)
    report = zoo.initialize_and_check(undeclared, x, warned=[], residual="stream")
    assert len(report.merges) == 4
    assert all(m.skipped and "scales_with_input" in m.reason for m in report.merges), str(report)

    model = transformer(DeclaredStochasticDepth)
    with drop_paths_off(model):
        report = zoo.initialize_and_check(model, x, residual="stream")
    assert_every_merge_solved_and_measured(model, x, report, count=4)
    ends = [layer for m in report.merges for layer in m.branch_layers]
    assert all(isinstance(layer, (layers.Dense, layers.EinsumDense)) for layer in ends), ends


def test_a_declared_drop_path_in_training_carries_the_branch_scale_of_the_kernel():
    model = transformer(DeclaredStochasticDepth)
    x = zoo.batch_for(model)
    report = zoo.run(model, x, residual="stream")
    merge, drop = report.merges[0], of_class(model, DeclaredStochasticDepth)[0]  # the first attention branch
    assert merge.scale > 0 and abs(merge.scale - 1.0) > 1e-3, str(report)  # the stream at 0.09
    state = keras.ops.convert_to_numpy(drop.seed_generator.state)

    def branch_in_training():
        found = []
        drop.seed_generator.state.assign(state)  # its own generator, as keras.io seeds it: the same draw
        with zoo.recorded_calls([drop], lambda op, a, k, out: found.append(keras.ops.convert_to_numpy(out))):
            model(x, training=True)
        return found[0]

    scaled = branch_in_training()
    (layer,) = merge.branch_layers  # the attention's output projection: undo the scale of its kernel and bias
    for variable in (layer.kernel, layer.bias):
        variable.assign(variable / merge.scale)
    unscaled = branch_in_training()
    dropped = np.all(unscaled == 0, axis=(1, 2))
    assert dropped.any() and not dropped.all(), dropped
    np.testing.assert_allclose(scaled, merge.scale * unscaled, rtol=1e-4, atol=1e-6)


def test_a_subclass_with_a_call_of_its_own_is_not_declared_with_its_parent():
    model = transformer(ShiftedStochasticDepth, blocks=1)
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, warned=[], residual="stream")
    assert len(report.merges) == 2 and all(m.skipped for m in report.merges), str(report)


@pytest.mark.parametrize("bad", [int, "Dense", layers.Dense(3)])
def test_scales_with_input_takes_a_layer_class(bad):
    with pytest.raises(TypeError, match="keras.layers.Layer subclass"):
        keras_lsuv.scales_with_input(bad)


def test_scaled_additions_of_inception_resnet_are_solved_with_their_coefficient():
    scale = 0.17
    model = inception_resnet(scale=scale)
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, residual="stream")  # each merge's reported variance as measured
    assert_every_merge_solved_and_measured(model, x, report, count=3)
    for merge in report.merges:
        assert merge.class_name == "CustomScaleLayer"
        # the branch enters the merge as 0.17 times its unit variance, and needs a scale above 1 to reach the target
        assert merge.branch_variance == pytest.approx(scale**2, rel=0.15) and merge.scale > 1, merge


def test_keras_inception_resnet_blocks_are_found_and_left_alone_after_their_batch_normalizations():
    inputs = keras.Input((8, 8, 16))
    x = inputs
    for index in range(2):
        x = inception_resnet_v2.inception_resnet_block(x, 0.17, "block35", index)
    model = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))
    x = zoo.batch_for(model)
    report = zoo.initialize_and_check(model, x, warned=[], residual="stream")
    assert [m.class_name for m in report.merges] == ["CustomScaleLayer"] * 2
    assert all(m.skipped and "BatchNormalization" in m.reason for m in report.merges), str(report)
