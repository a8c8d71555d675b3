"""Check the shipped monitoring against real services: alert rules, their unit tests, and every
Grafana panel query evaluated by a live Prometheus that scrapes a running pipeline.

    python tools/check_monitoring.py [--seconds 20]

Needs ``prometheus`` and ``promtool`` on PATH (Debian: ``apt-get install prometheus``; or the
release tarball from prometheus.io).  Steps:

1. ``promtool check rules`` and ``promtool test rules`` on deploy/prometheus/ (a firing and a quiet
   case per alert, in alerts_test.yml);
2. the embedded stack (NATS, PostgreSQL, one x264 compressor, the metrics service) with every
   service's /metrics on a free port, and ``aic ingest`` of a synthetic source in real time;
3. a Prometheus on a free port with the shipped alerts.yml, scraping the three services every second;
4. after the run: every target was up, every rule loaded and evaluates without error, and every
   query of deploy/grafana/dashboards/aic.json evaluates; the panels whose metrics the run must
   have produced return data.

Prints one line per check and exits non-zero if any fails.  Grafana itself is not started here
(no package for it on this machine): its data-source provisioning is checked by tests/test_deploy.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.stack import Stack  # noqa: E402
from shared.embedded import free_port  # noqa: E402

# Dashboard queries that must return data after a run without fallbacks or database errors.
MUST_HAVE_DATA = ("aic_compressor_batches_total", "aic_compressor_encode_seconds", "aic_compressor_psnr_y_db",
                  "aic_consumer_pending", "aic_metrics_rows_total", "aic_ingest_frames_total",
                  "aic_ingest_publish_seconds", "aic_compressor_batch_seconds")  # fmt: skip


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def query(prom: str, expr: str) -> dict:
    return get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="length of the real-time ingest (default %(default)s)")
    a = p.parse_args(argv)
    missing = [b for b in ("prometheus", "promtool") if shutil.which(b) is None]
    if missing:
        raise SystemExit(f"check_monitoring: {', '.join(missing)} not on PATH (Debian: apt-get install prometheus)")
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failures.append(what)

    prom_dir = ROOT / "deploy/prometheus"
    for cmd in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        r = subprocess.run(["promtool", *cmd], cwd=prom_dir, capture_output=True, text=True)
        check(r.returncode == 0, f"promtool {' '.join(cmd)}" + ("" if r.returncode == 0 else f"\n{r.stdout}{r.stderr}"))

    ports = {"compressor": free_port(), "ingest": free_port()}
    with tempfile.TemporaryDirectory(prefix="aic-monitoring-") as tmp:
        tmp = Path(tmp)
        stack = Stack(tmp / "stack", compressor_args=["--codec", "x264", "--metrics-port", str(ports["compressor"])])
        prom_port = free_port()
        prom_proc = None
        try:
            stack.start()
            ports["metrics"] = stack.http_port  # the metrics service serves /metrics with its API
            (tmp / "prometheus.yml").write_text(json.dumps({  # YAML is a superset of JSON
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(prom_dir / "alerts.yml")],
                "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                                   for job, port in ports.items()],
            }))  # fmt: skip
            prom_proc = subprocess.Popen(
                ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("wb"),
            )  # fmt: skip
            prom = f"http://127.0.0.1:{prom_port}"
            for _ in range(60):
                try:
                    urllib.request.urlopen(f"{prom}/-/ready", timeout=2).close()
                    break
                except OSError:  # not listening yet, or 503 while it loads
                    time.sleep(0.5)
            else:
                raise SystemExit(f"check_monitoring: Prometheus did not become ready; see {tmp / 'prometheus.log'}")
            ingest = subprocess.run(
                [sys.executable, "-m", "services.cli", "ingest", "lavfi:testsrc2=size=320x240:rate=30",
                 "--stream-id", "monitoring-check", "--frames", str(int(a.seconds * 30)), "--realtime",
                 "--metrics-port", str(ports["ingest"]), "--nats-url", stack.nats_url],
                cwd=ROOT, capture_output=True, text=True, timeout=a.seconds + 120,
            )  # fmt: skip
            check(ingest.returncode == 0, "aic ingest ran" + ("" if ingest.returncode == 0 else f": {ingest.stderr[-500:]}"))
            time.sleep(8)  # the last batches through the compressor and the writer, and a few scrapes
            for job in ports:
                up = query(prom, f'max_over_time(up{{job="{job}"}}[5m])')["data"]["result"]
                check(bool(up) and up[0]["value"][1] == "1", f"target {job} scraped")
            groups = get(f"{prom}/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            check(len(rules) == 5, f"{len(rules)} alert rules loaded from alerts.yml")
            for r in rules:
                check(r["health"] == "ok", f"rule {r['name']} evaluates (health {r['health']}, state {r['state']})")
            dashboard = json.loads((ROOT / "deploy/grafana/dashboards/aic.json").read_text())
            for panel in dashboard["panels"]:
                for t in panel["targets"]:
                    res = query(prom, t["expr"])
                    n = len(res["data"]["result"]) if res.get("status") == "success" else -1
                    needs = any(m in t["expr"] for m in MUST_HAVE_DATA)
                    check(n > 0 if needs else n >= 0, f"panel '{panel['title']}' {t['refId']}: {n} series")
        finally:
            if prom_proc is not None:
                prom_proc.terminate()
                prom_proc.wait(20)
            stack.stop()
    print(f"{len(failures)} check(s) failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
