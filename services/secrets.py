"""``aic secrets init``: every secret of the containerised topology (docker-compose.yml), made once
into one folder with the same model ``aic up`` uses on one machine.

    secrets/
      postgres_password          the database owner's (POSTGRES_PASSWORD_FILE)
      aic_writer.password        the metrics writer's database role
      aic_reader.password        the API's reading role (row-level security by tenant)
      nats_<role>.password       one NATS user per role (shared/roles.py)
      nats/ca.pem                the CA clients trust (AIC_NATS_CA)
      nats/server.pem, .key      nats-server's certificate, for the names given (default: nats)
      nats/auth.conf             the server's users: bcrypt hashes and permissions (included by
                                 deploy/nats-server.conf)
      nats_store.key             the JetStream store's encryption key (given to nats-server in its
                                 environment)

Existing files are kept (run it again to add what is missing); every secret is 0600.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from shared.embedded import new_password, secret_file
from shared.endpoints import write_private
from shared.pki import ensure_server_tls
from shared.roles import DB_READER, DB_WRITER, ROLES, User, authorization_conf


def init(folder: Path, nats_names: list[str]) -> list[Path]:
    """Make the secrets under ``folder``; returns the files (made now or kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    files = [folder / "postgres_password", *(folder / f"{r}.password" for r in (DB_WRITER, DB_READER))]
    for f in files:
        secret_file(f, new_password)
    files.append(folder / "nats_store.key")
    secret_file(files[-1], lambda: secrets.token_hex(32))
    users = []
    for role in ROLES:
        path = folder / f"nats_{role}.password"
        users.append(User(role, role, None, secret_file(path, new_password)))
        files.append(path)
    tls = ensure_server_tls(folder / "nats", nats_names)  # (the nats image runs as root: 0600 files read)
    auth = write_private(folder / "nats" / "auth.conf", authorization_conf(users))
    return files + [tls.ca_file, tls.cert_file, tls.key_file, auth]
