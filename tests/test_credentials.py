"""The embedded PostgreSQL lets nobody in without its generated password (SCRAM), also a cluster
made before passwords were required."""

from __future__ import annotations

import subprocess

import asyncpg
import pytest

from shared.embedded import PostgresServer


async def test_no_login_without_the_password_and_the_password_is_owner_only(postgres):
    assert oct(postgres.password_file.stat().st_mode & 0o777) == "0o600"
    conn = await asyncpg.connect(postgres.url)
    try:
        assert await conn.fetchval("SELECT current_user") == "postgres"
    finally:
        await conn.close()
    for url in (f"postgresql://postgres@127.0.0.1:{postgres.port}/aic",
                f"postgresql://postgres:wrong@127.0.0.1:{postgres.port}/aic"):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(url)


async def test_a_cluster_made_with_trust_logins_requires_the_password_from_its_next_start(tmp_path):
    server = PostgresServer(tmp_path / "pg")
    server.root.mkdir(parents=True)
    server._prepare_user()
    server.pgdata.mkdir(exist_ok=True)
    subprocess.run([server._bin("initdb"), "-D", str(server.pgdata), "-U", "postgres", "--auth=trust"], check=True,
                   stdout=subprocess.DEVNULL, user=server._user)  # what an earlier aic made
    server.start()
    try:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{server.port}/aic")
        conn = await asyncpg.connect(server.url)
        await conn.close()
    finally:
        server.stop()
