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
