"""`aic report`: the terminal table says what the rows say; the HTML page holds every plot."""

from __future__ import annotations

import os
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
    saved, streams = [x for x in r.stdout.splitlines() if x.startswith("cam-7")]
    # The first table says what the user saved: 6 sampled batches sent 6075 bytes where native took 12000.
    assert saved.split()[1] == "30" and saved.split()[-2:] == ["6", "-49.4%"]
    assert streams.split()[1] == "30" and "hybrid" in streams
    page = out.read_text()
    assert page.index("What you saved") < page.index("Streams")
    assert page.count("data:image/png;base64,") == 4
    for title in ("Bitrate and quality along each stream", "Rate–distortion", "Latency, split into waiting and coding",
                  "Fallback reasons"):
        assert title in page


def test_since_is_parsed_or_refused_clearly():
    assert parse_since("90m").total_seconds() == 5400
    with pytest.raises(ValueError, match="expected a number"):
        parse_since("yesterday")


def test_savings_are_against_raw_and_against_the_sampled_native_baseline():
    from services.report import savings

    rows = [{"stream_id": "a", "batches": 10, "raw_bytes": 1000, "compressed_bytes": 100, "sampled": 2,
             "sampled_bytes": 30, "baseline_bytes": 40},
            {"stream_id": "b", "batches": 10, "raw_bytes": 1000, "compressed_bytes": 300, "sampled": 0,
             "sampled_bytes": 0, "baseline_bytes": 0}]
    a, b, total = savings(rows)
    assert a["saved_vs_raw"] == pytest.approx(0.9) and a["ratio"] == 10 and a["vs_native"] == pytest.approx(-0.25)
    assert b["vs_native"] is None  # no sampled batch: no claim
    assert total["stream_id"] == "all" and total["saved_vs_raw"] == pytest.approx(0.8)
