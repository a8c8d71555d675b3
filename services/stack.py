"""One machine, whole pipeline: embedded NATS and PostgreSQL plus service processes.

With ``AIC_NATS_URL`` / ``AIC_DATABASE_URL`` set (or passed), those servers are
used and none is started: the same code runs against a cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from shared import endpoints
from shared.aio import run_blocking
from shared.config import BusConfig, StoreLimits, env_str
from shared.embedded import NatsServer, PostgresServer, ServerError, die_with_parent, free_port
from shared.logs import get_logger
from services.storage import StoreGuard, disk_room
from shared.roles import DB_READER as READER
from shared.roles import DB_WRITER as WRITER


log = get_logger("stack")


@dataclass
class Backoff:
    """When a process that died starts again: after a pause that doubles with each restart."""

    cap_s: float = 5.0
    restarts: int = 0
    restart_at: float | None = None

    def due(self, now: float, what: str, code: int | None) -> bool:
        """Asked while the process is down: the first time, logs its exit and sets the pause (False);
        True once the pause is over (counted as a restart)."""
        if self.restart_at is None:
            log.warning("process_exited", process=what, code=code, restarts=self.restarts)
            self.restart_at = now + min(self.cap_s, 0.5 * 2**self.restarts)
            return False
        if now < self.restart_at:
            return False
        self.restarts, self.restart_at = self.restarts + 1, None
        return True


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    env: dict
    log_path: Path
    proc: subprocess.Popen | None = None
    backoff: Backoff = field(default_factory=Backoff)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as f:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,  # the supervisor decides when it stops, not the terminal's Ctrl-C
                preexec_fn=die_with_parent(signal.SIGTERM),  # and a supervisor killed with -9 leaves no orphan
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stack:
    data_dir: Path
    compressors: int = 1
    compressor_args: list[str] = field(default_factory=list)
    nats_url: str | None = None
    database_url: str | None = None
    with_metrics: bool = True
    http_port: int | None = None  # the metrics service's API; None: a free port
    https: bool = False  # the API over HTTPS, its certificate from the embedded NATS's CA
    edge: bool = False  # the WebRTC edge (WHIP/WHEP, services/edge) beside the API
    edge_port: int | None = None  # None: $AIC_EDGE_PORT, else a free port
    nats: NatsServer | None = None
    postgres: PostgresServer | None = None
    services: list[ServiceProcess] = field(default_factory=list)
    endpoints_path: Path | None = None
    #: Each service's Prometheus /metrics port, on 127.0.0.1 (the same after a restart).
    metrics_ports: dict[str, int] = field(default_factory=dict)
    guard: StoreGuard | None = None  # the embedded store's watch on the disk (services/storage.py)
    _lock: object = field(default=None, repr=False)
    _server_backoff: dict = field(default_factory=lambda: {"nats": Backoff(10.0), "postgres": Backoff(10.0)},
                                  repr=False)

    def start(self) -> "Stack":
        self.nats_url = self.nats_url or env_str("AIC_NATS_URL")
        self.database_url = self.database_url or env_str("AIC_DATABASE_URL")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_folder()
        try:
            if self.nats_url is None:
                limits = self.store_limits()
                self.nats = NatsServer(self.data_dir / "nats", store=limits).start()
                self.nats_url = self.nats.url
                self.guard = StoreGuard(self.nats, limits, self.nats.client("admin"),
                                        on_restart=lambda: run_blocking(self._create_topology()))
            # The topology exists before any service starts: only the admin may create it.
            run_blocking(self._create_topology())
            if self.database_url is None and self.with_metrics:
                self.postgres = PostgresServer(self.data_dir / "postgres").start()
                self.database_url = self.postgres.url
                # The schema and the service roles exist before any service starts: only the owner may make them.
                run_blocking(self._prepare_database())
            base = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if self.postgres is not None:
                base["AIC_DATABASE_URL"] = self.postgres.role_url(WRITER)  # rows in, nothing else
                base["AIC_API_DATABASE_URL"] = self.postgres.role_url(READER)  # reads, by tenant
            elif self.database_url:
                base["AIC_DATABASE_URL"] = self.database_url
            logs = self.data_dir / "logs"
            for i in range(self.compressors):
                self.metrics_ports[f"compressor-{i}"] = port = free_port()
                self.services.append(
                    ServiceProcess(
                        f"compressor-{i}",
                        [sys.executable, "-m", "services.compressor", "--metrics-port", str(port), *self.compressor_args],
                        {**base, **self.nats_env("compressor")},
                        logs / f"compressor-{i}.log",
                    )
                )
            if self.with_metrics:
                self.http_port = self.http_port or free_port()
                self.metrics_ports["metrics"] = port = free_port()
                self.services.append(
                    ServiceProcess("metrics", [sys.executable, "-m", "services.metrics", "--http-port",
                                               str(self.http_port), "--metrics-port", str(port), *self._https_args()],
                                   {**base, **self.nats_env("metrics")}, logs / "metrics.log")
                )
            if self.edge:
                self.edge_port = self.edge_port or int(env_str("AIC_EDGE_PORT") or 0) or free_port()
                self.metrics_ports["edge"] = port = free_port()
                env = {**base, **self.nats_env("edge")}
                if self.with_metrics:
                    # Tokens are the API's (checked as aic_reader); the watch page shows the API's rows.
                    env["AIC_API_URL"] = self.api_url
                    if self.https and self.nats is not None:
                        env["AIC_API_CA"] = str(self.nats.ca_file)
                else:
                    env.pop("AIC_API_DATABASE_URL", None)
                self.services.append(ServiceProcess(
                    "edge", [sys.executable, "-m", "services.edge", "--listen",
                             f"{env_str('AIC_EDGE_HOST', '127.0.0.1')}:{self.edge_port}", "--metrics-port", str(port),
                             *self._https_args("edge", env_str("AIC_EDGE_HOST"))],
                    env, logs / "edge.log"))
            for s in self.services:
                s.start()
            # Other commands run with this data folder find the servers here (shared/endpoints.py).
            api = self.api_url if self.with_metrics else None
            n = self.nats
            self.endpoints_path = endpoints.write(self.data_dir, endpoints.Endpoints(
                self.nats_url, self.database_url, api, os.getpid(), time.time(),
                str(n.ca_file) if n and n.ca_file else None,
                str(n.credentials_dir) if n and n.credentials_dir else None, self.edge_url))
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def edge_url(self) -> str | None:
        scheme = "https" if self.https else "http"
        return f"{scheme}://{env_str('AIC_EDGE_HOST', '127.0.0.1')}:{self.edge_port}" if self.edge else None

    @property
    def api_url(self) -> str:
        return f"{'https' if self.https else 'http'}://127.0.0.1:{self.http_port}"

    def _https_args(self, stem: str = "api", also: str | None = None) -> list[str]:
        """The TLS flags of a service with an HTTPS port; ``also``: another name its certificate
        holds (an address it listens on besides loopback)."""
        if not self.https:
            return []
        if self.nats is None or self.nats.ca_file is None:
            raise ValueError("--https signs the API's certificate with the embedded NATS's CA: none here")
        from shared.pki import default_names, ensure_server_tls

        names = default_names() + ([also] if also and also not in ("0.0.0.0", "::") else [])
        t = ensure_server_tls(self.nats.ca_file.parent, names, stem=stem)
        return ["--tls-cert", str(t.cert_file), "--tls-key", str(t.key_file)]

    def nats_env(self, role: str) -> dict[str, str]:
        """The environment with which a process reaches this stack's NATS as ``role`` (an external
        server's: whatever this process was given)."""
        if self.nats is not None:
            return self.nats.env(role)
        return {k: v for k, v in os.environ.items() if k.startswith("AIC_NATS_")} | {"AIC_NATS_URL": self.nats_url}

    def store_limits(self) -> StoreLimits:
        """The configured stream limits (``AIC_FRAMES_MAX_BYTES``…), shrunk to fit in 90 % of what the
        disk can give the store (its free space plus what the store holds already), so that the
        streams' own bounds, not a full disk, are what the pipeline meets."""
        limits = StoreLimits.from_env()
        room = int(0.9 * disk_room(self.data_dir / "nats" / "jetstream"))
        fitted = limits.fitted(room)
        if fitted != limits:
            log.warning("store_limits_reduced", configured_bytes=limits.store_bytes, disk_room_bytes=room,
                        frames_bytes=fitted.frames_bytes, outputs_bytes=fitted.outputs_bytes)
        return fitted

    def bus_config(self, role: str = "admin", **kw) -> BusConfig:
        """A bus config for ``role`` on this stack's NATS."""
        if self.nats is not None:
            return self.nats.client(role, **kw)
        return replace(BusConfig.from_env(self.nats_url), **kw)

    async def _prepare_database(self) -> None:
        import asyncpg

        from services.metrics.migrations import migrate, set_role_passwords

        conn = await asyncpg.connect(self.database_url)
        try:
            await migrate(conn)
            await set_role_passwords(conn, {r: self.postgres.role_password(r) for r in (WRITER, READER)})
        finally:
            await conn.close()

    async def _create_topology(self) -> None:
        from shared.bus import Bus, PermissionDenied

        bus = await Bus.connect(self.bus_config("admin"), name="aic-up")
        try:
            await bus.guarded(bus.ensure_topology())
        except PermissionDenied as exc:
            if self.nats is not None:
                raise
            # An external server whose streams someone else manages: services check that they exist.
            log.warning("topology_not_managed", error=str(exc))
        finally:
            await bus.close()

    def _lock_folder(self) -> None:
        """One ``aic up`` per data folder: a second one would start a second nats-server on the same
        JetStream store.  The lock dies with its process (kill -9 included); children do not hold it."""
        import fcntl

        path = self.data_dir / "aic.lock"
        self._lock = open(path, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            self._lock.close()
            self._lock = None
            raise ServerError(f"another aic up (pid {holder}) runs with the data folder {self.data_dir}: stop it "
                              "first, or use another --data-dir") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()

    def supervise_once(self) -> None:
        """Restart NATS, PostgreSQL (same address, same data) or a service that died, after a growing
        pause, as a process supervisor would (non-blocking, except while a server starts again)."""
        now = time.monotonic()
        for name, server in (("nats", self.nats), ("postgres", self.postgres)):
            if server is None or server.proc is None or server.proc.poll() is None:
                continue
            if self._server_backoff[name].due(now, name, server.proc.returncode):
                try:
                    server.start()
                    log.warning("process_restarted", process=name)
                    if name == "nats":
                        # A memory stream (AIC_CONTROL) does not outlive its server: the services
                        # wait for their streams (prepare_until) until the admin makes them again.
                        run_blocking(self._create_topology())
                except (ServerError, OSError) as exc:  # still down: the next pause is longer
                    log.error("restart_failed", process=name, error=str(exc))
                except Exception as exc:  # the topology: the services say what is missing
                    log.error("topology_not_restored", error=f"{type(exc).__name__}: {exc}")
        if self.guard is not None and self.nats.proc is not None and self.nats.proc.poll() is None:
            self.guard.check(now)
        for s in self.services:
            if s.proc is not None and not s.alive() and s.backoff.due(now, s.name, s.proc.returncode):
                s.start()

    def stop(self) -> None:
        """Services first (they drain), then PostgreSQL, then NATS."""
        endpoints.remove(self.data_dir, os.getpid())
        for s in self.services:
            s.stop()
        if self.postgres:
            self.postgres.stop()
        if self.nats:
            self.nats.stop()
        if self._lock is not None:
            self._lock.close()  # (releases the folder)
            self._lock = None

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
