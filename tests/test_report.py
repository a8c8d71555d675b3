"""`aic report`: the terminal table says what the rows say; the HTML page holds every plot."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
import subprocess
import sys

import pytest

from services.report import parse_since
from tests.test_api import seed
from tests.test_schema import db_url  # noqa: F401  (fixture)


async def test_report_tables_and_html_plots(db_url, tmp_path):  # noqa: F811
    await seed(db_url, "cam-7", 30)
    out = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "services.cli", "report", "--since", "2h", "--html", str(out)],
                       env={**os.environ, "AIC_DATABASE_URL": db_url}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("cam-7"))
    assert line.split()[1] == "30" and "hybrid" in line
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 4
    for title in ("Bitrate and quality over time", "Rate–distortion", "Latency distribution", "Fallback reasons"):
        assert title in page


def test_since_is_parsed_or_refused_clearly():
    assert parse_since("90m").total_seconds() == 5400
    with pytest.raises(ValueError, match="expected a number"):
        parse_since("yesterday")


@pytest.mark.parametrize("span_s", [0.8, 5, 600])
def test_time_axis_labels_are_distinct_for_short_and_long_runs(span_s):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from services.report import time_axis

    t0 = datetime(2026, 11, 21, 14, 0, tzinfo=timezone.utc)
    fig, ax = plt.subplots()
    ax.plot([t0 + timedelta(seconds=span_s * i / 10) for i in range(11)], range(11))
    time_axis(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    plt.close(fig)
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels
