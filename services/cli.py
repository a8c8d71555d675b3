"""``aic``: one command for every service and tool.

Subcommands import their service lazily, so ``aic ingest`` and ``aic metrics``
never load the compressor's codecs (or torch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from shared.config import BusConfig, CompressorConfig, MetricsConfig, PolicyConfig, data_dir, env_int, env_str
from shared.modelstore import DEFAULT_MODELS
from shared.endpoints import redact

DEFAULT_DEMO_SOURCE = "lavfi:testsrc2=size=640x360:rate=30"
CODEC_HELP = ("auto | hybrid | neural | x264 | x264-psnr | x265 | vp9 | av1 (default auto: x264-psnr, chained "
              "batches with reordering inside each batch, which measured fewer bytes than the learned codecs' "
              "closed GOPs; hybrid = x264 with learned restoration, neural = learned intra codec); env AIC_CODEC")


FIND_HELP = ("the data folder of a running `aic up` whose servers to use when no URL is given "
             "(default: $AIC_DATA_DIR or ./.aic)")


def _fault_list(text: str) -> list[str]:
    from services.demo import FAULT_TARGETS

    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in FAULT_TARGETS]
    if bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"faults are a comma-separated subset of {', '.join(FAULT_TARGETS)}")
    return names


def _bus_args(p: argparse.ArgumentParser, tenant: bool = False) -> None:
    p.add_argument("--nats-url", help="NATS server (default: $AIC_NATS_URL, else the `aic up` running with "
                                      "--data-dir; never a server nobody named)")
    p.add_argument("--data-dir", help=FIND_HELP)
    if tenant:
        p.add_argument("--tenant", default=env_str("AIC_TENANT"),
                       help="act with this tenant's credentials from the `aic up` of --data-dir (aic tenant add); "
                            "its stream ids are TENANT.NAME (default: $AIC_TENANT, else the default tenant)")


def _db_args(p: argparse.ArgumentParser, data_dir: bool = True) -> None:
    p.add_argument("--database-url", help="PostgreSQL URL (default: $AIC_DATABASE_URL, else the `aic up` running "
                                          "with --data-dir; never a server nobody named)")
    if data_dir:
        p.add_argument("--data-dir", help=FIND_HELP)


def _metrics_port(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port", type=int, default=env_int("AIC_METRICS_PORT", 0),
        help="serve Prometheus /metrics on this port (default: $AIC_METRICS_PORT, 0 = off)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aic",
        description="AI-driven video compression pipeline: gateways publish frame batches to NATS JetStream, "
        "compressor workers code them, the metrics service writes one PostgreSQL row per batch.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="run the whole stack on this machine (embedded NATS + PostgreSQL)")
    p.add_argument("--data-dir", help="where embedded servers keep data (default: $AIC_DATA_DIR or ./.aic)")
    p.add_argument("--compressors", type=int, default=1, help="compressor processes to start (default 1)")
    p.add_argument("--codec", default=env_str("AIC_CODEC", "auto"), help=CODEC_HELP)
    p.add_argument("--no-edge", dest="edge", action="store_false",
                   help="no WebRTC edge (by default one serves WHIP/WHEP and the browser pages; $AIC_EDGE_PORT "
                        "fixes its port, $AIC_EDGE_HOST its address)")
    p.add_argument("--https", action="store_true",
                   help="serve the HTTP API over HTTPS, with a certificate from the CA that signs NATS's")

    p = sub.add_parser("compressor", help="run a compressor worker on the shared consumer")
    _bus_args(p)
    p.add_argument("--codec", default=env_str("AIC_CODEC", "auto"), help=CODEC_HELP)
    p.add_argument("--level", type=int, default=env_str("AIC_LEVEL"),  # (argparse converts a string default)
                   help="rate level 0..7, fewest bits first (default: the codec's own; for native codecs each "
                        "level is a CRF; env AIC_LEVEL)")
    p.add_argument("--model", help=f"learned model: a folder name under $AIC_MODELS_DIR, else the repository's "
                                   f"models/ (default: hybrid {DEFAULT_MODELS['hybrid']}, neural {DEFAULT_MODELS['neural']})")
    p.add_argument("--crf", type=int, help="native --codec only: constant rate factor when --level is not given "
                   "(codec default if unset); a learned codec's fallback picks its CRF to match the quality target")
    p.add_argument("--target", default=env_str("AIC_TARGET", "psnr_y:34"),
                   help="neural path's quality target METRIC:VALUE, metric psnr_y|psnr_rgb|ms_ssim "
                   "(default psnr_y:34; env AIC_TARGET); below it the native codec goes out")
    p.add_argument("--compare-every", type=int, default=env_int("AIC_COMPARE_EVERY", 8),
                   help="1 in N batches per stream is also coded natively at matched quality; the smaller payload "
                   "goes out and the row records baseline_bytes (0 = never; default 8)")
    p.add_argument("--latency-budget-ms", type=float, default=0.0,
                   help="neural coding time per batch above which native goes out (default 0 = no limit)")
    p.add_argument("--fallback", default=env_str("AIC_FALLBACK", "auto"),
                   help="native codec behind a learned one, for fallbacks and the matched-quality comparison "
                        "(default auto: x264-psnr for a PSNR target, x264 for MS-SSIM, whose psychovisual "
                        "tuning scores better there; env AIC_FALLBACK)")
    p.add_argument("--preset", help="native encoder speed preset, for a native --codec and for --fallback; "
                   "fixes it (default: a chained x264 or av1 stream gets the slowest preset its measured encode "
                   "times afford, medium for a file at full speed; others veryfast); hybrid's base layer keeps its own")
    p.add_argument("--concurrency", type=int, default=2, help="batches in flight at once (default 2)")
    p.add_argument("--no-chain", dest="chain", action="store_false",
                   help="code every batch as a closed GOP (default: x264 and av1 chain each batch to the previous "
                        "batch's last decoded frame, which receivers hold; see README 'Chained batches')")
    p.add_argument("--chain-wait-s", type=float, default=float(env_str("AIC_CHAIN_WAIT_S", "2")),
                   help="how long a batch waits for the previous batch's reference before it starts with a real "
                        "key frame (default %(default)s; env AIC_CHAIN_WAIT_S)")
    p.add_argument("--keyframe-every-s", type=float, default=float(env_str("AIC_KEYFRAME_EVERY_S", "10")),
                   help="a real key frame this often, for receivers that join late (0 = only when one is "
                        "needed or asked for; default %(default)s; env AIC_KEYFRAME_EVERY_S)")
    p.add_argument("--segment-batches", type=int, default=env_int("AIC_SEGMENT_BATCHES", 0),
                   help="a stream that is not live (a file published at full speed) is coded in parallel segments, "
                        "cut at its periodic key frames; N > 0 also starts one with a real key frame every N "
                        "batches, for more parallelism at a cost in bytes (default %(default)s: periodic key "
                        "frames only; env AIC_SEGMENT_BATCHES; see docs/benchmarks.md 'Segments')")
    p.add_argument("--max-waiting", type=int, default=env_int("AIC_MAX_WAITING", 16),
                   help="batches a worker holds, beyond --concurrency, while they wait for the reference of a "
                        "batch still being coded (default %(default)s; env AIC_MAX_WAITING)")
    p.add_argument("--try-codec", default=env_str("AIC_TRY_CODEC"), metavar="CODEC[:PRESET]",
                   help="a chained native codec (av1, av1:6, x264-psnr:slow) tried against the worker's own on "
                        "1 batch in --try-every of each stream that is not live, at matched PSNR-Y; the smaller "
                        "codes the stream until the next trial (default: none; measured to pay only at low rates "
                        "on camera content, docs/benchmarks.md 'Codec choice'; env AIC_TRY_CODEC)")
    p.add_argument("--try-every", type=int, default=env_int("AIC_TRY_EVERY", 16),
                   help="batches between trials of --try-codec (default %(default)s; env AIC_TRY_EVERY)")
    p.add_argument("--no-reorder", dest="reorder", action="store_false",
                   help="x264: no B-frames inside a batch (default: reorder, which costs no latency beyond the "
                        "batch itself)")
    p.add_argument(
        "--quality-frames", type=int, default=env_int("AIC_QUALITY_FRAMES", 1),
        help="frames per batch measured for PSNR-RGB and MS-SSIM (-1 all, 0 off; PSNR-Y always covers all; default 1)",
    )  # fmt: skip
    p.add_argument("--quality-every", type=int, default=env_int("AIC_QUALITY_EVERY", 4),
                   help="measure PSNR-RGB and MS-SSIM on 1 batch in N of each stream (default 4; env "
                        "AIC_QUALITY_EVERY): they are most of the quality measurement's CPU")
    p.add_argument("--batch-timeout-s", type=float, default=float(env_str("AIC_BATCH_TIMEOUT_S", "600")),
                   help="coding one batch longer than this counts as a failed attempt: retried, then a "
                        "'failed' row (default %(default)s; env AIC_BATCH_TIMEOUT_S)")
    p.add_argument("--worker-id", help="name in metrics rows and subjects (default host-pid)")
    _metrics_port(p)

    p = sub.add_parser("metrics", help="run the metrics service (JetStream → PostgreSQL)")
    _bus_args(p)
    _db_args(p, data_dir=False)
    p.add_argument("--http-port", type=int, default=env_int("AIC_HTTP_PORT", 8080),
                   help="HTTP API port (/api/v1/aic/..., /docs, /openapi.json, /healthz, /readyz, /metrics); "
                        "0 disables it (default %(default)s; env AIC_HTTP_PORT)")
    p.add_argument("--http-host", default=env_str("AIC_HTTP_HOST", "127.0.0.1"),
                   help="address the API listens on (default %(default)s; env AIC_HTTP_HOST)")
    p.add_argument("--api-rate", type=float, default=float(env_str("AIC_API_RATE", "20")),
                   help="API requests a second per token (twice that at once), then 429 (default %(default)s; "
                        "env AIC_API_RATE)")
    p.add_argument("--open-metrics", action="store_true", default=env_str("AIC_OPEN_METRICS") == "1",
                   help="serve the API's /metrics without a token (env AIC_OPEN_METRICS=1)")
    p.add_argument("--tls-cert", default=env_str("AIC_API_TLS_CERT"),
                   help="serve the API over HTTPS with this certificate (PEM; env AIC_API_TLS_CERT)")
    p.add_argument("--tls-key", default=env_str("AIC_API_TLS_KEY"), help="its private key (env AIC_API_TLS_KEY)")
    _partition_args(p)
    _metrics_port(p)

    p = sub.add_parser("ingest", help="publish a video source as frame batches")
    p.add_argument("source", help="file, rtsp://, http://, or lavfi:<graph> e.g. lavfi:testsrc2=size=1280x720:rate=30")
    p.add_argument("--stream-id", required=True, help="stream id: NAME, or TENANT.NAME for a tenant's stream ([A-Za-z0-9_-])")
    _bus_args(p, tenant=True)
    p.add_argument("--batch-frames", type=int, default=8, help="frames per batch = GOP length (default 8)")
    p.add_argument("--frames", type=int, help="stop after this many frames (needed for endless lavfi sources)")
    p.add_argument("--start-seq", type=int, default=None,
                   help="first batch sequence number (default: continue where this stream's last ingest "
                        "stopped, 0 for a new stream; the bus keeps the number). Numbers already published "
                        "are refused: a batch id names one batch for good")
    p.add_argument("--realtime", action="store_true", help="pace publishing at the source frame rate")
    p.add_argument("--outage-s", type=float, default=float(env_str("AIC_OUTAGE_S", "120")),
                   help="how long a publish without JetStream's ack is tried again (same message id) before the "
                        "ingest gives up, naming the batches that did not reach the bus (default %(default)s; "
                        "env AIC_OUTAGE_S)")
    p.add_argument("--buffer-batches", type=int, default=env_int("AIC_BUFFER_BATCHES", 32),
                   help="a live source's batches held while the bus is away; beyond, each is dropped, counted and "
                        "given a rejected row (dropped_at_gateway) once the bus is back (default %(default)s)")
    _metrics_port(p)

    p = sub.add_parser("edge", help="the WebRTC edge: browsers publish over WHIP and watch over WHEP",
                       description="Serve WHIP (POST /whip/STREAM: publish a browser's, OBS's or GStreamer's video "
                                   "as the stream's frame batches) and WHEP (POST /whep/STREAM: watch its delivered "
                                   "video), and the pages /publish and /watch.  With --database-url, every request "
                                   "needs an API token (aic token create: operator to publish, viewer to watch); "
                                   "without, only clients on this machine are served.")
    p.add_argument("--listen", default=env_str("AIC_EDGE_LISTEN", "127.0.0.1:8890"),
                   help="HOST:PORT to serve on (default: $AIC_EDGE_LISTEN or %(default)s; a LAN address serves "
                        "other machines, which then need tokens)")
    _bus_args(p)
    p.add_argument("--database-url", default=env_str("AIC_API_DATABASE_URL"),
                   help="the API's database, whose tokens are checked (default: $AIC_API_DATABASE_URL; none: "
                        "no tokens, loopback clients only)")
    p.add_argument("--api-url", default=env_str("AIC_API_URL"),
                   help="the metrics API, whose rows the watch page shows (default: $AIC_API_URL)")
    p.add_argument("--batch-frames", type=int, default=env_int("AIC_BATCH_FRAMES", 8),
                   help="frames per batch of a publish (default %(default)s)")
    p.add_argument("--fps", type=int, default=30,
                   help="the batches' frame rate where the first batch cannot measure it from RTP times (default %(default)s)")
    p.add_argument("--idle-s", type=float, default=5.0,
                   help="a publish that sends no frame this long has ended: its peer is gone (default %(default)s)")
    p.add_argument("--max-publishes", type=int, default=16, help="publishes at once (default %(default)s)")
    p.add_argument("--max-viewers", type=int, default=32, help="viewers at once (default %(default)s)")
    p.add_argument("--rate", type=float, default=2.0,
                   help="session requests a second per client address, twice that at once (default %(default)s)")
    p.add_argument("--tls-cert", default=env_str("AIC_EDGE_TLS_CERT"),
                   help="serve HTTPS with this certificate (browsers give a page its camera on HTTPS or localhost "
                        "only); env AIC_EDGE_TLS_CERT")
    p.add_argument("--tls-key", default=env_str("AIC_EDGE_TLS_KEY"), help="its private key (env AIC_EDGE_TLS_KEY)")
    _metrics_port(p)

    p = sub.add_parser("decode", help="receiver: decode a stream's compressed batches to a video file")
    p.add_argument("--stream-id", required=True)
    p.add_argument("--out", required=True, help="output file: .y4m or .mkv (lossless), .mp4 (viewing)")
    _bus_args(p, tenant=True)
    p.add_argument("--idle-timeout", type=float, default=3.0, help="stop after this many seconds without a batch")
    p.add_argument("--batches", type=int, help="stop after this many batches")
    p.add_argument("--start-seq", type=int, default=None,
                   help="first batch number to write (default: the lowest the bus still holds for the stream)")

    p = sub.add_parser("demo", help="run the embedded stack, ingest N streams, print per-stream results")
    p.add_argument("--source", default=DEFAULT_DEMO_SOURCE, help=f"video source (default {DEFAULT_DEMO_SOURCE})")
    p.add_argument("--streams", type=int, default=2, help="parallel streams (default 2)")
    p.add_argument("--frames", type=int, help="frames per stream (default 64; 900 with --faults)")
    p.add_argument("--batch-frames", type=int, default=8, help="frames per batch (default 8)")
    p.add_argument("--faults", type=_fault_list, default=[],
                   help="show the guarantees under faults: kill -9 each of these (comma-separated: nats, postgres, "
                        "compressor, metrics) once at a random moment while the streams run live at 30 frames/s; "
                        "the stack restarts them, and the count must still find every batch once")
    p.add_argument("--seed", type=int, help="the faults' random moments (default: a new draw each run)")
    p.add_argument("--compressors", type=int, default=1, help="compressor processes (default 1)")
    p.add_argument("--codec", default=env_str("AIC_CODEC", "auto"), help=CODEC_HELP)
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for every row (default 600)")
    p.add_argument("--data-dir", help="embedded servers' data (default: a fresh temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    # train and bench hand their arguments to their own parsers (``aic train --help``).
    sub.add_parser("train", help="train the learned codec (aic train --help)", add_help=False)
    p = sub.add_parser("bench", help="benchmarks: 'aic bench rd SOURCES...' (aic bench rd --help)", add_help=False)
    p.add_argument("bench", nargs="?", choices=["rd"], help="which benchmark")

    p = sub.add_parser("config", help="per-stream compression config, applied live by every worker",
                       description=CONFIG_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("set", help="set keys of a stream's config (key= unsets one; mode= resets the mode)")
    c.add_argument("stream_id")
    c.add_argument("assignments", nargs="+", metavar="key=value",
                   help="mode=conservative|adaptive|aggressive|off, target=DB, level_min=K, level_max=K, budget_kbps=N")
    _bus_args(c, tenant=True)
    c = csub.add_parser("replace", help="replace a stream's whole config: keys not given take the mode's preset "
                                        "(as the API's PUT; `set` merges, as its PATCH)")
    c.add_argument("stream_id")
    c.add_argument("assignments", nargs="*", metavar="key=value", help="mode, target, level_min, level_max, budget_kbps")
    _bus_args(c, tenant=True)
    c = csub.add_parser("get", help="show a stream's config and what it means, or every stream's")
    c.add_argument("stream_id", nargs="?")
    _bus_args(c, tenant=True)
    c = csub.add_parser("delete", help="forget a stream's config (it runs on the workers' flags again)")
    c.add_argument("stream_id")
    _bus_args(c, tenant=True)

    p = sub.add_parser("tenant", help="tenants: credentials of their own, confined to their streams",
                       description=TENANT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    tsub = p.add_subparsers(dest="tenant_command", required=True)
    t = tsub.add_parser("add", help="generate a tenant's gateway, receiver and operator credentials (kept if they "
                                    "exist) and load them into the running NATS server")
    t.add_argument("tenant", help="tenant name, [A-Za-z0-9_-]{1,32}; its stream ids are TENANT.NAME")
    t.add_argument("--data-dir", help="the data folder of the `aic up` (default: $AIC_DATA_DIR or ./.aic)")

    p = sub.add_parser("bus", help="bus administration (with the NATS admin's credentials)")
    bsub = p.add_subparsers(dest="bus_command", required=True)
    b = bsub.add_parser("init", help="create or update every stream, consumer and bucket (aic up does it at start; "
                                     "a deployment runs it once, before the services)")
    _bus_args(b)

    p = sub.add_parser("secrets", help="the secrets of the containerised topology (docker-compose.yml)")
    ssub = p.add_subparsers(dest="secrets_command", required=True)
    s = ssub.add_parser("init", help="make every secret docker-compose.yml mounts (kept where they exist; 0600)")
    s.add_argument("folder", nargs="?", default="secrets", help="where (default %(default)s)")
    s.add_argument("--nats-name", action="append", dest="nats_names",
                   help="a name clients use for the NATS server, in its certificate (repeatable; default: nats)")

    p = sub.add_parser("token", help="bearer tokens for the HTTP API: create, list, revoke",
                       description="Tokens for the HTTP API (services/metrics/auth.py): a role (viewer reads; operator "
                                   "also sets configs; admin does everything and reads the audit) and a tenant it is "
                                   "confined to.  The database keeps a digest only: the token is printed once.")
    ksub = p.add_subparsers(dest="token_command", required=True)
    k = ksub.add_parser("create", help="make a token and print it (once)")
    k.add_argument("--role", required=True, choices=("viewer", "operator", "admin"))
    k.add_argument("--tenant", default="default",
                   help="the tenant it reaches ('*': every tenant, admins only; default %(default)s)")
    k.add_argument("--expires", default="90d", help="lifetime, e.g. 90d, 12h, or 'never' (default %(default)s)")
    k.add_argument("--name", default="", help="who or what it is for (shown in the audit)")
    _db_args(k)
    k = ksub.add_parser("list", help="every token: id, role, tenant, expiry, revocation (never the token)")
    _db_args(k)
    k = ksub.add_parser("revoke", help="stop a token working, at once")
    k.add_argument("token_id", help="the id (aic_<id>_...) of the token")
    _db_args(k)

    p = sub.add_parser("report", help="what the pipeline did: terminal tables, and an HTML page with plots")
    p.add_argument("--since", default="1h", help="period to report, e.g. 30m, 1h, 2d (default %(default)s)")
    p.add_argument("--stream", help="only this stream")
    p.add_argument("--html", type=Path, help="also write a self-contained HTML report with plots here")
    _db_args(p)

    p = sub.add_parser("top", help="a live view per stream: frames in and out, backlog, latency, codecs, key frames",
                       description="A live terminal view of a running stack (services/top.py): per stream the frames "
                                   "per second in (the gateways' numbering) and out (rows), the batches waiting, latency "
                                   "p50/p99 split into waiting and coding, the raw:coded ratio, codec and key-frame mix, "
                                   "fallbacks and batches without a payload; above it the frames stream's fill against "
                                   "its bound and its oldest batch.  Reads the bus as its admin and the database.")
    p.add_argument("--window", type=float, default=30.0, help="seconds of rows each view summarises (default %(default)s)")
    p.add_argument("--every", type=float, default=2.0, help="seconds between redraws (default %(default)s)")
    p.add_argument("--once", action="store_true", help="print one view (two samples --every apart) and exit")
    p.add_argument("--tenant", default=env_str("AIC_TENANT"), help="only this tenant's streams")
    _bus_args(p)
    p.add_argument("--database-url", help="PostgreSQL URL (default: $AIC_DATABASE_URL, else the `aic up` running "
                                          "with --data-dir)")

    p = sub.add_parser("db", help="database administration")
    dsub = p.add_subparsers(dest="db_command", required=True)
    m = dsub.add_parser("migrate", help="apply pending schema migrations, create day partitions ahead, "
                                        "drop those past retention")
    _db_args(m)
    _partition_args(m)
    m.add_argument("--role-passwords", metavar="DIR",
                   help="give the service roles aic_writer (the metrics writer) and aic_reader (the API's reads) the "
                        "passwords in DIR/<role>.password, generated 0600 where missing (with the owner's URL)")
    return parser


def _partition_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retention-days", type=int, default=env_int("AIC_RETENTION_DAYS", MetricsConfig.retention_days),
                   help="drop day partitions of batch_metrics older than this (0 keeps all; "
                        "default %(default)s; env AIC_RETENTION_DAYS)")
    p.add_argument("--partitions-ahead", type=int, default=MetricsConfig.partitions_ahead,
                   help="day partitions to create ahead of today (default %(default)s)")


def _serve_metrics(port: int) -> None:
    """Prometheus /metrics on ``port`` (0: none), on ``$AIC_METRICS_HOST`` (127.0.0.1 unless a container
    says 0.0.0.0: the counters name streams and workers)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=env_str("AIC_METRICS_HOST", "127.0.0.1"))


def cmd_compressor(a: argparse.Namespace) -> int:
    from services.compressor import Compressor
    from services.compressor.worker import EXIT_WEDGED
    from services.runtime import run_service

    kw = {"worker_id": a.worker_id} if a.worker_id else {}
    metric, target = PolicyConfig.parse_target(a.target)
    kw["policy"] = PolicyConfig(metric, target, a.compare_every, a.latency_budget_ms)
    kw["fallback"] = a.fallback
    cfg = CompressorConfig(
        bus=BusConfig.from_env(a.nats_url, a.data_dir, role="compressor"), codec=a.codec, level=a.level, model=a.model, crf=a.crf,
        preset=a.preset,
        concurrency=a.concurrency, quality_frames=a.quality_frames, quality_every=a.quality_every,
        batch_timeout_s=a.batch_timeout_s,
        chain=a.chain, chain_wait_s=a.chain_wait_s, keyframe_every_s=a.keyframe_every_s, reorder=a.reorder,
        segment_batches=a.segment_batches, max_waiting=a.max_waiting, try_codec=a.try_codec, try_every=a.try_every,
        **kw,
    )  # fmt: skip
    _serve_metrics(a.metrics_port)
    code = run_service(Compressor(cfg).run)
    if code == EXIT_WEDGED:
        # Interpreter exit joins the pool's threads, and one of them is stuck in the codec.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_metrics(a: argparse.Namespace) -> int:
    from shared.endpoints import with_password_file
    from services.metrics.service import MetricsService
    from services.runtime import run_service

    cfg = MetricsConfig(bus=BusConfig.from_env(a.nats_url, a.data_dir, role="metrics"),
                        database_url=MetricsConfig.database_url_from_env(a.database_url, a.data_dir),
                        api_database_url=with_password_file(env_str("AIC_API_DATABASE_URL") or "",
                                                            env_str("AIC_API_DATABASE_PASSWORD_FILE")) or None,
                        retention_days=a.retention_days, partitions_ahead=a.partitions_ahead)
    _serve_metrics(a.metrics_port)
    if a.api_rate <= 0:
        raise ValueError("--api-rate must be > 0")
    if bool(a.tls_cert) != bool(a.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = (a.tls_cert, a.tls_key) if a.tls_cert else None
    return run_service(MetricsService(cfg, a.http_host, a.http_port, a.api_rate, a.open_metrics, tls).run)


def cmd_ingest(a: argparse.Namespace) -> int:
    from services.ingest import ingest
    from services.runtime import run_service
    from shared.bus import Bus

    if a.outage_s <= 0 or a.buffer_batches < 0:
        raise ValueError("--outage-s must be > 0 and --buffer-batches >= 0")

    _serve_metrics(a.metrics_port)

    async def main(stop: asyncio.Event) -> int:
        bus = await Bus.connect(BusConfig.from_env(a.nats_url, a.data_dir, role="gateway", tenant=a.tenant),
                                name=f"aic-ingest-{a.stream_id}")
        try:
            s = await ingest(
                bus, a.source, a.stream_id, a.batch_frames, a.frames, a.realtime, stop=stop, start_seq=a.start_seq,
                outage_s=a.outage_s, buffer_batches=a.buffer_batches
            )
            print(f"{s.stream_id}: {s.batches} batches, {s.frames} frames, {s.raw_bytes / 1e6:.1f} MB in {s.seconds:.1f}s")
            if s.duplicates:  # never silent
                print(f"aic ingest: warning: the ids of {s.duplicates} of {s.batches} batches ({s.stream_id}:N) were "
                      f"taken on the bus already, and they went again under fresh ids: was the aic_ingest bucket, "
                      f"which keeps each stream's next number, reset, or did another gateway take them?",
                      file=sys.stderr)
            if s.damage.corrupt_packets:  # never silent: frames of the source were unreadable
                print(f"aic ingest: warning: {s.damage.corrupt_packets} corrupt packets of {a.source} were skipped",
                      file=sys.stderr)
            if s.damage.truncated:  # never silent: the file ends before the length it declares
                print(f"aic ingest: warning: {a.source} ended after {s.damage.frames_read} of the "
                      f"{s.damage.frames_declared} frames its container declares (a truncated file?)", file=sys.stderr)
            if s.dropped:  # never silent: a live source could not wait for the bus
                print(f"aic ingest: warning: {s.dropped} of {s.batches} batches were dropped while the bus was away "
                      f"(each has a rejected row, reason dropped_at_gateway; --buffer-batches holds more)",
                      file=sys.stderr)
        finally:
            await bus.close()
        return 0

    return run_service(main)


def cmd_edge(a: argparse.Namespace) -> int:
    from services.edge.server import EdgeService, parse_listen
    from services.runtime import run_service
    from shared.config import EdgeConfig

    from shared.endpoints import with_password_file

    host, port = parse_listen(a.listen)
    database_url = with_password_file(a.database_url or "", env_str("AIC_API_DATABASE_PASSWORD_FILE")) or None
    cfg = EdgeConfig(bus=BusConfig.from_env(a.nats_url, a.data_dir, role="edge"), host=host, port=port,
                     database_url=database_url, api_url=a.api_url or None, batch_frames=a.batch_frames,
                     fps=a.fps, idle_s=a.idle_s, max_publishes=a.max_publishes, max_viewers=a.max_viewers,
                     rate=a.rate, tls=(a.tls_cert, a.tls_key) if a.tls_cert else None)
    if bool(a.tls_cert) != bool(a.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    _serve_metrics(a.metrics_port)
    return run_service(EdgeService(cfg).run)


def cmd_decode(a: argparse.Namespace) -> int:
    from services.ingest.gateway import ranges_text as _ranges
    from services.receiver import decode_stream
    from services.runtime import run_service
    from shared.bus import Bus

    async def main(stop: asyncio.Event) -> int:
        bus = await Bus.connect(BusConfig.from_env(a.nats_url, a.data_dir, role="receiver", tenant=a.tenant),
                                name=f"aic-decode-{a.stream_id}")
        try:
            s = await decode_stream(bus, a.stream_id, a.out, a.idle_timeout, a.batches, stop, a.start_seq)
        finally:
            await bus.close()
        files = ", ".join(map(str, s.files)) or a.out
        print(f"{files}: {s.frames} frames from {s.batches} batches"
              + (f", missing batches {_ranges(s.gaps)}" if s.gaps else "")
              + (f", undecodable batches {_ranges(s.undecodable)}" if s.undecodable else "")
              + (f" ({s.keyframe_requests} key-frame requests: this receiver lacked their reference)"
                 if s.keyframe_requests else ""))
        if len(s.files) > 1:
            print(f"aic decode: the frame size changed {len(s.files) - 1} time(s): one file per size", file=sys.stderr)
        return 0 if s.batches and not s.errors else 1

    return run_service(main)


def cmd_up(a: argparse.Namespace) -> int:
    from services.stack import Stack
    from shared import logs
    from shared.roles import ROLES

    logs.configure()
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(1))
    import importlib.util

    edge = a.edge and importlib.util.find_spec("aiortc") is not None
    stack = Stack(data_dir(a.data_dir), compressors=a.compressors, compressor_args=["--codec", a.codec],
                  https=a.https, edge=edge)
    with stack:
        print(f"NATS        {redact(stack.nats_url)}", flush=True)
        print(f"PostgreSQL  {redact(stack.database_url or '-')}"
              + (f"   password: {stack.postgres.password_file}" if stack.postgres else ""), flush=True)
        if stack.http_port:
            print(f"API         {stack.api_url}/docs   (tokens: aic token create --role viewer|operator|admin)"
                  + (f"   CA {stack.nats.ca_file}" if stack.https and stack.nats else ""), flush=True)
        if stack.edge:
            print(f"WebRTC      {stack.edge_url}/publish and /watch; WHIP {stack.edge_url}/whip/<stream>, WHEP "
                  f"{stack.edge_url}/whep/<stream>   (tokens: operator publishes, viewer watches)", flush=True)
        elif a.edge:
            print("WebRTC      off: the edge needs aiortc (pip install 'aic[edge]')", flush=True)
        print(f"data        {stack.data_dir}   logs: {stack.data_dir / 'logs'}", flush=True)
        print(f"endpoints   {stack.endpoints_path}   (other aic commands run with this data folder use them)",
              flush=True)
        if stack.nats is not None:
            print(f"credentials NATS: one user per role ({', '.join(ROLES)}), passwords in "
                  f"{stack.nats.credentials_dir}/<role>.password (0600), TLS CA {stack.nats.ca_file}; aic commands "
                  "run with this data folder use them (elsewhere: AIC_NATS_USER, AIC_NATS_PASSWORD_FILE, AIC_NATS_CA)",
                  flush=True)
        print(f"storage     {stack.bus_config().store.describe()}   (AIC_FRAMES_MAX_BYTES, AIC_OUTPUTS_MAX_BYTES, "
              "AIC_RETENTION_S)", flush=True)
        if stack.metrics_ports:
            print("prometheus  " + ", ".join(f"{name} http://127.0.0.1:{port}/metrics"
                                             for name, port in stack.metrics_ports.items()), flush=True)
        print("services    " + ", ".join(s.name for s in stack.services) + "   (Ctrl-C stops everything)", flush=True)
        while not stopping:
            stack.supervise_once()
            time.sleep(0.5)
        print("stopping...", flush=True)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from services.demo import run_demo

    return run_demo(a)


def cmd_train(a: argparse.Namespace, rest: list[str]) -> int:
    from shared.neural.training import main as train_main

    return train_main(rest)


def cmd_bench(a: argparse.Namespace, rest: list[str]) -> int:
    if a.bench != "rd":
        asked = a.bench is None and bool({"-h", "--help"} & set(rest))
        print("usage: aic bench rd SOURCES... [--json] [--plot out.png]   (aic bench rd --help)\n\n"
              "benchmarks: rd = rate-distortion of every codec on images and clips, side by side",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    from benchmarks.rd import main as rd_main

    return rd_main(rest)


CONFIG_HELP = """Per-stream compression config, kept in the NATS KV bucket 'aic_config'.

Every compressor watches the bucket and applies a change to the stream's next
batch.  Modes: conservative (PSNR-Y 38 dB, levels 4..7), adaptive (34 dB,
2..6), aggressive (30 dB, 0..4), off (native codec only, no neural
inference).  target, level_min and level_max override the mode's values.
A stream with no config runs on the workers' own flags.

  aic config set cam-1 mode=aggressive
  aic config set cam-1 target=32 level_max=5
  aic config get cam-1
"""


def cmd_config(a: argparse.Namespace) -> int:

    from nats.js.errors import KeyNotFoundError

    from shared.bus import Bus
    from shared.control import ConfigError, StreamConfig, check_stream_id
    from shared.roles import ADMIN, parse_user, stream_ids

    async def main() -> int:
        cfg = BusConfig.from_env(a.nats_url, a.data_dir, role="operator", tenant=a.tenant)
        bus = await Bus.connect(cfg, name="aic-config")
        try:
            kv = await bus.config_kv()

            async def current(sid: str) -> StreamConfig | None:
                try:
                    return StreamConfig.from_json((await bus.guarded(kv.get(sid))).value)
                except KeyNotFoundError:
                    return None

            def show(sid: str, cfg: StreamConfig | None) -> dict:
                if cfg is None:
                    return {"stream_id": sid, "config": None, "note": "no config: the workers' flags apply"}
                return cfg.describe(sid)  # the API's shape (GET/PUT/PATCH /api/v1/aic/config/{stream})

            if a.config_command in ("set", "replace"):
                sid = check_stream_id(a.stream_id)
                if a.config_command == "set":  # merge, as PATCH does
                    new = (await current(sid) or StreamConfig()).updated(a.assignments)
                else:  # the whole config, as PUT does
                    new = StreamConfig().updated(a.assignments)
                await bus.guarded(kv.put(sid, new.to_json()))
                print(json.dumps(show(sid, new)))
            elif a.config_command == "delete":
                await bus.guarded(kv.delete(check_stream_id(a.stream_id)))
                print(json.dumps(show(a.stream_id, None)))
            elif a.stream_id:
                print(json.dumps(show(a.stream_id, await current(check_stream_id(a.stream_id)))))
            else:
                role, tenant = parse_user(cfg.user or ADMIN)
                keys = await kv.stream_ids(stream_ids(tenant) if tenant else ">")  # what it may see
                for sid in keys:
                    print(json.dumps(show(sid, await current(sid))))
            return 0
        except ConfigError as exc:
            print(f"aic config: {exc}", file=sys.stderr)
            return 2
        finally:
            await bus.close()

    return asyncio.run(main())


TENANT_HELP = """\
A tenant's streams have ids TENANT.NAME (the default tenant's: NAME).  Its
gateway, receiver and operator credentials reach only those streams: their
frames, compressed payloads, configs and numbering; compressors and the
metrics service serve every tenant.  Use them with --tenant (or AIC_TENANT)
on aic ingest, decode and config run with the same data folder, or elsewhere
with AIC_NATS_USER=<role>@TENANT and AIC_NATS_PASSWORD_FILE=<the file>.
"""


def cmd_tenant(a: argparse.Namespace) -> int:
    from shared.embedded import NatsServer
    from shared.roles import user_name
    from shared.schemas import check_tenant

    tenant = check_tenant(a.tenant)
    server = NatsServer.of_folder(data_dir(a.data_dir) / "nats")
    if not server.auth:
        raise ValueError(f"the NATS server in {server.root} runs without authentication: no credentials to add")
    for path in server.add_tenant(tenant):
        role = path.stem
        print(f"{user_name(role, tenant):24} {path}")
    print(f"tenant {tenant}: stream ids {tenant}.NAME; e.g. aic ingest SOURCE --stream-id {tenant}.cam1 --tenant {tenant}")
    return 0


def cmd_bus(a: argparse.Namespace) -> int:
    from shared.bus import Bus

    async def main() -> int:
        cfg = BusConfig.from_env(a.nats_url, a.data_dir, role="admin")
        bus = await Bus.connect(cfg, name="aic-bus-init")
        try:
            await bus.guarded(bus.ensure_topology())
        finally:
            await bus.close()
        print("bus topology: every stream, consumer and bucket is in place")
        print(f"storage: {cfg.store.describe()}; the server's store must hold {cfg.store.store_bytes} bytes "
              "(nats-server's jetstream max_file_store)")
        return 0

    return asyncio.run(main())


def cmd_secrets(a: argparse.Namespace) -> int:
    from services.secrets import init

    folder = Path(a.folder)
    for path in init(folder, a.nats_names or ["nats"]):
        print(path)
    print(f"secrets in {folder.resolve()} (owner-only; keep them out of version control)", file=sys.stderr)
    return 0


def cmd_token(a: argparse.Namespace) -> int:
    import asyncpg

    from services.metrics import auth
    from services.metrics.migrations import migrate

    async def main() -> int:
        conn = await asyncpg.connect(MetricsConfig.database_url_from_env(a.database_url, a.data_dir))
        try:
            await migrate(conn)  # the tokens table exists from migration 8 on
            if a.token_command == "create":
                expires = None if a.expires == "never" else auth.parse_duration(a.expires)
                t, secret = await auth.create_token(conn, a.role, a.tenant, expires, a.name)
                print(secret)
                print(f"token {t.id}: role {t.role}, tenant {t.tenant}, expires "
                      f"{t.expires_at.isoformat(timespec='seconds') if t.expires_at else 'never'}; use it as "
                      f"'Authorization: Bearer <token>'; it is not shown again", file=sys.stderr)
            elif a.token_command == "list":
                for row in await auth.list_tokens(conn):
                    print(json.dumps(row, default=str))
            elif not await auth.revoke_token(conn, a.token_id.removeprefix(auth.PREFIX).partition("_")[0]):
                print(f"aic token: no working token {a.token_id}", file=sys.stderr)
                return 1
            return 0
        finally:
            await conn.close()

    return asyncio.run(main())


def cmd_report(a: argparse.Namespace) -> int:
    from services.report import run

    try:
        return run(MetricsConfig.database_url_from_env(a.database_url, a.data_dir), a.since, a.stream, a.html)
    except ValueError as exc:
        print(f"aic report: {exc}", file=sys.stderr)
        return 2


def cmd_top(a: argparse.Namespace) -> int:
    from services import top

    if a.window <= 0 or a.every <= 0:
        raise ValueError("--window and --every must be > 0")
    view = top.Top(BusConfig.from_env(a.nats_url, a.data_dir, role="admin"),
                   MetricsConfig.database_url_from_env(a.database_url, a.data_dir), a.window, a.tenant)
    try:
        return asyncio.run(top.run(view, a.every, a.once))
    except KeyboardInterrupt:
        return 0


def cmd_db(a: argparse.Namespace) -> int:
    import asyncpg

    from services.metrics.migrations import READER, WRITER, maintain_partitions, migrate, set_role_passwords
    from shared.embedded import new_password, secret_file

    async def main() -> None:
        conn = await asyncpg.connect(MetricsConfig.database_url_from_env(a.database_url, a.data_dir))
        try:
            applied = await migrate(conn)
            print(f"applied migrations: {applied or 'none (up to date)'}")
            if a.role_passwords:
                folder = Path(a.role_passwords)
                folder.mkdir(parents=True, exist_ok=True)
                files = {r: folder / f"{r}.password" for r in (WRITER, READER)}
                await set_role_passwords(conn, {r: secret_file(f, new_password) for r, f in files.items()})
                print("role passwords: " + ", ".join(f"{r} {f}" for r, f in files.items()))
            created, dropped = await maintain_partitions(conn, a.partitions_ahead, a.retention_days)
            print(f"day partitions: {created} created, {dropped} dropped (retention {a.retention_days or 'off'})")
        finally:
            await conn.close()

    asyncio.run(main())
    return 0


COMMANDS = {
    "up": cmd_up,
    "compressor": cmd_compressor,
    "metrics": cmd_metrics,
    "ingest": cmd_ingest,
    "decode": cmd_decode,
    "edge": cmd_edge,
    "demo": cmd_demo,
    "db": cmd_db,
    "config": cmd_config,
    "report": cmd_report,
    "tenant": cmd_tenant,
    "token": cmd_token,
    "bus": cmd_bus,
    "top": cmd_top,
    "secrets": cmd_secrets,
}
PASSTHROUGH = {"train": cmd_train, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in PASSTHROUGH:
        return PASSTHROUGH[args.command](args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error, not a traceback, for expected failures
        from shared.bus import TopologyMissing
        from shared.embedded import ServerError
        from services.ingest.gateway import SourceError

        if isinstance(exc, (ServerError, SourceError, TopologyMissing, ValueError, OSError)):
            print(f"aic {args.command}: error: {redact(str(exc))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
