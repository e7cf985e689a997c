"""The sweep: LSUV on models others wrote, each checked against the model by the independent oracle of `zoo`.

Every case runs `lsuv_init` (the report re-measured over every call of every target, weights finite, every other
weight bit-identical, no instance attribute left on any layer), the same with `center=True` and the `Embedding`
layers chosen through `targets=` (each channel's mean re-measured too), and `LSUVCallback` in a `fit` of one step
(the report re-measured when training begins).

`make test` runs the fast slice: each case on one backend (`Case.fast`), its `fit` run eagerly (the callback runs
as in a compiled `fit`; only the training step is not compiled, which would cost seconds per model).
`LSUV_SWEEP=full` (`make sweep`) runs every case on the process's backend with a compiled `fit`, and with
`LSUV_SWEEP_RESULTS=path` writes each case's results there as JSON, from which `scripts/sweep_table.py` renders
the "Models tested" table of docs/guide.md.

Without keras-hub (`make test-min`) the keras-hub cases skip.
"""

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import application_models
import keras
import keras_io_models
import numpy as np
import pytest
import zoo

import keras_lsuv

BACKEND = keras.backend.backend()
BACKENDS = ("tensorflow", "jax", "torch")
FULL = os.environ.get("LSUV_SWEEP") == "full"
RESULTS = os.environ.get("LSUV_SWEEP_RESULTS")


@dataclasses.dataclass(frozen=True)
class Case:
    """A model of the sweep.

    Args:
        name: The family or example, as the docs table shows it.
        source: `"keras-hub"` (a backbone of `hub_models`), `"keras.io"` (a model of `keras_io_models`) or
            `"keras.applications"` (a model of `application_models`).
        builder: The builder's name in its module.
        fast: The backend that runs the case in the fast slice (`make test`).
        limits: What LSUV does not do on this model, for the docs.
        unmeasured: Skip reasons (a part of each) of the targets LSUV leaves alone, with how many, on every
            backend; `jax_unmeasured` adds those of JAX alone.
        xfail: Test (`"init"` or `"fit"`) -> the keras_lsuv defect that breaks it: the test is marked
            `xfail(strict=True)`, so it fails once the defect is fixed and the mark must go. None at present.
        fit_skip: Backend -> why `fit` itself fails there, with or without LSUV.
    """

    name: str
    source: str
    builder: str
    fast: str
    limits: str = ""
    unmeasured: dict = dataclasses.field(default_factory=dict)
    jax_unmeasured: dict = dataclasses.field(default_factory=dict)
    xfail: dict = dataclasses.field(default_factory=dict)
    fit_skip: dict = dataclasses.field(default_factory=dict)


def hub(name, builder, fast, **details):
    return Case(name, "keras-hub", builder, fast, **details)


def keras_io(name, builder, fast, **details):
    return Case(name, "keras.io", builder, fast, **details)


def application(name, builder, fast, **details):
    return Case(name, "keras.applications", builder, fast, **details)


# The backend of each case in the fast slice, chosen so that each backend's share takes about a minute on 2 cores.
# JAX runs eager code op by op, compiling each op for each new shape: a model costs it 5 to 40 s where TensorFlow
# and torch take 1 to 3 s. So JAX gets the transformer encoders, which share their shapes (the first pays for the
# others), and two small keras.io models; TensorFlow and torch split the rest (DeBERTa-v3 on TensorFlow: it is
# twice as slow on torch).
TF, JAX, TORCH = "tensorflow", "jax", "torch"


CASES = [
    hub("GPT-2", "gpt2", TF),
    hub("Llama", "llama", TORCH),
    hub("Mistral", "mistral", TF),
    hub(
        "Mixtral",
        "mixtral",
        TORCH,
        limits="the experts' kernels are weights of one MixtralMoeExperts layer (an einsum over experts): LSUV "
        "scales each expert on every token of the batch, not on the tokens routed to it",
    ),
    hub(
        "Qwen3-MoE",
        "qwen3_moe",
        JAX,
        limits="the experts' kernels are weights of one Qwen3MoeExperts layer (an einsum over experts): LSUV "
        "scales each expert on every token of the batch, not on the tokens routed to it",
    ),
    hub("Gemma", "gemma", TF),
    hub("Phi-3", "phi3", TORCH),
    hub("Qwen", "qwen", TF),
    hub("Falcon", "falcon", TORCH),
    hub("OPT", "opt", TF),
    hub("BLOOM", "bloom", TORCH),
    hub("BERT", "bert", JAX),
    hub(
        "BERT, last layer frozen",
        "bert_frozen_top",
        TORCH,
        limits="the frozen layer's 6 projections are skipped; they share their names with the first layer's, which "
        "are rescaled",
        unmeasured={"frozen": 6},
    ),
    hub("RoBERTa", "roberta", JAX),
    hub("DeBERTa-v3", "deberta_v3", TF),
    hub("DistilBERT", "distil_bert", JAX),
    hub("ELECTRA", "electra", JAX),
    hub("ALBERT", "albert", TF),
    hub("T5", "t5", TF),
    hub("BART", "bart", JAX),
    hub("Whisper", "whisper", TORCH),
    hub("ViT", "vit", TF),
    hub("DeiT", "deit", TORCH),
    hub("DINOv2", "dinov2", TF),
    hub("ResNet", "resnet", TORCH),
    hub(
        "EfficientNet",
        "efficientnet",
        TF,
        limits="the first block's squeeze-and-excite convs exist with a ratio of 0 but are never called: skipped",
        unmeasured={"never built": 2},
    ),
    hub("MobileNet", "mobilenet", TORCH),
    hub("DenseNet", "densenet", TF),
    hub("CSPNet", "cspnet", TORCH),
    hub("VGG", "vgg", TF),
    hub("CLIP", "clip", TF),
    hub(
        "SAM",
        "sam",
        TF,
        limits="on JAX the mask prompt's convs run inside `ops.cond` (JAX control flow) and are left as they were",
        jax_unmeasured={"JAX control flow": 3},
        fit_skip=dict.fromkeys(BACKENDS, "keras-hub's SAMImageSegmenter only supports inference (fit raises)"),
    ),
    hub("SegFormer", "segformer", TORCH),
    hub("DeepLabV3", "deeplab_v3", TORCH),
    keras_io("ConvMixer", "convmixer", TF),
    keras_io("MLP-Mixer", "mlp_mixer", TORCH),
    keras_io("FNet", "fnet", JAX),
    keras_io("gMLP", "gmlp", TF),
    keras_io("ViT (keras.io)", "vit", TORCH),
    keras_io("Text transformer", "text_transformer", TF),
    keras_io("Timeseries transformer", "timeseries_transformer", TORCH),
    keras_io(
        "U-Net",
        "unet",
        TF,
        fit_skip={
            TORCH: "Keras's torch sparse_categorical_crossentropy on per-pixel outputs fails in the backward pass "
            "(RuntimeError: grad_input must be contiguous), with or without LSUV"
        },
    ),
    keras_io(
        "VAE",
        "vae",
        TORCH,
        limits="the sampling layer draws new noise at every call: the decoder is scaled on the draw LSUV's pass saw "
        "(the sweep replays it to check the report)",
    ),
    keras_io(
        "Char-RNN",
        "char_rnn",
        TF,
        limits="the LSTM's input kernel is scaled on its input projection; its recurrent kernel is drawn orthonormal "
        "per gate and not scaled",
    ),
    keras_io(
        "Bidirectional LSTM",
        "bidirectional_lstm",
        TORCH,
        limits="each direction's LSTM input kernel is scaled on its input projection; the recurrent kernels are drawn "
        "orthonormal per gate and not scaled",
    ),
    keras_io("MNIST convnet", "mnist_convnet", TF),
    keras_io("Tabular", "tabular", JAX),
    keras_io("Seq2seq transformer", "seq2seq_transformer", TORCH),
    application("ResNet50", "resnet50", TF),
    application("ConvNeXtTiny", "convnext_tiny", TORCH),
    application("EfficientNetV2B0", "efficientnet_v2_b0", TF),
    # 245 targets: torch takes three times TensorFlow's time on it.
    application("InceptionResNetV2", "inception_resnet_v2", TF),
]


def params(kind):
    return [
        pytest.param(case, id=case.name, marks=[pytest.mark.xfail(strict=True, reason=case.xfail[kind])])
        if kind in case.xfail
        else pytest.param(case, id=case.name)
        for case in CASES
        if FULL or case.fast == BACKEND
    ]


def build(case):
    """The case's model, inputs and `fit` targets; keras-hub backbones and keras.applications models are compiled to
    regress to zeros."""
    if case.source == "keras.io":
        return getattr(keras_io_models, case.builder)()
    if case.source == "keras.applications":
        model, x = getattr(application_models, case.builder)()
    else:
        if importlib.util.find_spec("keras_hub") is None:  # `make test-min`'s environment
            pytest.skip("keras-hub is not installed")
        model, x = getattr(importlib.import_module("hub_models"), case.builder)()
    y = keras.tree.map_structure(lambda t: np.zeros(t.shape, "float32"), model(x, training=False))
    model.compile(optimizer="adam", loss="mse")
    return model, x, y


@pytest.fixture(scope="module")
def results():
    """Each test's results, written to `LSUV_SWEEP_RESULTS` (JSON) when the module is done."""
    found = []
    yield found
    if RESULTS:
        os.makedirs(os.path.dirname(RESULTS) or ".", exist_ok=True)
        with open(RESULTS, "w") as file:
            json.dump(found, file, indent=1)


@contextlib.contextmanager
def recorded(results, case, kind):
    """Yields this test's entry of `results` (case, backend, test) and adds how the test ended to it."""
    entry = {"case": case.name, "source": case.source, "backend": BACKEND, "test": kind, "limits": case.limits}
    try:
        yield entry
    except pytest.skip.Exception as skip:
        entry.update(outcome="skipped", reason=skip.msg)
        results.append(entry)
        raise
    except BaseException as error:
        known = case.xfail.get(kind)
        first_line = (str(error).splitlines() or [""])[0][:200]
        entry.update(
            outcome="xfailed" if known else "failed", xfail=known, error=f"{type(error).__name__}: {first_line}"
        )
        results.append(entry)
        raise
    # A test marked xfail that passes fails the run (strict): its defect is fixed and the mark must go.
    entry["outcome"] = "xpassed" if kind in case.xfail else "passed"
    results.append(entry)


def sub_layers(model):
    return list(model._flatten_layers(include_self=True, recursive=True))


def attribute_names(model):
    return {id(layer): (layer, set(vars(layer))) for layer in sub_layers(model)}


def assert_no_attribute_left(before):
    for layer, names in before.values():
        assert set(vars(layer)) == names, f"{layer.name}: instance attributes {set(vars(layer)) ^ names} changed"


def other_weights(model, select=None, biases=False):
    """Every weight but the kernels of the targets (those `select` chooses), and their biases too if `biases`, copied,
    by variable."""
    targets = [layer for layer in zoo.target_layers(model, select) if layer.built]
    touched = {id(k) for layer in targets for k in _variables_of(layer, biases)}
    return {id(w): (w, np.array(keras.ops.convert_to_numpy(w))) for w in model.weights if id(w) not in touched}


def _variables_of(layer, biases):
    bias = getattr(layer, "bias", None) if biases else None
    return zoo.kernels_of(layer) + ([bias] if bias is not None else [])


def seed_states(model):
    """The states of the seed generators of layers that draw noise in inference too (the VAE's sampling layer).

    LSUV's forward pass advances them as any forward pass does; putting them back before the oracle's pass replays
    the noise LSUV measured on.
    """
    return [(v, keras.ops.copy(v.value)) for v in model.variables if "seed_generator_state" in v.path]


def replay(states):
    for variable, value in states:
        variable.assign(value)


def untargeted_kernels(model):
    """Class name -> count of the trainable weights of 2 or more dimensions that are not a target layer's.

    Embeddings (weights whose path names one: token, position and prompt embeddings) are left out: a lookup or an
    added table, not a linear map of the input. A weight counts for the innermost layer holding it.
    """
    owner = {}
    for layer in reversed(sub_layers(model)):  # descendants come after their ancestors in Keras's walk
        for weight in layer.trainable_weights:
            owner.setdefault(id(weight), type(layer).__name__)
    in_targets = {id(w) for layer in zoo.target_layers(model) for w in layer.weights}  # kernels and biases
    found = {}
    for weight in model.trainable_weights:
        if id(weight) not in in_targets and len(weight.shape) >= 2 and "embed" not in weight.path.lower():
            found[owner[id(weight)]] = found.get(owner[id(weight)], 0) + 1
    return found


def expected_unmeasured(case):
    return {**case.unmeasured, **(case.jax_unmeasured if BACKEND == "jax" else {})}


def unmeasured_by_reason(report, case):
    """How many skipped records each expected reason covers; a reason no expectation names counts as itself.

    Embeddings (chosen through `targets=`) are left out: the expectations are of the default targets.
    """
    found = {}
    for record in report.records:
        if record.skipped and not isinstance(record.layer, keras.layers.Embedding):
            key = next((part for part in expected_unmeasured(case) if part in record.reason), record.reason)
            found[key] = found.get(key, 0) + 1
    return found


@pytest.mark.parametrize("case", params("init"))
def test_lsuv_init(case, results):
    with recorded(results, case, "init") as result:
        _check_lsuv_init(case, result)


def with_embeddings(layer):
    return keras_lsuv.default_targets(layer) or isinstance(layer, keras.layers.Embedding)


@pytest.mark.parametrize("case", params("init"))
def test_lsuv_init_centered_with_embeddings(case):
    _check_lsuv_init(case, {}, center=True, targets=with_embeddings)


@pytest.mark.parametrize("case", params("init"))
def test_lsuv_init_residual_stream(case):
    _check_lsuv_init(case, {}, residual="stream")


def _check_lsuv_init(case, result, **options):
    model, x, _ = build(case)
    model(x, training=False)
    select = options.get("targets")
    before = zoo.kernels_by_layer(model, select)
    attributes = attribute_names(model)
    others = other_weights(model, select, biases=options.get("center", False) or "residual" in options)
    draws = seed_states(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the not-measured and did-not-converge warnings are in the report
        report = keras_lsuv.lsuv_init(model, x, seed=0, verbose=0, **options)
    measured = [r for r in report.records if not r.skipped]
    result.update(
        targets=len(report.records),
        measured=len(measured),
        converged=sum(r.converged for r in measured),
        unmeasured=unmeasured_by_reason(report, case),
        untargeted=untargeted_kernels(model),
        coverage=report.coverage,
    )
    assert_no_attribute_left(attributes)
    for weight, value in others.values():
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), value, err_msg=weight.path)
    replay(draws)
    zoo.assert_report_is_true(model, x, report, before, select=select, in_training="residual" in options)
    assert result["unmeasured"] == expected_unmeasured(case)
    assert measured
    # Centered, the layers of a block shared along a chain (ALBERT) keep moving each other's channel means: each such
    # record says so, and is not counted converged (the oracle checked every converged one is centered). A layer
    # called several times says what its calls measure after the passes; one the settle step moved, that it moved.
    moving = ("calls per pass measure", "as layers after it are rescaled") if options.get("center") else ()
    # With residual="stream", a branch's last layer converges with its merge, which may miss the target where the
    # stream alone is already beyond it.
    missed = {id(layer) for m in report.merges if not m.skipped and not m.converged for layer in m.branch_layers}
    assert all(r.converged or any(m in r.reason for m in moving) or id(r.layer) in missed for r in measured), [
        r for r in measured if not r.converged
    ]
    if "residual" in options:
        result["merges"] = (sum(not m.skipped for m in report.merges), len(report.merges))
    if options.get("center") or "residual" in options:  # none of these models starts stiff (the guide says so)
        assert (report.curvature is None or report.curvature < 1.0) and not report.notes, report.curvature


@pytest.mark.parametrize("case", params("fit"))
def test_callback_in_fit(case, results):
    with recorded(results, case, "fit") as result:
        _check_callback_in_fit(case, result)


def _check_callback_in_fit(case, result):
    if BACKEND in case.fit_skip:
        pytest.skip(case.fit_skip[BACKEND])
    model, x, y = build(case)
    model(x, training=False)
    before = zoo.kernels_by_layer(model)
    attributes = {key: value for key, value in attribute_names(model).items() if value[0] is not model}
    lsuv = keras_lsuv.LSUVCallback(x, seed=0, verbose=0)
    draws = seed_states(model)

    def check(trained_model):
        assert lsuv.report is not None and lsuv.report.skipped_reason is None, lsuv.report
        replay(draws)
        zoo.assert_report_is_true(trained_model, x, lsuv.report, before)
        assert_no_attribute_left(attributes)  # the model itself gains fit's attributes

    model.run_eagerly = not FULL
    one_step = len(keras.tree.flatten(x)[0])  # CLIP's logits pair every image with every text of the batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = model.fit(
            x, y, batch_size=one_step, epochs=1, verbose=0, callbacks=[lsuv, zoo.CheckWhenTrainingBegins(check)]
        )
    result.update(converged=lsuv.report.converged)
    assert np.isfinite(history.history["loss"]).all()
    for weight in zoo.weights_of(model):
        assert np.isfinite(weight).all()


def test_the_docs_table_groups_equal_backends_and_replaces_only_what_lies_between_its_markers(tmp_path):
    path = Path(__file__).resolve().parents[2] / "scripts" / "sweep_table.py"
    spec = importlib.util.spec_from_file_location("sweep_table", path)
    sweep_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep_table)
    case = Case("Toy", "keras.io", "toy", TF, limits="a limit")
    for backend, converged in (("tensorflow", 3), ("jax", 3), ("torch", 2)):
        entries = []
        for kind in ("init", "fit"):
            with recorded(entries, case, kind) as entry:
                entry["backend"] = backend
                if kind == "init":
                    entry.update(
                        targets=4,
                        measured=3,
                        converged=converged,
                        unmeasured={"frozen": 1},
                        untargeted={},
                        coverage=0.875,
                    )
        (tmp_path / f"{backend}.json").write_text(json.dumps(entries))
    page = tmp_path / "page.md"
    page.write_text(f"before\n{sweep_table.START}\nold table\n{sweep_table.END}\nafter\n")
    sweep_table.main([str(tmp_path), str(page)])
    text = page.read_text()
    assert text.startswith(f"before\n{sweep_table.START}\n") and text.endswith(f"{sweep_table.END}\nafter\n")
    assert "old table" not in text
    assert "| Toy | keras.io | TF, JAX | 4 | 3 / 3 (1 frozen: skipped) | 87.5% | a limit |" in text
    assert "| Toy | keras.io | torch | 4 | 2 / 3 (1 frozen: skipped) | 87.5% | a limit |" in text
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        sweep_table.main([str(tmp_path), str(page)])
