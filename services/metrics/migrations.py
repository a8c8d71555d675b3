"""Versioned schema migrations, applied in order under an advisory lock, and partition upkeep.

Applied by the metrics service at start (and by ``aic db migrate``); each
version runs once, and all pending versions apply in one transaction, so a
failure leaves the schema as it was.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import asyncpg

from shared.roles import DB_READER, DB_WRITER

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
    (
        3,
        "batch_metrics: range-partitioned by day on event time, idempotent on (batch_id, time)",
        # PostgreSQL requires the partition key in every unique constraint, so the key is an event
        # time that every delivery of a batch shares: the gateway's capture time (or, for a batch that
        # could not be read, when JetStream stored it) — never the worker's completion time, which a
        # redelivery changes.
        """
        CREATE TABLE batch_metrics_partitioned (
            LIKE batch_metrics INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
            time timestamptz NOT NULL,
            PRIMARY KEY (batch_id, time)
        ) PARTITION BY RANGE (time);
        CREATE FUNCTION aic_ensure_partition(day date) RETURNS boolean LANGUAGE plpgsql AS $$
        DECLARE
            name text := format('batch_metrics_%s', to_char(day, 'YYYYMMDD'));
        BEGIN
            IF to_regclass(name) IS NOT NULL THEN
                RETURN false;
            END IF;
            EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF batch_metrics FOR VALUES FROM (%L) TO (%L)',
                           name, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
            RETURN true;
        END $$;
        CREATE FUNCTION aic_drop_partitions_before(cutoff date) RETURNS integer LANGUAGE plpgsql AS $$
        DECLARE
            part record;
            dropped integer := 0;
        BEGIN
            FOR part IN
                SELECT c.relname FROM pg_inherits i
                JOIN pg_class c ON c.oid = i.inhrelid
                JOIN pg_class p ON p.oid = i.inhparent
                WHERE p.relname = 'batch_metrics' AND c.relname ~ '^batch_metrics_[0-9]{8}$'
                  AND to_date(right(c.relname, 8), 'YYYYMMDD') < cutoff
            LOOP
                EXECUTE format('DROP TABLE %I', part.relname);
                dropped := dropped + 1;
            END LOOP;
            RETURN dropped;
        END $$;
        ALTER TABLE batch_metrics RENAME TO batch_metrics_unpartitioned;
        ALTER TABLE batch_metrics_partitioned RENAME TO batch_metrics;
        SELECT aic_ensure_partition(d::date)
            FROM (SELECT DISTINCT date_trunc('day', coalesce(captured_at, completed_at) AT TIME ZONE 'UTC') AS d
                  FROM batch_metrics_unpartitioned) days;
        INSERT INTO batch_metrics SELECT *, coalesce(captured_at, completed_at) FROM batch_metrics_unpartitioned;
        DROP TABLE batch_metrics_unpartitioned;
        CREATE INDEX batch_metrics_stream_time ON batch_metrics (stream_id, time);
        CREATE INDEX batch_metrics_time ON batch_metrics USING brin (time);
        """,
    ),
    (
        4,
        "rollups: per-minute and per-hour aggregates kept from dirty buckets; mode column; views",
        # Continuous aggregates without TimescaleDB.  The writer marks the minute of every row it
        # inserts as dirty, in the same transaction; aic_refresh_rollups() recomputes exactly those
        # minutes and their hours from the raw rows (percentiles cannot be merged from minutes), so a
        # late record refreshes its old bucket and a redelivered one changes nothing.  Buckets nobody
        # touches are final.
        """
        ALTER TABLE batch_metrics ADD COLUMN mode text
            CHECK (mode IN ('conservative', 'adaptive', 'aggressive', 'off'));
        CREATE TABLE rollup_dirty (bucket timestamptz PRIMARY KEY);
        CREATE TABLE batch_rollup_1m (
            bucket            timestamptz NOT NULL,
            stream_id         text NOT NULL,
            worker_id         text NOT NULL,
            codec             text NOT NULL,
            mode              text NOT NULL,
            batches           bigint NOT NULL,
            ok                bigint NOT NULL,
            rejected          bigint NOT NULL,
            failed            bigint NOT NULL,
            frames            bigint NOT NULL,
            raw_bytes         bigint NOT NULL,
            compressed_bytes  bigint NOT NULL,
            kbps_mean         double precision,
            psnr_y_mean       double precision,
            psnr_y_min        double precision,
            ms_ssim_mean      double precision,
            ms_ssim_min       double precision,
            latency_p50_ms    double precision,
            latency_p95_ms    double precision,
            latency_p99_ms    double precision,
            fallback_quality  bigint NOT NULL,
            fallback_size     bigint NOT NULL,
            fallback_latency  bigint NOT NULL,
            fallback_error    bigint NOT NULL,
            sampled           bigint NOT NULL,
            sampled_bytes     bigint NOT NULL,
            baseline_bytes    bigint NOT NULL,
            refreshed_at      timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (bucket, stream_id, worker_id, codec, mode)
        );
        CREATE TABLE batch_rollup_1h (LIKE batch_rollup_1m INCLUDING ALL);
        CREATE INDEX batch_rollup_1m_stream ON batch_rollup_1m (stream_id, bucket);
        CREATE INDEX batch_rollup_1h_stream ON batch_rollup_1h (stream_id, bucket);
        CREATE FUNCTION aic_rollup(target regclass, unit text, buckets timestamptz[]) RETURNS void
        LANGUAGE plpgsql AS $$
        DECLARE
            lo timestamptz := (SELECT min(b) FROM unnest(buckets) b);
            hi timestamptz := (SELECT max(b) FROM unnest(buckets) b) + ('1 ' || unit)::interval;
        BEGIN
            EXECUTE format('DELETE FROM %s WHERE bucket = ANY($1)', target) USING buckets;
            EXECUTE format($q$
                INSERT INTO %s
                SELECT date_trunc(%L, time), stream_id, worker_id, coalesce(codec, ''), coalesce(mode, 'adaptive'),
                       count(*), count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE status = 'rejected'),
                   count(*) FILTER (WHERE status = 'failed'), coalesce(sum(frames), 0), coalesce(sum(raw_bytes), 0),
                   coalesce(sum(compressed_bytes), 0), avg(kbps), avg(psnr_y), min(psnr_y), avg(ms_ssim), min(ms_ssim),
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms),
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms),
                   count(*) FILTER (WHERE fallback_reason = 'quality'), count(*) FILTER (WHERE fallback_reason = 'size'),
                   count(*) FILTER (WHERE fallback_reason = 'latency'), count(*) FILTER (WHERE fallback_reason = 'error'),
                   count(baseline_bytes), coalesce(sum(compressed_bytes) FILTER (WHERE baseline_bytes IS NOT NULL), 0),
                   coalesce(sum(baseline_bytes), 0), now()
                FROM batch_metrics
                WHERE time >= $1 AND time < $2 AND date_trunc(%L, time) = ANY($3)
                GROUP BY 1, 2, 3, 4, 5
            $q$, target, unit, unit) USING lo, hi, buckets;
        END $$;
        CREATE FUNCTION aic_refresh_rollups() RETURNS integer LANGUAGE plpgsql AS $$
        DECLARE
            minutes timestamptz[];
            hours timestamptz[];
        BEGIN
            PERFORM pg_advisory_xact_lock(1634296578);  -- one refresher at a time
            WITH d AS (DELETE FROM rollup_dirty RETURNING bucket) SELECT array_agg(bucket) INTO minutes FROM d;
            IF minutes IS NULL THEN
                RETURN 0;
            END IF;
            SELECT array_agg(DISTINCT date_trunc('hour', m)) INTO hours FROM unnest(minutes) m;
            PERFORM aic_rollup('batch_rollup_1m', 'minute', minutes);
            PERFORM aic_rollup('batch_rollup_1h', 'hour', hours);
            RETURN cardinality(minutes);
        END $$;

        -- Common questions (docs/architecture.md#views).
        CREATE VIEW v_bandwidth_saved AS
            SELECT stream_id, codec, sum(sampled)::bigint AS sampled_batches,
                   sum(sampled_bytes)::bigint AS delivered_bytes, sum(baseline_bytes)::bigint AS native_bytes,
                   1 - sum(sampled_bytes)::double precision / nullif(sum(baseline_bytes), 0) AS saved_fraction,
                   min(bucket) AS since, max(bucket) + interval '1 hour' AS until
            FROM batch_rollup_1h WHERE sampled > 0 GROUP BY stream_id, codec;
        CREATE VIEW v_fallback_rate AS
            SELECT stream_id, sum(ok)::bigint AS ok_batches,
                   sum(fallback_quality + fallback_size + fallback_latency + fallback_error)::bigint AS fallbacks,
                   sum(fallback_quality + fallback_size + fallback_latency + fallback_error)::double precision
                       / nullif(sum(ok), 0) AS fallback_rate,
                   sum(fallback_quality)::bigint AS quality, sum(fallback_size)::bigint AS size,
                   sum(fallback_latency)::bigint AS latency, sum(fallback_error)::bigint AS error
            FROM batch_rollup_1h GROUP BY stream_id;
        CREATE VIEW v_quality_distribution AS
            SELECT codec, floor(psnr_y)::integer AS psnr_y_db, count(*) AS batches
            FROM batch_metrics WHERE status = 'ok' AND psnr_y IS NOT NULL AND time > now() - interval '1 day'
            GROUP BY 1, 2;
        CREATE VIEW v_slowest_streams AS
            SELECT stream_id, sum(batches)::bigint AS batches, max(latency_p95_ms) AS worst_minute_p95_ms,
                   max(latency_p99_ms) AS worst_minute_p99_ms
            FROM batch_rollup_1m WHERE bucket > now() - interval '1 hour'
            GROUP BY stream_id ORDER BY worst_minute_p95_ms DESC NULLS LAST;
        """,
    ),
    (
        5,
        "batch_metrics: the stream's bandwidth budget when the batch was coded",
        "ALTER TABLE batch_metrics ADD COLUMN budget_kbps double precision;",
    ),
    (
        6,
        "batch_metrics: why a batch of a chained stream started with a real key frame",
        """
        ALTER TABLE batch_metrics ADD COLUMN keyframe_reason text CHECK (keyframe_reason IN
            ('first', 'no_reference', 'timeout', 'periodic', 'requested', 'resolution', 'codec_change'));
        """,
    ),
    (
        7,
        "batch_metrics: keyframe_reason 'segment' (a recorded file's backlog coded in parallel segments)",
        """
        ALTER TABLE batch_metrics DROP CONSTRAINT IF EXISTS batch_metrics_keyframe_reason_check;
        ALTER TABLE batch_metrics ADD CONSTRAINT batch_metrics_keyframe_reason_check CHECK (keyframe_reason IN
            ('first', 'no_reference', 'timeout', 'periodic', 'requested', 'resolution', 'codec_change', 'segment'));
        """,
    ),
    (
        8,
        "API bearer tokens (digests only), the audit of config changes, and the tenant of a stream id",
        """
        CREATE TABLE api_tokens (
            id          text PRIMARY KEY,
            digest      text NOT NULL,
            name        text NOT NULL DEFAULT '',
            role        text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
            tenant      text NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            expires_at  timestamptz,
            revoked_at  timestamptz,
            CHECK (tenant <> '*' OR role = 'admin')
        );
        CREATE TABLE config_audit (
            id          bigserial PRIMARY KEY,
            at          timestamptz NOT NULL DEFAULT now(),
            token_id    text NOT NULL,
            token_name  text NOT NULL,
            role        text NOT NULL,
            stream_id   text NOT NULL,
            action      text NOT NULL CHECK (action IN ('set', 'delete')),
            before      jsonb,
            after       jsonb
        );
        CREATE INDEX config_audit_stream ON config_audit (stream_id, at);
        -- A stream id's tenant: TENANT.NAME, or the default tenant's plain NAME (shared/schemas.py).
        CREATE FUNCTION aic_tenant(stream_id text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
            $$ SELECT CASE WHEN strpos(stream_id, '.') = 0 THEN 'default' ELSE split_part(stream_id, '.', 1) END $$;
        """,
    ),
    (
        9,
        "roles: aic_writer (rows in, upkeep through owner functions) and aic_reader (reads, row-level security by tenant)",
        # Roles are the cluster's, not the database's: made if missing.  Their passwords are set by
        # whoever holds them (aic up, aic db migrate --role-passwords): never in a migration.
        """
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'aic_writer') THEN CREATE ROLE aic_writer LOGIN; END IF;
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'aic_reader') THEN CREATE ROLE aic_reader LOGIN; END IF;
            EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO aic_writer, aic_reader', current_database());
        END $$;
        REVOKE CREATE ON SCHEMA public FROM PUBLIC;
        GRANT USAGE ON SCHEMA public TO aic_writer, aic_reader;
        GRANT SELECT ON aic_schema_migrations TO aic_writer, aic_reader;

        -- The writer: rows in; partitions, retention and rollups through functions that run as the owner.
        GRANT SELECT, INSERT ON batch_metrics TO aic_writer;
        GRANT INSERT ON rollup_dirty TO aic_writer;
        ALTER FUNCTION aic_ensure_partition(date) SECURITY DEFINER SET search_path = public, pg_temp;
        ALTER FUNCTION aic_drop_partitions_before(date) SECURITY DEFINER SET search_path = public, pg_temp;
        ALTER FUNCTION aic_refresh_rollups() SECURITY DEFINER SET search_path = public, pg_temp;
        ALTER FUNCTION aic_rollup(regclass, text, timestamptz[]) SET search_path = public, pg_temp;
        REVOKE EXECUTE ON FUNCTION aic_ensure_partition(date), aic_drop_partitions_before(date),
            aic_refresh_rollups(), aic_rollup(regclass, text, timestamptz[]) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION aic_ensure_partition(date), aic_drop_partitions_before(date), aic_refresh_rollups()
            TO aic_writer;

        -- The reader (the HTTP API): every read confined to the tenant the request set (aic.tenant:
        -- a tenant, or '*' for an admin token that serves them all; unset: nothing).
        CREATE FUNCTION aic_request_tenant() RETURNS text LANGUAGE sql STABLE AS
            $$ SELECT coalesce(nullif(current_setting('aic.tenant', true), ''), '-') $$;
        GRANT SELECT ON batch_metrics, batch_rollup_1m, batch_rollup_1h, config_audit,
            v_bandwidth_saved, v_fallback_rate, v_quality_distribution, v_slowest_streams TO aic_reader;
        ALTER VIEW v_bandwidth_saved SET (security_invoker = true);
        ALTER VIEW v_fallback_rate SET (security_invoker = true);
        ALTER VIEW v_quality_distribution SET (security_invoker = true);
        ALTER VIEW v_slowest_streams SET (security_invoker = true);
        ALTER TABLE batch_metrics ENABLE ROW LEVEL SECURITY;
        ALTER TABLE batch_rollup_1m ENABLE ROW LEVEL SECURITY;
        ALTER TABLE batch_rollup_1h ENABLE ROW LEVEL SECURITY;
        ALTER TABLE config_audit ENABLE ROW LEVEL SECURITY;
        CREATE POLICY reader_by_tenant ON batch_metrics FOR SELECT TO aic_reader
            USING (aic_request_tenant() IN ('*', aic_tenant(stream_id)));
        CREATE POLICY reader_by_tenant ON batch_rollup_1m FOR SELECT TO aic_reader
            USING (aic_request_tenant() IN ('*', aic_tenant(stream_id)));
        CREATE POLICY reader_by_tenant ON batch_rollup_1h FOR SELECT TO aic_reader
            USING (aic_request_tenant() IN ('*', aic_tenant(stream_id)));
        CREATE POLICY reader_by_tenant ON config_audit FOR SELECT TO aic_reader
            USING (aic_request_tenant() IN ('*', aic_tenant(stream_id)));
        CREATE POLICY writer_rows ON batch_metrics FOR ALL TO aic_writer USING (true) WITH CHECK (true);

        -- Tokens and the audit: through functions, so the reader holds no digest and writes no table.
        CREATE FUNCTION aic_token(token_id text)
            RETURNS TABLE (digest text, name text, role text, tenant text, expires_at timestamptz, revoked_at timestamptz)
            LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS
            $$ SELECT digest, name, role, tenant, expires_at, revoked_at FROM api_tokens WHERE id = token_id $$;
        CREATE FUNCTION aic_audit_config(token_id text, token_name text, role text, stream_id text, action text,
                                         before jsonb, after jsonb) RETURNS void
            LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS
            $$ INSERT INTO config_audit (token_id, token_name, role, stream_id, action, before, after)
               VALUES (token_id, token_name, role, stream_id, action, before, after) $$;
        REVOKE EXECUTE ON FUNCTION aic_token(text), aic_audit_config(text, text, text, text, text, jsonb, jsonb) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION aic_token(text), aic_audit_config(text, text, text, text, text, jsonb, jsonb)
            TO aic_reader;
        """,
    ),
]


#: The roles the services log in as (migration 9): the metrics writer, and the API's reads.
WRITER, READER = DB_WRITER, DB_READER


class SchemaBehind(RuntimeError):
    """The schema needs migrations that this connection's role may not apply."""


async def schema_version(conn: asyncpg.Connection) -> int:
    if await conn.fetchval("SELECT to_regclass('aic_schema_migrations')") is None:
        return 0
    return await conn.fetchval("SELECT coalesce(max(version), 0) FROM aic_schema_migrations")


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; returns the versions applied now.  A schema that is up to date is
    left alone, so that the writer and reader roles, which may not change it, can call this too."""
    if await schema_version(conn) >= MIGRATIONS[-1][0]:
        return []
    try:
        return await _migrate(conn)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise SchemaBehind(f"the database schema is at version {await schema_version(conn)} and needs version "
                           f"{MIGRATIONS[-1][0]}, which this role may not apply ({exc}): run `aic db migrate` with "
                           "the database owner's URL (aic up does it at start)") from None


async def set_role_passwords(conn: asyncpg.Connection, passwords: dict[str, str]) -> None:
    """Give the service roles their passwords (SCRAM; the passwords never enter a migration or a log)."""
    for role, password in passwords.items():
        literal = await conn.fetchval("SELECT quote_literal($1)", password)
        await conn.execute(f"SET password_encryption = 'scram-sha-256'; ALTER ROLE {role} PASSWORD {literal}")


async def _migrate(conn: asyncpg.Connection) -> list[int]:
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


async def maintain_partitions(conn: asyncpg.Connection, ahead_days: int, retention_days: int,
                              today: date | None = None) -> tuple[int, int]:
    """Create the day partitions from today to ``ahead_days`` ahead; drop those older than
    ``retention_days`` (0 keeps everything).  Returns (created, dropped)."""
    today = today or datetime.now(timezone.utc).date()
    created = 0
    for k in range(ahead_days + 1):
        created += bool(await conn.fetchval("SELECT aic_ensure_partition($1)", today + timedelta(days=k)))
    dropped = 0
    if retention_days:
        dropped = await conn.fetchval("SELECT aic_drop_partitions_before($1)", today - timedelta(days=retention_days))
    return created, dropped


async def refresh_rollups(conn: asyncpg.Connection) -> int:
    """Recompute the dirty minute and hour buckets from the raw rows; returns minutes refreshed."""
    async with conn.transaction():
        return await conn.fetchval("SELECT aic_refresh_rollups()")
