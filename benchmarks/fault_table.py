"""The fault table of docs/reliability.md, from the figures the fault runs record.

    AIC_FAULT_TABLE=faults.jsonl python -m pytest -m "slow or fault" tests/test_outage.py tests/test_reliability.py \\
        tests/test_storage.py tests/test_cluster.py
    python -m benchmarks.fault_table faults.jsonl [demo.json ...]

Each line of the JSONL file is one run (tests/conftest.py, ``record_fault``).  ``aic demo --faults …
--json`` outputs may follow: each of their kills becomes a row.
"""

from __future__ import annotations

import json
import sys


def rows(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        text = open(path).read().strip()
        if text.startswith("{") and '"faults"' in text.split("\n", 1)[0]:  # an `aic demo --json` result
            d = json.loads(text)
            kills = ", ".join(f"{f['target']} at {f['at_s']:.0f} s (rows again {f['recovered_after_s']} s later)"
                              for f in d["faults"])
            out.append({"fault": f"aic demo --faults: kill -9 of {kills}", "published": d["batches_published"],
                        "rows": d["metrics_rows"], "duplicates": d["duplicate_rows"], "missing": d["missing"],
                        "dropped_counted": d.get("dropped_at_gateway", 0),
                        "recovery_s": max((f["recovered_after_s"] or 0) for f in d["faults"]) if d["faults"] else None})
            continue
        out += [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    print("| fault | batches published | rows | duplicates | missing | counted drops | recovery (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows(paths):
        rec = "-" if r.get("recovery_s") is None else f"{r['recovery_s']:g}"
        print(f"| {r['fault']} | {r['published']} | {r['rows']} | {r['duplicates']} | {r['missing']} | "
              f"{r['dropped_counted']} | {rec} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
