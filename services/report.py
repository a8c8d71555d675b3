"""``aic report``: what the pipeline did, as tables in the terminal and an HTML page with plots.

Reads the metrics database: per-minute rollups for the per-stream table and
the fallback counts, raw rows (the newest 20,000) for the per-batch time
series, the rate–distortion scatter and the latency distribution.  The HTML is one self-contained file (plots embedded as PNG).
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

STREAM_SQL = """
    SELECT stream_id, sum(batches)::bigint AS batches, sum(ok)::bigint AS ok, sum(rejected + failed)::bigint AS rejects,
           string_agg(DISTINCT nullif(codec, ''), ',') AS codecs,
           sum(compressed_bytes)::bigint AS bytes, sum(kbps_mean * ok) / nullif(sum(ok), 0) AS kbps,
           sum(psnr_y_mean * ok) / nullif(sum(ok), 0) AS psnr_y, min(psnr_y_min) AS psnr_y_min,
           max(latency_p95_ms) AS p95_ms,
           sum(fallback_quality)::bigint AS fb_quality, sum(fallback_size)::bigint AS fb_size,
           sum(fallback_latency)::bigint AS fb_latency, sum(fallback_error)::bigint AS fb_error
    FROM batch_rollup_1m WHERE bucket >= date_trunc('minute', $1::timestamptz) AND ($2::text IS NULL OR stream_id = $2)
    GROUP BY stream_id ORDER BY stream_id
"""
#: What the user saved, from the rows themselves (exact): bytes against raw frames, and against the
#: native coding at matched quality that 1 batch in N also gets (``baseline_bytes``, the policy's sample).
SAVED_SQL = """
    SELECT stream_id, count(*) AS batches, coalesce(sum(raw_bytes), 0)::bigint AS raw_bytes,
           coalesce(sum(compressed_bytes), 0)::bigint AS compressed_bytes,
           count(baseline_bytes) AS sampled,
           coalesce(sum(compressed_bytes) FILTER (WHERE baseline_bytes IS NOT NULL), 0)::bigint AS sampled_bytes,
           coalesce(sum(baseline_bytes), 0)::bigint AS baseline_bytes
    FROM batch_metrics WHERE time >= $1 AND status = 'ok' AND ($2::text IS NULL OR stream_id = $2)
    GROUP BY stream_id ORDER BY stream_id
"""
RAW_SQL = """
    SELECT time, stream_id, batch_seq, codec, compressed_bytes, frames, width, height, kbps, psnr_y, latency_ms,
           encode_ms, quality_ms
    FROM batch_metrics WHERE time >= $1 AND status = 'ok' AND ($2::text IS NULL OR stream_id = $2)
    ORDER BY time DESC LIMIT 20000
"""


def parse_since(spec: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``2d`` → a timedelta."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", spec.strip())
    if not m:
        raise ValueError(f"--since {spec!r}: expected a number and s, m, h or d (e.g. 1h)")
    return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m[2]]: float(m[1])})


async def fetch(url: str, since: datetime, stream_id: str | None) -> dict:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return {
            "streams": [dict(r) for r in await conn.fetch(STREAM_SQL, since, stream_id)],
            "saved": [dict(r) for r in await conn.fetch(SAVED_SQL, since, stream_id)],
            "raw": [dict(r) for r in await conn.fetch(RAW_SQL, since, stream_id)],
        }
    finally:
        await conn.close()


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(streams: list[dict]) -> str:
    head = (f"{'stream':24} {'batches':>7} {'codecs':14} {'kbps':>8} {'PSNR-Y':>7} {'min':>6} {'p95 ms':>8} "
            f"{'fallbacks q/s/l/e':>18} {'rejects':>7}")
    lines = [head, "-" * len(head)]
    for s in streams:
        fb = f"{s['fb_quality']}/{s['fb_size']}/{s['fb_latency']}/{s['fb_error']}"
        lines.append(f"{s['stream_id'][:24]:24} {s['batches']:>7} {(s['codecs'] or '-')[:14]:14} "
                     f"{_f(s['kbps'], '8.1f')} {_f(s['psnr_y'], '7.2f')} {_f(s['psnr_y_min'], '6.2f')} "
                     f"{_f(s['p95_ms'], '8.1f')} {fb:>18} {s['rejects']:>7}")
    if not streams:
        lines.append("(no batches in this period)")
    return "\n".join(lines)


def savings(rows: list[dict]) -> list[dict]:
    """Per stream and in total (stream ``all``): bytes sent, against raw and against the sampled native
    baseline (on the batches that have one)."""
    if not rows:
        return []
    total = {"stream_id": "all", **{k: sum(r[k] for r in rows) for k in rows[0] if k != "stream_id"}}
    out = []
    for r in [*rows, total] if len(rows) > 1 else rows:
        raw, sent = r["raw_bytes"], r["compressed_bytes"]
        out.append({**r, "saved_vs_raw": 1 - sent / raw if raw else None,
                    "ratio": raw / sent if sent else None,
                    "vs_native": r["sampled_bytes"] / r["baseline_bytes"] - 1 if r["baseline_bytes"] else None})
    return out


def saved_table(rows: list[dict]) -> str:
    head = (f"{'stream':24} {'batches':>7} {'raw MB':>10} {'sent MB':>9} {'saved vs raw':>12} {'raw:sent':>9} "
            f"{'sampled':>7} {'vs native':>9}")
    lines = [head, "-" * len(head)]
    for r in savings(rows):
        vs = "-" if r["vs_native"] is None else f"{100 * r['vs_native']:+.1f}%"
        lines.append(f"{r['stream_id'][:24]:24} {r['batches']:>7} {r['raw_bytes'] / 1e6:>10.1f} "
                     f"{r['compressed_bytes'] / 1e6:>9.2f} {_f(r['saved_vs_raw'] and 100 * r['saved_vs_raw'], '11.2f')}% "
                     f"{_f(r['ratio'], '8.0f')}:1 {r['sampled']:>7} {vs:>9}")
    if not rows:
        lines.append("(no batches in this period)")
    lines.append("vs native: bytes sent on the sampled batches against the native coding of the same batches at "
                 "matched quality (the policy's 1 batch in N); negative is fewer bytes than native.")
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(data: dict) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each figure of the HTML report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("aic report: --html needs matplotlib (pip install 'aic[bench]')") from None
    out = []
    # Per batch from the raw rows (a short period has a single minute bucket per stream).
    by_stream: dict[str, list[dict]] = {}
    for r in sorted(data["raw"], key=lambda r: r["time"]):
        if r["compressed_bytes"] and r["frames"]:
            by_stream.setdefault(r["stream_id"], []).append(r)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for sid, rows in by_stream.items():
        # Against the batch number, the stream's own clock: a file coded at full speed is not squeezed
        # into a streak of capture time, and a live one reads the same.
        rows = sorted((r for r in rows if r["batch_seq"] is not None), key=lambda r: r["batch_seq"])
        seqs = [r["batch_seq"] for r in rows]
        a1.plot(seqs, [r["kbps"] for r in rows], marker=".", label=sid)
        a2.plot(seqs, [r["psnr_y"] for r in rows], marker=".", label=sid)
    a1.set_ylabel("kbps (per batch)")
    a2.set_ylabel("PSNR-Y dB (per batch)")
    a2.set_xlabel("batch number (the stream's media time, one batch of frames per step)")
    a1.legend(fontsize=7, ncol=3)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    out.append(("Bitrate and quality along each stream", _png(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    by_codec: dict[str, list[dict]] = {}
    for r in data["raw"]:
        if r["compressed_bytes"] and r["frames"] and r["width"] and r["height"] and r["psnr_y"] is not None:
            by_codec.setdefault(r["codec"], []).append(r)
    for codec, rows in sorted(by_codec.items()):
        bpp = [8 * r["compressed_bytes"] / (r["frames"] * r["width"] * r["height"]) for r in rows]
        ax.scatter(bpp, [min(r["psnr_y"], 60) for r in rows], s=8, alpha=0.6, label=codec)
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (per batch)")
    ax.set_ylabel("PSNR-Y dB")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    out.append(("Rate–distortion of delivered batches, by codec", _png(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    timed = [r for r in data["raw"] if r["latency_ms"] is not None and r["encode_ms"] is not None]
    coding = [r["encode_ms"] + (r["quality_ms"] or 0) for r in timed]
    waiting = [max(0.0, r["latency_ms"] - c) for r, c in zip(timed, coding)]
    if timed:
        ax.hist([waiting, coding], bins=40, range=(0, max(1.0, max(r["latency_ms"] for r in timed))), label=["waiting (queue, reference, bus)",
                                                                      "coding (encode and quality)"],
                color=["tab:gray", "tab:blue"], alpha=0.8)
        ax.legend()
    ax.set_xlabel("per batch (ms): end-to-end latency = waiting + coding")
    ax.set_ylabel("batches")
    out.append(("Latency, split into waiting and coding", _png(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    reasons = ("quality", "size", "latency", "error")
    counts = [sum(s[f"fb_{k}"] for s in data["streams"]) for k in reasons]
    ax.bar(reasons, counts, color=["tab:orange", "tab:green", "tab:red", "tab:gray"])
    ax.set_ylabel("batches sent natively")
    if not any(counts):
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "no fallbacks in this period", ha="center", transform=ax.transAxes)
    out.append(("Fallback reasons", _png(fig)))
    plt.close(fig)
    return out


def render_html(data: dict, since: datetime, until: datetime, stream_id: str | None) -> str:
    figs = "\n".join(f'<h2>{html.escape(t)}</h2>\n<img alt="{html.escape(t)}" src="data:image/png;base64,{b64}">'
                     for t, b64 in plots(data))
    scope = html.escape(stream_id) if stream_id else "all streams"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>aic report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} pre{{background:#f4f4f4;padding:1em;
overflow-x:auto}} img{{max-width:100%;border:1px solid #ddd}}</style></head><body>
<h1>aic report</h1>
<p>{scope}, {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC; per-minute rollups and up to 20,000 raw rows.</p>
<h2>What you saved</h2>
<pre>{html.escape(saved_table(data["saved"]))}</pre>
<h2>Streams</h2>
<pre>{html.escape(table(data["streams"]))}</pre>
{figs}
</body></html>
"""


async def _refresh(url: str) -> None:
    from services.metrics.migrations import refresh_rollups

    conn = await asyncpg.connect(url)
    try:
        await refresh_rollups(conn)
    finally:
        await conn.close()


def run(url: str, since: str, stream_id: str | None, html_out: Path | None, refresh: bool = False) -> int:
    """Print the per-stream table and write the HTML report; ``refresh`` first brings the rollups
    up to date (benchmarks that report right after their last row, without waiting for the
    metrics service's next refresh)."""
    if refresh:
        asyncio.run(_refresh(url))
    until = datetime.now(timezone.utc)
    start = until - parse_since(since)
    data = asyncio.run(fetch(url, start, stream_id))
    print(saved_table(data["saved"]))
    print()
    print(table(data["streams"]))
    if html_out:
        html_out.write_text(render_html(data, start, until, stream_id))
        print(f"\nHTML report: {html_out}")
    return 0
