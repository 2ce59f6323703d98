"""The repository chart's layout: one point per version on each series, axes that span the
values, and nothing drawn where there is no trend."""

from __future__ import annotations

from registry.server.web.chart import BOTTOM, HEIGHT, LEFT, RIGHT, TOP, WIDTH, build_chart


def points(series) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in series.points.split()]


def test_one_point_per_version_inside_the_plot():
    rows = [(n, 100.0 + n, {"gain_recovered": 0.5 + n / 100}) for n in range(1, 11)]
    chart = build_chart(rows, total=10)
    for series in (chart.ratio, chart.fidelity):
        pts = points(series)
        assert len(pts) == 10
        assert [x for x, _ in pts] == sorted(x for x, _ in pts)
        assert pts[0][0] == LEFT and pts[-1][0] == WIDTH - RIGHT
        assert all(TOP <= y <= HEIGHT - BOTTOM for _, y in pts)
        assert pts[-1][1] < pts[0][1]  # rising values go up the chart
    assert chart.fidelity.label == "gain kept" and chart.notes == []
    assert chart.x_ticks[0][1] == "v1" and chart.x_ticks[-1][1] == "v10"


def test_axis_ticks_cover_the_values():
    chart = build_chart([(1, 12.0, None), (2, 97.0, None)], total=2)
    labels = [float(label.rstrip("×")) for _, label in chart.ratio.ticks]
    assert labels[0] <= 12 and labels[-1] >= 97
    assert chart.fidelity is None


def test_versions_without_ratio_are_gaps_and_other_figures_are_used():
    rows = [(1, None, {"top1_agreement": 0.9}), (2, 50.0, {"top1_agreement": 0.95}), (3, 60.0, None)]
    chart = build_chart(rows, total=3)
    assert len(points(chart.ratio)) == 2 and len(points(chart.fidelity)) == 2
    assert chart.fidelity.label == "top-1"


def test_nothing_to_draw():
    assert build_chart([], total=0) is None
    assert build_chart([(1, 10.0, None)], total=1) is None  # one version has no trend
    assert build_chart([(1, None, None), (2, None, {"loss": 1.0})], total=2) is None


def test_many_versions_drop_markers_and_say_what_is_shown():
    rows = [(n, float(n), None) for n in range(1, 1001)]
    chart = build_chart(rows, total=1500)
    assert len(points(chart.ratio)) == 1000 and chart.ratio.dots == []
    assert chart.notes == ["the newest 1000 of 1500 versions"]
