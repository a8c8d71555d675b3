"""Read-side queries over the rollups and raw rows: what the HTTP API and ``aic report`` ask.

Each function takes a connection and plain filters and returns JSON-ready dicts.
Summaries read the hourly or minutely rollups (small); raw rows are read only
for listings and distributions, always through (stream_id, time) or time.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg


async def performance_summary(conn: asyncpg.Connection, since: datetime, until: datetime,
                              stream_id: str | None = None, tenant: str | None = None) -> list[dict]:
    """Per codec and mode over [since, until): batches, bytes, kbps, quality, worst p95 latency, fallbacks."""
    rows = await conn.fetch(
        """
        SELECT codec, mode, sum(batches)::bigint AS batches, sum(ok)::bigint AS ok, sum(rejected)::bigint AS rejected, sum(failed)::bigint AS failed,
               sum(frames)::bigint AS frames, sum(raw_bytes)::bigint AS raw_bytes, sum(compressed_bytes)::bigint AS compressed_bytes,
               sum(kbps_mean * ok) / nullif(sum(ok), 0) AS kbps_mean,
               sum(psnr_y_mean * ok) / nullif(sum(ok), 0) AS psnr_y_mean, min(psnr_y_min) AS psnr_y_min,
               max(latency_p95_ms) AS latency_p95_ms_worst_hour,
               sum(fallback_quality)::bigint AS fallback_quality, sum(fallback_size)::bigint AS fallback_size,
               sum(fallback_latency)::bigint AS fallback_latency, sum(fallback_error)::bigint AS fallback_error
        FROM batch_rollup_1h
        WHERE bucket >= date_trunc('hour', $1::timestamptz) AND bucket < $2 AND ($3::text IS NULL OR stream_id = $3)
          AND ($4::text IS NULL OR aic_tenant(stream_id) = $4)
        GROUP BY codec, mode ORDER BY codec, mode
        """,
        since, until, stream_id, tenant,
    )
    return [dict(r) for r in rows]


async def live_window(conn: asyncpg.Connection, seconds: float, tenant: str | None = None) -> list[dict]:
    """Per stream, the rows completed in the last ``seconds`` (``aic top``): frames and bytes, status
    counts, latency p50/p99 split into coding (encode and quality measurement) and the rest (waiting
    in the queue, for a reference, on the bus), codec and key-frame mix, fallbacks."""
    rows = await conn.fetch(
        """
        WITH w AS (
            SELECT * FROM batch_metrics
            WHERE time >= now() - make_interval(secs => $1 + 600) AND completed_at >= now() - make_interval(secs => $1)
              AND ($2::text IS NULL OR aic_tenant(stream_id) = $2)
        )
        SELECT stream_id, count(*) AS batches, count(*) FILTER (WHERE status = 'ok') AS ok,
               count(*) FILTER (WHERE status <> 'ok') AS not_ok,
               coalesce(sum(frames) FILTER (WHERE status = 'ok'), 0)::bigint AS frames,
               coalesce(sum(raw_bytes), 0)::bigint AS raw_bytes, coalesce(sum(compressed_bytes), 0)::bigint AS compressed_bytes,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS latency_p50_ms,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS latency_p99_ms,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY encode_ms + coalesce(quality_ms, 0)) AS coding_p50_ms,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY encode_ms + coalesce(quality_ms, 0)) AS coding_p99_ms,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms - encode_ms - coalesce(quality_ms, 0)) AS wait_p50_ms,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms - encode_ms - coalesce(quality_ms, 0)) AS wait_p99_ms,
               count(*) FILTER (WHERE fallback_reason IS NOT NULL) AS fallbacks,
               (SELECT jsonb_object_agg(codec, n) FROM (SELECT codec, count(*) AS n FROM w w2
                    WHERE w2.stream_id = w.stream_id AND codec IS NOT NULL GROUP BY codec) c) AS codecs,
               (SELECT jsonb_object_agg(coalesce(keyframe_reason, 'chained'), n) FROM (SELECT keyframe_reason, count(*) AS n
                    FROM w w3 WHERE w3.stream_id = w.stream_id AND status = 'ok' GROUP BY keyframe_reason) k) AS keyframes
        FROM w GROUP BY stream_id ORDER BY stream_id
        """,
        float(seconds), tenant,
    )
    return [dict(r) for r in rows]
