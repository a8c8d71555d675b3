"""The metrics service process: the writer and the HTTP API side by side on one event loop."""

from __future__ import annotations

import asyncio

import asyncpg

from services.metrics.writer import MetricsWriter
from shared.bus import Bus
from shared.config import MetricsConfig
from shared.logs import get_logger

log = get_logger("metrics")


class MetricsService:
    """``run(stop)``: the writer until ``stop``, and the API on ``http_port`` (0: no API)."""

    def __init__(self, cfg: MetricsConfig, http_host: str = "127.0.0.1", http_port: int = 0,
                 api_rate: float = 20.0, open_metrics: bool = False, tls: tuple[str, str] | None = None):
        self.cfg, self.http_host, self.http_port = cfg, http_host, http_port
        self.api_rate, self.open_metrics = api_rate, open_metrics
        self.tls = tls  # (certificate, key) files: the API serves HTTPS
        self.writer = MetricsWriter(cfg)
        self._pool: asyncpg.Pool | None = None
        self._bus: Bus | None = None
        self._pool_lock, self._kv_lock = asyncio.Lock(), asyncio.Lock()  # one pool, one connection
        self._probe_conn: asyncpg.Connection | None = None
        self._probe_lock = asyncio.Lock()
        self.server = None  # uvicorn.Server once started

    async def pool(self) -> asyncpg.Pool:
        # Created on first use and kept; a database that is down makes requests 503 until it is back.
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(self.cfg.api_database_url or self.cfg.database_url,
                                                       min_size=1, max_size=4, timeout=5)
        return self._pool

    async def probe_db(self) -> None:
        """Readiness's database check: ``SELECT 1`` on a connection kept for it alone, so that under
        load it does not wait for one of the pool's (200 concurrent requests made it wait 7 s)."""
        async with self._probe_lock:
            if self._probe_conn is None or self._probe_conn.is_closed():
                self._probe_conn = await asyncpg.connect(self.cfg.api_database_url or self.cfg.database_url, timeout=2)
            try:
                await self._probe_conn.fetchval("SELECT 1")
            except BaseException:
                self._probe_conn.terminate()  # a timed-out or broken probe: a fresh connection next time
                self._probe_conn = None
                raise

    async def kv(self):
        # One connection for all requests; while NATS is away each request waits a few seconds at
        # most and answers 503.
        async with self._kv_lock:
            if self._bus is None:
                self._bus = await Bus.connect(self.cfg.bus, name="aic-metrics-api", wait_s=3.0)
        return await self._bus.config_kv()

    async def run(self, stop: asyncio.Event) -> int:
        api = None
        if self.http_port:
            import uvicorn

            from services.metrics.api import create_app

            tls = dict(ssl_certfile=self.tls[0], ssl_keyfile=self.tls[1]) if self.tls else {}
            config = uvicorn.Config(create_app(self.pool, self.kv, self.api_rate, self.open_metrics,
                                               self.probe_db), host=self.http_host,
                                    port=self.http_port, log_level="warning", lifespan="off", access_log=False, **tls)
            self.server = uvicorn.Server(config)
            self.server.install_signal_handlers = lambda: None  # run_service owns the signals
            api = asyncio.create_task(self.server.serve())
            log.info("api_started", url=f"{'https' if self.tls else 'http'}://{self.http_host}:{self.http_port}",
                     docs="/docs")
        try:
            return await self.writer.run(stop)
        finally:
            if api is not None:
                self.server.should_exit = True
                await asyncio.gather(api, return_exceptions=True)
            if self._pool is not None:
                await self._pool.close()
            if self._probe_conn is not None:
                await self._probe_conn.close()
            if self._bus is not None:
                await self._bus.close()
