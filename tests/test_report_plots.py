"""The report's and the probe's PNGs read well: bars start at 0, tick labels never overlap, plurals agree.

Each plot function is run on the report fixtures (or a probe summary) with ``Figure.savefig``
recording the figure, so the test reads the axes the PNG was drawn from.
"""

from __future__ import annotations

from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib", reason="the report extra is not installed")
matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from progtuning.runs import report_plots  # noqa: E402
from progtuning.runs.report import build_report, load_runs, summarize_runs  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "results"


@pytest.fixture
def saved_figures(monkeypatch):
    figures: list[Figure] = []
    original = Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def _tick_labels_overlap(ax) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(ax.figure)  # a closed figure has lost its own canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


@pytest.mark.parametrize("values", [[3.1e6, 13.9e6], [750, 900], [2.0e6, 2.3e6], [3e4, 4e7]])
def test_the_parameter_axis_labels_never_overlap(values):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    ax.scatter(values, [0.5] * len(values))
    report_plots._parameter_axis(ax, values)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert not _tick_labels_overlap(ax), labels
    low, high = ax.get_xlim()
    assert low < min(values) and max(values) < high  # no point on the frame
    assert ax.get_xscale() == ("log" if max(values) / min(values) >= 10 else "linear")
    plt.close(fig)


def test_report_bars_start_at_zero_and_show_their_values(tmp_path, saved_figures):
    runs = load_runs([FIXTURES])
    report_plots.plot_bars(summarize_runs(runs, "test"), tmp_path / "bars.png")
    [fig] = saved_figures
    for ax in fig.axes:
        assert ax.get_ylim()[0] == 0
        assert [t.get_text() for t in ax.texts] and all(t.get_text().startswith("0.") for t in ax.texts)


def test_the_scatter_of_a_narrow_span_is_linear_with_readable_labels(tmp_path, saved_figures):
    runs = load_runs([FIXTURES])  # 750 vs 900 and 20 vs 30 updated parameters: less than 10x
    report_plots.plot_metric_vs_params(runs, tmp_path / "scatter.png")
    [fig] = saved_figures
    for ax in fig.axes:
        assert ax.get_xscale() == "linear" and not _tick_labels_overlap(ax)


def test_probe_bars_start_at_zero_and_say_1_epoch(tmp_path, saved_figures):
    rows = [{"block": b, "validation": [0.6 + 0.05 * b], "validation_median": 0.6 + 0.05 * b,
             "validation_min": 0.6 + 0.05 * b, "validation_max": 0.6 + 0.05 * b} for b in range(3)]
    summary = {"blocks": rows, "full": None, "metric": "accuracy", "task": "trec6", "model": "tiny",
               "method": "full", "budget": {"max_train_examples": 1, "epochs": 1}}
    report_plots.plot_probe(summary, tmp_path / "probe.png")
    summary["budget"] = {"max_train_examples": 1000, "epochs": 2.5}
    report_plots.plot_probe(summary, tmp_path / "probe2.png")
    first, second = (fig.axes[0] for fig in saved_figures)
    assert first.get_ylim()[0] == 0
    assert first.get_title().endswith("1 training example, 1 epoch")
    assert second.get_title().endswith("1,000 training examples, 2.5 epochs")


def test_every_png_of_the_fixture_report_is_written(tmp_path):
    written = build_report([FIXTURES], tmp_path)
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert pngs == ["bars.png", "metric_vs_params.png", "timelines/tiny_rotten-tomatoes_full.png",
                    "timelines/tiny_trec6_lora.png"] and written["runs"] == 11
