"""`pypeft bench`: a --quick run on a tiny BERT (real `pypeft finetune`
processes), its report, JSON and PNGs; a failing run reported in its row;
the Pareto front."""

import json

import matplotlib.image
import pytest

from pypeft.bench import report, runs
from pypeft.cli import main

from test_cli import csv_data, tiny_model  # noqa: F401 (fixtures)


def test_quick_bench_writes_the_report_and_plots(capsys, tiny_model, csv_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(runs.RUNS, "broken", ("no_such_method", None))  # a run that fails, reported in its row
    folder = tmp_path / "bench"
    code = main(["bench", "--methods", "full,lora,broken", "--model", str(tiny_model), "--data", str(csv_data),
                 "--quick", "--threads", "1", "--no-progress", "--output", str(folder)])
    out = capsys.readouterr().out
    assert code == 0 and "broken: FAILED (exit 2: pypeft finetune: error: argument --method" in out
    data = json.loads((folder / "report.json").read_text())
    by = {r["label"]: r for r in data["runs"]}
    assert by["full"]["ok"] and by["lora"]["ok"] and not by["broken"]["ok"]
    for label in ("full", "lora"):  # the figures are the job's own summary's
        summary = json.loads((folder / "runs" / label / "finetune.json").read_text())["results"]
        assert by[label]["accuracy"] == summary["accuracy_after"]
        assert by[label]["trainable_params"] == summary["trainable_params"]
        assert by[label]["saved_mib"] == round(summary["saved_activation_bytes"] / 2**20, 2) > 0
    assert by["lora"]["trainable_params"] < by["full"]["trainable_params"]
    assert by["lora"]["disk_mib"] < by["full"]["disk_mib"]  # an adapter against the whole model
    assert by["lora"]["ratio_to_full"]["trainable_params"] == round(
        by["lora"]["trainable_params"] / by["full"]["trainable_params"], 3)
    text = (folder / "report.md").read_text()
    assert "| lora |" in text and "| broken | failed: exit 2" in text and "Majority-class baseline" in text
    for name in ("accuracy_vs_memory.png", "accuracy_vs_time.png", "confusion_full.png", "confusion_lora.png"):
        image = matplotlib.image.imread(folder / name)
        assert image.shape[0] > 200 and image.shape[1] > 200  # a real picture
        assert name in text


def test_unknown_methods_are_refused(capsys):
    assert main(["bench", "--methods", "lora,nope"]) == 2
    assert "argument --methods: expected 'all' or some of" in capsys.readouterr().err


def test_pareto_front_keeps_what_nothing_beats():
    points = [(100, 0.9, "a"), (50, 0.8, "b"), (60, 0.7, "c"), (200, 0.95, "d"), (150, 0.85, "e")]
    assert [p[2] for p in report.pareto(points)] == ["b", "a", "d"]


@pytest.mark.parametrize("ok", [True, False])
def test_rows_ratios_are_to_full_finetuning(ok):
    full = runs.Run("full", "full", None, {"accuracy_after": 0.9, "train_seconds": 10.0, "steps": 5,
                                           "trainable_params": 1000, "peak_rss_mib": 400.0}, disk_bytes=2**20)
    lora = runs.Run("lora", "lora", None, {"accuracy_after": 0.8, "train_seconds": 5.0, "steps": 5,
                                           "trainable_params": 10, "peak_rss_mib": 200.0}, disk_bytes=2**18)
    if not ok:
        full.error = "exit 1: boom"
    row = report.rows([full, lora])[1]
    expected = {"trainable_params": 0.01, "peak_rss_mib": 0.5, "train_seconds": 0.5, "disk_mib": 0.25}
    for key, ratio in expected.items():
        assert row["ratio_to_full"][key] == (ratio if ok else None)


@pytest.mark.parametrize("baseline, drawn", [(0.23, False), (0.9, True)])
def test_the_baseline_is_a_line_near_the_points_and_named_when_far_below(baseline, drawn):
    plt = report._pyplot()
    fig, ax = plt.subplots()
    table = [{"ok": True, "majority_baseline": baseline}]
    report._baseline(ax, table, [0.92, 0.97])
    labels = ax.get_legend_handles_labels()[1]
    lines = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [baseline, baseline]]
    if drawn:  # a red line at the baseline, the points' range left to matplotlib
        assert lines and labels == ["majority-class baseline"]
    else:  # the axis keeps to 0.92-0.97 (readable), the legend gives the figure
        low, high = ax.get_ylim()
        assert not lines and baseline < low < 0.92 and 0.97 < high < 1.0
        assert labels == ["majority-class baseline: 0.23\n(below the axis)"]
    plt.close(fig)
