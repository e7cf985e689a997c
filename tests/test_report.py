"""The report's views: dict/JSON round trip, HTML table, plot. Each is checked against a real run."""

import json
import sys

import keras
import numpy as np
import pytest
import zoo

import keras_lsuv
from keras_lsuv import LayerRecord, LSUVReport


def mixed_outcome_run():
    """A run with converged, not converged (softmax output) and skipped (frozen) layers; the model and its report."""
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu", name="first"),
            keras.layers.Dense(32, activation="relu", name="frozen", trainable=False),
            keras.layers.Dense(32, activation="relu", name="third"),
            keras.layers.Dense(4, activation="softmax", name="head"),
        ]
    )
    x = zoo.batch_for(model)
    with pytest.warns(UserWarning, match="'head'.*did not converge"):
        report = keras_lsuv.lsuv_init(model, x, measure="output", seed=0, verbose=0)
    return model, x, report


def output_variances(model, x):
    """Each layer's output variance in a plain forward pass of the Sequential `model`."""
    variances, h = {}, x
    for layer in model.layers:
        h = layer(h)
        variances[layer.name] = float(np.var(keras.ops.convert_to_numpy(h).astype("float64")))
    return variances


@pytest.fixture(scope="module")
def run():
    keras.backend.clear_session()
    return mixed_outcome_run()


def test_dict_round_trips_through_json_and_holds_the_measured_variances(run):
    model, x, report = run
    data = report.to_dict()
    text = json.dumps(data)  # plain types only, or this raises
    assert LSUVReport.from_dict(json.loads(text)) == report

    records = {r["name"]: r for r in data["records"]}
    assert set(records) == {"first", "frozen", "third", "head"}
    assert records["frozen"]["initial_variance"] is None and "frozen" in records["frozen"]["reason"]
    assert records["head"]["converged"] is False
    assert data["measure"] == "output" and data["engine"] == "single_pass"
    measured = output_variances(model, x)
    for name in ("first", "third", "head"):
        assert records[name]["final_variance"] == pytest.approx(measured[name], rel=1e-3)
    assert abs(measured["first"] - 1.0) < 0.1 and records["first"]["converged"] is True
    assert abs(measured["head"] - 1.0) >= 0.1  # a softmax output's variance is below 1/4


def test_records_hold_their_layer_which_looks_them_up_and_stays_out_of_the_dict(run):
    model, _, report = run
    assert [record.layer for record in report.records] == model.layers  # processing order is the model's here
    for layer in model.layers:
        assert report[layer] is report[layer.name] and report[layer].layer is layer
    assert all("layer" not in record for record in report.to_dict()["records"])
    rebuilt = LSUVReport.from_dict(report.to_dict())
    assert rebuilt == report and all(record.layer is None for record in rebuilt.records)
    with pytest.raises(KeyError, match="'outsider'"):
        report[keras.layers.Dense(2, name="outsider")]
    with pytest.raises(ValueError, match=r"unknown keys \['layer'\]"):
        LSUVReport.from_dict({"records": [{"name": "d", "class_name": "Dense", "layer": None}]})


def test_from_dict_follows_the_dataclass_fields():
    record = LayerRecord("dense", "Dense", 0.5, 1.0, 1, True, 1.41, None)
    report = LSUVReport([record], engine="submodel", tolerance=0.05)
    data = report.to_dict()
    assert set(data) == {
        "records",
        "engine",
        "measure",
        "target_variance",
        "tolerance",
        "center",
        "skipped_reason",
        "residual",
        "merges",
        "uncovered",
        "coverage",
        "curvature",
        "notes",
    }
    assert set(data["records"][0]) == {
        "name",
        "class_name",
        "initial_variance",
        "final_variance",
        "iterations",
        "converged",
        "scale",
        "reason",
        "initial_mean",
        "final_mean",
        "merge",
    }
    assert LSUVReport.from_dict(data) == report
    # Missing fields take their defaults (a dict from an older version).
    assert LSUVReport.from_dict({"records": [{"name": "d", "class_name": "Dense"}]}) == LSUVReport(
        [LayerRecord("d", "Dense")]
    )


@pytest.mark.parametrize(
    "data, message",
    [
        ({"records": [], "typo": 1}, r"the report has unknown keys \['typo'\]"),
        ({"records": [{"name": "d", "class_name": "Dense", "varience": 1.0}]}, r"unknown keys \['varience'\]"),
        ({"records": [{"name": "d"}]}, r"lacks the keys \['class_name'\]"),
        ({"records": None}, r"'records' must be a list of dicts, one per layer; got None \(NoneType\)"),
        ({"records": "dense"}, r"'records' must be a list of dicts.*\(str\)"),
        ({"records": {"name": "d", "class_name": "Dense"}}, r"'records' must be a list of dicts.*\(dict\)"),
        ({"records": [{"name": "d", "class_name": "Dense"}, None]}, r"records\[1\] must be a dict; got None"),
        ({"records": [["d", "Dense"]]}, r"records\[0\] must be a dict; got \['d', 'Dense'\] \(list\)"),
        ({"records": [], 1: 0, "typo": 0}, r"the report has unknown keys \[1, 'typo'\]"),
        ([{"name": "d", "class_name": "Dense"}], r"takes a dict as to_dict\(\) returns it; got \[.*\(list\)"),
        ("report", r"takes a dict as to_dict\(\) returns it; got 'report' \(str\)"),
        (None, r"takes a dict.*got None \(NoneType\)"),
        ({"merges": {"name": "add"}}, r"'merges' must be a list of dicts, one per merge.*\(dict\)"),
        ({"merges": [None]}, r"merges\[0\] must be a dict; got None"),
        ({"merges": [{"name": "add", "scal": 1.0}]}, r"merges\[0\] has unknown keys \['scal'\]"),
        ({"merges": [{"scale": 1.0}]}, r"merges\[0\] lacks the key 'name'"),
        ({"uncovered": {"name": "lstm_cell"}}, r"'uncovered' must be a list of dicts, one per layer.*\(dict\)"),
        ({"uncovered": [None]}, r"uncovered\[0\] must be a dict; got None"),
        ({"uncovered": [{"name": "lstm_cell"}]}, r"uncovered\[0\] lacks the keys \['class_name'\]"),
    ],
)
def test_from_dict_rejects_what_is_not_a_report(data, message):
    with pytest.raises(ValueError, match=message):
        LSUVReport.from_dict(data)


def test_html_table_has_the_text_columns_and_highlights_rows_not_converged(run):
    _, _, report = run
    page = report._repr_html_()
    for column in ("layer", "class", "initial var", "final var", "iters", "scale", "status"):
        assert f"<th>{column}</th>" in page
    rows = page.split("<tr")[2:]  # after the header row
    assert len(rows) == len(report.records)
    for record, row in zip(report.records, rows, strict=True):
        assert f"<td>{record.name}</td>" in row
        highlighted = "background-color" in row
        assert highlighted == (not record.skipped and not record.converged), row
    assert "NOT CONVERGED" in rows[[r.name for r in report.records].index("head")]
    assert "2/3 layers converged, 1 skipped" in page


def test_html_escapes_and_shows_a_skipped_run():
    report = LSUVReport([LayerRecord("a<b>", "Dense", 2.0, 3.0, 10, False, 1.0, "x & y")])
    page = report._repr_html_()
    assert "<td>a&lt;b&gt;</td>" in page and "x &amp; y" in page
    skipped = LSUVReport(skipped_reason="the model has already been trained")
    assert "already been trained" in skipped._repr_html_()


def test_plot_draws_before_after_band_and_marks(run):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, report = run
    ax = report.plot()
    try:
        assert ax.get_yscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == [r.name for r in report.records]
        offsets = {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections if c.get_label()[0] != "_"}
        processed = {i: r for i, r in enumerate(report.records) if not r.skipped}
        after = np.concatenate([offsets["after (converged)"], offsets["after (not converged)"]])
        assert sorted(after[:, 0]) == sorted(processed)
        for i, variance in after:
            assert variance == pytest.approx(processed[int(i)].final_variance)
        head = [i for i, r in processed.items() if r.name == "head"]
        assert list(offsets["before (not converged)"][:, 0]) == head
        frozen = [i for i, r in enumerate(report.records) if r.skipped]
        assert list(offsets["skipped"][:, 0]) == frozen
        band = [p for p in ax.patches if p.get_label().startswith("target")]
        assert len(band) == 1
        assert ax.get_legend() is not None
    finally:
        plt.close(ax.figure)

    figure, given = plt.subplots()
    try:
        assert report.plot(ax=given) is given
    finally:
        plt.close(figure)


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # makes `import matplotlib.pyplot` fail
    with pytest.raises(ImportError, match=r"keras-lsuv\[plot\]"):
        LSUVReport().plot()


def test_report_figure_script_draws_the_guide_figure(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "report_figure.py"
    spec = importlib.util.spec_from_file_location("report_figure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--output", str(tmp_path / "report.png")])
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_assert_converged_lists_each_layer_not_converged_with_its_reason(run):
    model, x, report = run
    with pytest.raises(AssertionError, match=r"1 of 3 layers did not converge:\n  'head' \(Dense\): .+") as caught:
        report.assert_converged()
    assert "frozen" not in str(caught.value)  # left alone on purpose: not a failure


def test_assert_converged_returns_the_report_of_a_converged_run_and_fails_a_skipped_one():
    model = zoo.small_mlp()
    report = zoo.run(model, zoo.batch_for(model))
    assert report.assert_converged() is report
    skipped = LSUVReport(skipped_reason="the model has already been trained (3 optimizer steps)")
    with pytest.raises(AssertionError, match=r"LSUV did not run: the model has already been trained"):
        skipped.assert_converged()


def test_a_centered_run_shows_the_means_in_the_table_html_and_dict():
    model = zoo.small_mlp()
    x = zoo.batch_for(model) + np.float32(3.0)
    report = zoo.run(model, x, center=True)
    text, page = str(report), report._repr_html_()
    assert "initial mean  final mean" in text and "centered" in text.splitlines()[-1]
    assert "<th>initial mean</th><th>final mean</th><th>status</th>" in page
    data = json.loads(json.dumps(report.to_dict()))
    assert data["center"] is True
    assert all(abs(r["final_mean"]) < 1e-3 and r["initial_mean"] is not None for r in data["records"])
    assert LSUVReport.from_dict(data) == report
    assert "initial mean" not in str(zoo.run(zoo.small_mlp(), x))  # a plain run measures no means
