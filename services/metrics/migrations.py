"""Versioned schema migrations, applied in order under an advisory lock.

Applied by the metrics service at start (and by ``aic db migrate``); each
version runs once, in its own transaction.
"""

from __future__ import annotations

import asyncpg

_LOCK_KEY = 0x61696301  # "aic\x01": serialises concurrent migrators

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "batch_metrics: one row per batch",
        """
        CREATE TABLE batch_metrics (
            batch_id          text PRIMARY KEY,
            stream_id         text NOT NULL,
            batch_seq         bigint,
            status            text NOT NULL CHECK (status IN ('ok', 'rejected', 'failed')),
            reason            text,
            worker_id         text NOT NULL,
            codec             text,
            codec_params      text,
            frames            integer,
            width             integer,
            height            integer,
            raw_bytes         bigint,
            compressed_bytes  bigint,
            kbps              double precision,
            psnr_y            double precision,
            psnr_rgb          double precision,
            ms_ssim           double precision,
            ms_ssim_frames    integer,
            encode_ms         double precision,
            quality_ms        double precision,
            latency_ms        double precision,
            attempts          integer,
            captured_at       timestamptz,
            completed_at      timestamptz NOT NULL,
            inserted_at       timestamptz NOT NULL DEFAULT now(),
            extra             jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX batch_metrics_stream_time ON batch_metrics (stream_id, completed_at);
        CREATE INDEX batch_metrics_time ON batch_metrics USING brin (completed_at);
        """,
    ),
    (
        2,
        "batch_metrics: codec policy (level, fallback reason, native baseline)",
        """
        ALTER TABLE batch_metrics
            ADD COLUMN level           integer,
            ADD COLUMN fallback_reason text CHECK (fallback_reason IN ('quality', 'size', 'latency', 'error')),
            ADD COLUMN baseline_bytes  bigint;
        """,
    ),
]


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; returns the versions applied now."""
    applied_now = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS aic_schema_migrations (
                   version integer PRIMARY KEY,
                   description text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM aic_schema_migrations")}
        for version, description, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO aic_schema_migrations (version, description) VALUES ($1, $2)", version, description
            )
            applied_now.append(version)
    return applied_now
