"""Monitoring as shipped: alert rules and the dashboard use only metrics the services export; compose wires them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
ALERTS = {"AicInferenceLatencyHigh", "AicQualityLow", "AicFallbackRateHigh", "AicConsumerLagGrowing",
          "AicDatabaseWriteErrors"}


def exported_metric_names() -> set[str]:
    from prometheus_client import REGISTRY

    import services.compressor.worker  # noqa: F401  (registers the compressor's metrics)
    import services.ingest.gateway  # noqa: F401
    import services.metrics.writer  # noqa: F401

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names = set()
    for family in REGISTRY.collect():  # labelled metrics with no sample yet still have their family
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def used_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\baic_[a-z_]+", expr))


def test_every_alert_is_defined_with_severity_and_uses_exported_metrics():
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == ALERTS
    exported = exported_metric_names()
    for r in rules:
        assert r["labels"]["severity"] in ("info", "warning", "critical") and r["annotations"]["summary"]
        assert used_metric_names(r["expr"]) <= exported, r["alert"]


def test_the_dashboard_plots_exported_metrics_from_the_provisioned_datasource():
    dash = json.loads((ROOT / "deploy/grafana/dashboards/aic.json").read_text())
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    exported = exported_metric_names()
    assert len(dash["panels"]) >= 6
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid
        for t in p["targets"]:
            assert used_metric_names(t["expr"]) <= exported, p["title"]


def test_compose_runs_prometheus_and_grafana_with_the_shipped_files():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"nats", "postgres", "metrics", "compressor", "ingest", "prometheus", "grafana"} <= set(services)
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            assert (ROOT / volume.split(":")[0]).exists(), volume
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert {"compressor:9101", "metrics:9102", "ingest:9103"} == scrape_targets(prom)


def scrape_targets(prom: dict) -> set[str]:
    """host:port of every scrape target, static or found by DNS (one per compressor replica)."""
    out = set()
    for job in prom["scrape_configs"]:
        out |= {t for sc in job.get("static_configs", []) for t in sc["targets"]}
        out |= {f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    return out


def container_commands() -> dict[str, list[str]]:
    """The aic command line each service's container runs: its compose override, else the CMD of
    the Dockerfile stage it builds."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    stage_cmds, stage = {}, None
    for line in (ROOT / "deploy/Dockerfile").read_text().splitlines():
        if m := re.match(r"^FROM \S+ AS (\S+)", line):
            stage = m.group(1)
        elif m := re.match(r"^CMD (\[.*\])$", line):
            stage_cmds[stage] = json.loads(m.group(1))
    return {name: s.get("command") or stage_cmds[s["build"]["target"]]
            for name, s in compose["services"].items() if name in ("ingest", "metrics", "compressor")}


def test_every_container_command_is_one_the_cli_accepts():
    """A flag the CLI does not know would crash-loop its container (ingest once had --metrics-port
    in docker-compose.yml and not in its parser)."""
    from services.cli import build_parser

    commands = container_commands()
    assert set(commands) == {"ingest", "metrics", "compressor"}
    for argv in commands.values():
        build_parser().parse_args(argv)  # SystemExit, a failure, on an unknown flag


def test_prometheus_scrapes_each_service_on_the_port_its_container_serves():
    from services.cli import build_parser

    served = {name: build_parser().parse_args(argv).metrics_port for name, argv in container_commands().items()}
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    scraped = {host: int(port) for host, port in (t.split(":") for t in scrape_targets(prom))}
    assert scraped == served


def test_compose_writes_no_password_and_both_ends_read_the_same_secret_file():
    text = (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert "POSTGRES_PASSWORD" not in services["postgres"]["environment"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert services["db-init"]["environment"]["AIC_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert ":" not in services["metrics"]["environment"]["AIC_DATABASE_URL"].split("//")[1].split("@")[0]
    assert compose["secrets"]["postgres_password"]["file"] == "./secrets/postgres_password"


def test_compose_uses_the_security_model_of_aic_up_with_every_secret_made_by_aic_secrets_init(tmp_path):
    """TLS and a user per role on the bus, the writer and reader roles on the database: each service
    names its own credentials as secret files, and `aic secrets init` makes every file the compose
    file mounts."""
    from services.secrets import init

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    want = {"ingest": "gateway", "compressor": "compressor", "metrics": "metrics", "bus-init": "admin"}
    for name, role in want.items():
        env = services[name]["environment"]
        assert env["AIC_NATS_URL"].startswith("tls://") and env["AIC_NATS_USER"] == role, name
        assert env["AIC_NATS_PASSWORD_FILE"] == f"/run/secrets/nats_{role}" and env["AIC_NATS_CA"] == "/run/secrets/nats_ca"
        assert {f"nats_{role}", "nats_ca"} <= set(services[name]["secrets"])
    metrics = services["metrics"]["environment"]
    assert metrics["AIC_DATABASE_URL"].startswith("postgresql://aic_writer@")
    assert metrics["AIC_API_DATABASE_URL"].startswith("postgresql://aic_reader@")
    conf = (ROOT / "deploy/nats-server.conf").read_text()
    assert "tls {" in conf and 'include "secrets/auth.conf"' in conf
    made = init(tmp_path / "secrets", ["nats"])
    assert all(p.stat().st_mode & 0o077 == 0 for p in made if p.suffix != ".pem")
    for secret in compose["secrets"].values():
        assert (tmp_path / secret["file"]).exists(), secret["file"]
    assert (tmp_path / "secrets/nats/auth.conf").exists() and (tmp_path / "secrets/nats/server.key").exists()
    assert "password:" in (tmp_path / "secrets/nats/auth.conf").read_text()
    assert all((tmp_path / "secrets" / f"nats_{r}.password").read_text().strip() not in
               (tmp_path / "secrets/nats/auth.conf").read_text() for r in want.values())


async def test_the_compose_nats_config_serves_tls_and_the_roles_with_the_secrets_aic_secrets_init_made(tmp_path):
    """deploy/nats-server.conf as the container runs it (paths moved to a temporary folder): the
    admin reaches JetStream over TLS for the name ``nats``; an anonymous client is refused."""
    import asyncio
    import shutil
    import ssl
    import subprocess

    import nats

    from services.secrets import init
    from shared.embedded import free_port, nats_server_binary

    init(tmp_path / "secrets", ["nats"])
    root = tmp_path / "etc"
    shutil.copytree(tmp_path / "secrets" / "nats", root / "secrets")
    port, http = free_port(), free_port()
    conf = ((ROOT / "deploy/nats-server.conf").read_text().replace("/etc/nats", str(root))
            .replace("/data/", f"{tmp_path}/data/").replace("0.0.0.0:4222", f"127.0.0.1:{port}")
            .replace("0.0.0.0:8222", f"127.0.0.1:{http}"))
    (root / "nats-server.conf").write_text(conf)
    key = (tmp_path / "secrets/nats_store.key").read_text().strip()  # as the container's entrypoint hands it over
    proc = subprocess.Popen([nats_server_binary(), "-c", str(root / "nats-server.conf")], env={**os.environ, "AIC_JS_KEY": key},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "secrets/nats/ca.pem"))
        password = (tmp_path / "secrets/nats_admin.password").read_text().strip()
        for _ in range(50):
            try:
                nc = await nats.connect(f"tls://127.0.0.1:{port}", tls=ctx, tls_hostname="nats", user="admin",
                                        password=password, allow_reconnect=False, connect_timeout=2)
                break
            except Exception:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the compose nats-server did not serve the admin")
        js = nc.jetstream()
        await js.add_stream(name="AT_REST", subjects=["rest.>"])
        await js.publish("rest.x", b"RAW-FRAME-BYTES" * 100)
        await nc.close()
        stored = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
        assert stored and b"RAW-FRAME-BYTES" not in stored  # the store is encrypted at rest
        with pytest.raises(Exception, match="Authorization"):
            await nats.connect(f"tls://127.0.0.1:{port}", tls=ctx, tls_hostname="nats", allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=2)
    finally:
        proc.terminate()
        proc.wait(10)
