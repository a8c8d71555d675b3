"""Finding the stack: a command uses the server it was pointed at (flag, environment, or the
endpoints file of a running ``aic up`` in its data folder) and nothing else; secrets in URLs are
never shown."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared import endpoints
from shared.endpoints import Endpoints, NoServer, redact

CLEAN = {k: v for k, v in os.environ.items() if k not in ("AIC_NATS_URL", "AIC_DATABASE_URL", "AIC_DATA_DIR")}


def aic(*args, cwd, env=CLEAN) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**env, "PYTHONPATH": os.getcwd()}, timeout=120)


@pytest.mark.parametrize("text,shown", [
    ("nats://user:SECRETPW@127.0.0.1:4222", "nats://user:***@127.0.0.1:4222"),
    ("at nats://user:SECRETPW@h:1 within 5 s", "at nats://user:***@h:1 within 5 s"),
    ("nats://TOKEN@h:4222", "nats://***@h:4222"),
    ("postgresql://aic:pw@h:5432/db", "postgresql://aic:***@h:5432/db"),
    ("postgresql://postgres@127.0.0.1/db", "postgresql://postgres@127.0.0.1/db"),  # a user name is no secret
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
])
def test_a_url_shows_no_password_or_token(text, shown):
    assert redact(text) == shown


def test_the_endpoints_file_is_owner_only_and_a_dead_stacks_file_is_not_used(tmp_path):
    path = endpoints.write(tmp_path, Endpoints("nats://127.0.0.1:1", None, None, os.getpid(), 0.0))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert endpoints.read(tmp_path)[0].nats_url == "nats://127.0.0.1:1"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    endpoints.write(tmp_path, Endpoints("nats://127.0.0.1:1", None, None, int(dead.stdout), 0.0))
    found, why = endpoints.read(tmp_path)
    assert found is None and "no longer running" in why
    endpoints.remove(tmp_path, pid=os.getpid())  # not this process's file: it stays
    assert path.exists()
    endpoints.remove(tmp_path)
    assert not path.exists()


def test_without_a_url_or_a_running_stack_the_error_says_where_it_looked(tmp_path, monkeypatch):
    for k in ("AIC_NATS_URL", "AIC_DATABASE_URL", "AIC_DATA_DIR"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(NoServer, match=r"--nats-url or AIC_NATS_URL.*endpoints.json"):
        endpoints.nats_url(None, tmp_path)
    with pytest.raises(NoServer, match=r"--database-url or AIC_DATABASE_URL"):
        endpoints.database_url(None, tmp_path)
    assert endpoints.nats_url("nats://given:4222", tmp_path) == "nats://given:4222"
    monkeypatch.setenv("AIC_NATS_URL", "nats://from-env:4222")
    assert endpoints.nats_url(None, tmp_path) == "nats://from-env:4222"


def test_a_command_with_no_server_named_fails_clearly_and_never_uses_the_standard_port(tmp_path):
    # This machine runs a NATS server on 4222 and PostgreSQL on 5432: a command that fell through to
    # them would succeed (and publish into, or read from, servers nobody named).
    for args in (["config", "get"], ["ingest", "lavfi:testsrc2=size=64x48:rate=30", "--stream-id", "x", "--frames", "8"],
                 ["report"], ["db", "migrate"]):
        r = aic(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "aic up" in r.stderr and str(tmp_path / ".aic") in r.stderr, r.stderr


def test_a_command_finds_the_stack_running_with_its_data_folder(tmp_path, nats_server):
    folder = tmp_path / "stack"
    endpoints.write(folder, Endpoints(nats_server.url, None, None, os.getpid(), 0.0, str(nats_server.ca_file),
                                      str(nats_server.credentials_dir)))
    r = aic("config", "get", "--data-dir", str(folder), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = aic("config", "get", cwd=tmp_path, env={**CLEAN, "AIC_DATA_DIR": str(folder)})
    assert r.returncode == 0, r.stderr


def test_a_password_in_a_url_never_reaches_the_terminal(tmp_path):
    r = aic("config", "get", "--nats-url", "nats://aic:SECRETPW@127.0.0.1:1", cwd=tmp_path)
    assert r.returncode != 0 and "SECRETPW" not in r.stderr + r.stdout and "aic:***@" in r.stderr, r.stderr


def test_a_database_password_can_come_from_a_secret_file(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("s3cr:t/pw\n")
    monkeypatch.setenv("AIC_DATABASE_URL", "postgresql://aic@db:5432/aic")
    monkeypatch.setenv("AIC_DATABASE_PASSWORD_FILE", str(secret))
    url = endpoints.database_url()
    assert url == "postgresql://aic:s3cr%3At%2Fpw@db:5432/aic"
    from urllib.parse import unquote, urlsplit

    assert unquote(urlsplit(url).password) == "s3cr:t/pw"
    monkeypatch.setenv("AIC_DATABASE_URL", "postgresql://aic:given@db/aic")  # a URL's own password wins
    assert endpoints.database_url() == "postgresql://aic:given@db/aic"
    monkeypatch.setenv("AIC_DATABASE_URL", "postgresql://aic@db/aic")
    monkeypatch.setenv("AIC_DATABASE_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(NoServer, match="AIC_DATABASE_PASSWORD_FILE"):
        endpoints.database_url()
