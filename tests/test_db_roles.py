"""PostgreSQL roles (issue 13): the metrics writer puts rows in and nothing else; the API's reader
reads, and only the rows of the tenant its request names (row-level security); neither touches
the token digests.  Against the embedded PostgreSQL, migrated by its owner as ``aic up`` does."""

from __future__ import annotations

import time

import asyncpg
import pytest

from services.metrics.auth import create_token
from services.metrics.migrations import READER, WRITER, migrate, set_role_passwords
from services.metrics.writer import RowStore, to_record
from shared.schemas import BatchMetrics
from tests.conftest import unique


@pytest.fixture
async def roles(postgres):
    owner = await asyncpg.connect(postgres.url)
    await migrate(owner)
    await set_role_passwords(owner, {r: postgres.role_password(r) for r in (WRITER, READER)})
    yield owner
    await owner.close()


async def _refused(conn, sql: str, *args) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute(sql, *args)


async def test_the_writer_puts_rows_in_and_may_do_nothing_else(roles, postgres):
    sid = f"acme.{unique('w')}"
    store = RowStore(postgres.role_url(WRITER))
    try:
        row = BatchMetrics(f"{sid}:0", sid, "ok", "w1", time.time(), batch_seq=0, captured_at=time.time())
        assert await store.write([to_record(row)]) == 1  # with its partition, through the owner's function
        conn = await store.connect()
        for sql in ("SELECT * FROM api_tokens", "SELECT * FROM config_audit", "DELETE FROM batch_metrics",
                    "UPDATE batch_metrics SET psnr_y = 99", "DROP TABLE batch_metrics", "CREATE TABLE evil (x int)",
                    "TRUNCATE batch_metrics", "SELECT aic_rollup('batch_rollup_1m', 'minute', ARRAY[now()])"):
            await _refused(conn, sql)
        await conn.fetchval("SELECT aic_refresh_rollups()")  # its upkeep, as the owner's function
    finally:
        await store.close()
    assert await roles.fetchval("SELECT count(*) FROM batch_metrics WHERE stream_id = $1", sid) == 1


async def test_the_reader_sees_only_the_tenant_its_request_names_and_writes_nothing(roles, postgres):
    mine, theirs, default = f"acme.{unique('r')}", f"beta.{unique('r')}", unique("r")
    store = RowStore(postgres.url)
    try:
        now = time.time()
        await store.write([to_record(BatchMetrics(f"{s}:0", s, "ok", "w1", now, batch_seq=0, captured_at=now))
                           for s in (mine, theirs, default)])
    finally:
        await store.close()
    reader = await asyncpg.connect(postgres.role_url(READER))
    try:
        async def visible(tenant: str | None) -> set[str]:
            async with reader.transaction():
                if tenant is not None:
                    await reader.execute("SELECT set_config('aic.tenant', $1, true)", tenant)
                rows = await reader.fetch("SELECT stream_id FROM batch_metrics WHERE stream_id = ANY($1)",
                                          [mine, theirs, default])
                return {r["stream_id"] for r in rows}

        assert await visible(None) == set()  # a request that names no tenant sees nothing
        assert await visible("acme") == {mine}
        assert await visible("default") == {default}
        assert await visible("*") == {mine, theirs, default}
        for sql in ("INSERT INTO batch_metrics (batch_id, stream_id, status, worker_id, completed_at, time) "
                    "VALUES ('x:0', 'x', 'ok', 'ATTACKER', now(), now())",
                    "UPDATE batch_metrics SET psnr_y = 99", "DELETE FROM batch_metrics", "SELECT * FROM api_tokens",
                    "INSERT INTO config_audit (token_id, token_name, role, stream_id, action) "
                    "VALUES ('x', 'x', 'admin', 'x', 'set')"):
            await _refused(reader, sql)
        # Tokens are checked through the owner's function: the row of one id, never the table.
        token, _ = await create_token(roles, "viewer", "acme")
        assert (await reader.fetchrow("SELECT * FROM aic_token($1)", token.id))["tenant"] == "acme"
    finally:
        await reader.close()
