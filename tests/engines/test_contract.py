"""The contract of `keras_lsuv.engines.Engine`, checked for every entry of `ENGINES` on the same models."""

import keras
import pytest
import zoo

from keras_lsuv import LSUVReport
from keras_lsuv.engines import ENGINES
from keras_lsuv.options import LSUVOptions
from keras_lsuv.targets import find_targets


def mlp_with_a_frozen_layer():
    model = zoo.deep_mlp(depth=4)
    model.layers[1].trainable = False
    return model


# Models every engine handles (the sub-model engine needs each target to be a node of a Functional graph).
MODELS = [mlp_with_a_frozen_layer, zoo.nested_model, zoo.residual_cnn]


@pytest.mark.parametrize("factory", MODELS)
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_an_engine_gives_one_record_per_target_keyed_by_the_target(engine, factory):
    model = factory()
    x = zoo.batch_for(model) * 3.0
    model(x[:2])
    before = zoo.kernels_by_layer(model)
    targets = find_targets(model)
    announced = []
    records = ENGINES[engine](model, keras.ops.convert_to_tensor(x), targets, LSUVOptions(), announced.append)

    assert sorted(map(id, records)) == sorted(map(id, targets))  # the targets themselves, each once
    assert all(record.layer is target.layer for target, record in records.items())
    measured = [record for record in records.values() if not record.skipped]
    assert announced == measured  # `on_record` once per measured layer, in processing order
    for target, record in records.items():
        assert record.skipped == bool(target.skip_reason)
        if target.skip_reason:
            assert record.reason == target.skip_reason
    assert measured and all(record.converged for record in measured)
    zoo.assert_report_is_true(model, x, LSUVReport(records=list(records.values())), before)
