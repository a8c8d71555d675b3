"""Where the stack is: the endpoints file ``aic up`` writes, and how every command finds its servers.

A command takes its NATS server and its database from, in this order: its own
flag (``--nats-url``, ``--database-url``), the environment (``AIC_NATS_URL``,
``AIC_DATABASE_URL``), then the endpoints file of an ``aic up`` that is running
with the same data folder (``--data-dir``, ``AIC_DATA_DIR``, else ``./.aic``).
Nothing else: a command that finds none of them says what it looked for and
how to point it, and never falls through to a server on a standard port,
which may belong to something else entirely.

URLs can hold passwords; :func:`redact` is what any message or log shows of one.  A database
password can also come from a file (``AIC_DATABASE_PASSWORD_FILE``, e.g. a container secret).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from shared.config import data_dir, env_str

#: The file ``aic up`` writes into its data folder while it runs (removed when it stops).
ENDPOINTS_FILE = "endpoints.json"


class NoServer(ValueError):
    """No server was named for a command: the message says where it looked and how to point it."""


@dataclass(frozen=True)
class Endpoints:
    """What a running ``aic up`` serves."""

    nats_url: str
    database_url: str | None
    api_url: str | None
    pid: int  # the ``aic up`` process: a file whose process is gone is stale
    started_at: float
    nats_ca: str | None = None  # the CA that signed the NATS server's certificate
    nats_credentials: str | None = None  # folder of ``<role>.password`` files (shared/roles.py)
    edge_url: str | None = None  # the WebRTC edge (WHIP/WHEP and its pages), where one runs


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (mode 0600 from the start, never wider),
    whole or not at all: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write(folder: Path, endpoints: Endpoints) -> Path:
    """Write the endpoints file (owner-only: it names servers and, later, their credentials)."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_private(folder / ENDPOINTS_FILE, json.dumps(asdict(endpoints), indent=1))


def remove(folder: Path, pid: int | None = None) -> None:
    """Remove the endpoints file (only this process's, when ``pid`` is given)."""
    path = folder / ENDPOINTS_FILE
    try:
        if pid is not None and json.loads(path.read_text()).get("pid") != pid:
            return
        path.unlink()
    except (FileNotFoundError, ValueError):
        pass


def read(folder: Path) -> tuple[Endpoints | None, str]:
    """The endpoints of an ``aic up`` running with ``folder``, or None and why there are none."""
    path = folder / ENDPOINTS_FILE
    try:
        raw = json.loads(path.read_text())
        found = Endpoints(str(raw["nats_url"]), raw.get("database_url"), raw.get("api_url"), int(raw["pid"]),
                          float(raw.get("started_at", 0.0)), raw.get("nats_ca"), raw.get("nats_credentials"),
                          raw.get("edge_url"))
    except FileNotFoundError:
        return None, f"no {path} (no `aic up` has run with that data folder)"
    except (ValueError, KeyError, TypeError):
        return None, f"{path} is not an endpoints file aic wrote"
    if not _alive(found.pid):
        return None, f"{path} is from an `aic up` that is no longer running (pid {found.pid})"
    return found, ""


def nats_url(flag: str | None = None, folder: str | Path | None = None) -> str:
    """The NATS server a command uses (see the module docstring), or :class:`NoServer`."""
    url = flag or env_str("AIC_NATS_URL")
    if url:
        return url
    found, why = read(data_dir(folder))
    if found is not None:
        return found.nats_url
    raise NoServer(f"no NATS server to use: none given with --nats-url or AIC_NATS_URL, and {why}.  Start one "
                   "with `aic up` (then run this command from the same folder, or with its --data-dir / "
                   "AIC_DATA_DIR), or point to one with --nats-url nats://HOST:4222")


@dataclass(frozen=True)
class NatsClient:
    """How a command reaches NATS: the server, the user and password, the CA to trust."""

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None


def _read_secret(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise NoServer(f"{what}: cannot read {path} ({exc.strerror})") from None


def nats_client(flag: str | None = None, folder: str | Path | None = None, role: str = "admin",
                tenant: str | None = None) -> NatsClient:
    """The NATS server a command uses (see :func:`nats_url`) and its credentials: ``AIC_NATS_USER`` with
    ``AIC_NATS_PASSWORD_FILE`` (or a ``user:password@`` in the URL) and ``AIC_NATS_CA``; else, for
    the server of an ``aic up`` running with ``folder``, the credentials it generated for ``role``
    (of ``tenant``, else ``AIC_TENANT``, for a tenant role: ``aic tenant add``).  An ``aic up``'s
    credentials never go to a server it did not start."""
    from shared.roles import password_file, user_name

    url = nats_url(flag, folder)
    user, ca = env_str("AIC_NATS_USER"), env_str("AIC_NATS_CA")
    pw_file = env_str("AIC_NATS_PASSWORD_FILE")
    password = _read_secret(pw_file, "AIC_NATS_PASSWORD_FILE") if pw_file else None
    if user is None and urlsplit(url).username is None:
        found, _ = read(data_dir(folder))
        if found is not None and found.nats_url == url:
            ca = ca or found.nats_ca
            if found.nats_credentials:
                tenant = tenant or env_str("AIC_TENANT")
                user = user_name(role, tenant)
                password = _read_secret(password_file(Path(found.nats_credentials), role, tenant),
                                        f"the {user!r} credentials of the `aic up` running with {data_dir(folder)}"
                                        + (f" (add the tenant with `aic tenant add {tenant}`)" if tenant else ""))
    return NatsClient(url, user, password, ca)


def with_password_file(url: str, path: str | None) -> str:
    """``url`` with the password kept in file ``path`` (``AIC_DATABASE_PASSWORD_FILE``: a container
    secret, so that no password is written in a compose file or an environment), unless the URL
    holds one already."""
    if not path:
        return url
    parts = urlsplit(url)
    if parts.password is not None:
        return url
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        raise NoServer(f"AIC_DATABASE_PASSWORD_FILE={path}: cannot read it ({exc.strerror})") from None
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def database_url(flag: str | None = None, folder: str | Path | None = None) -> str:
    """The PostgreSQL database a command uses (see the module docstring), or :class:`NoServer`."""
    url = flag or env_str("AIC_DATABASE_URL")
    if url:
        return with_password_file(url, env_str("AIC_DATABASE_PASSWORD_FILE"))
    found, why = read(data_dir(folder))
    if found is not None and found.database_url:
        return found.database_url
    if found is not None:
        why = f"the `aic up` running with {data_dir(folder)} serves no database"
    raise NoServer(f"no PostgreSQL database to use: none given with --database-url or AIC_DATABASE_URL, and "
                   f"{why}.  Start one with `aic up` (then run this command from the same folder, or with its "
                   "--data-dir / AIC_DATA_DIR), or point to one with --database-url postgresql://USER@HOST/DB")


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*)(?P<password>:[^@/\s]*)?@")
#: Schemes whose user part alone is a secret (a NATS token: ``nats://TOKEN@host``).
_TOKEN_SCHEMES = ("nats://", "tls://", "ws://", "wss://")


def redact(text: str) -> str:
    """``text`` with the secret of every URL in it replaced: ``nats://user:***@host``, ``nats://***@host``
    for a token; a PostgreSQL user name without a password stays."""
    def one(m: re.Match) -> str:
        if m["password"] is not None:
            return f"{m['scheme']}{m['user']}:***@"
        if m["scheme"].lower() in _TOKEN_SCHEMES and m["user"]:
            return f"{m['scheme']}***@"
        return m.group(0)

    return _USERINFO.sub(one, text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
