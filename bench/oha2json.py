#!/usr/bin/env python3
"""Read oha's `--output-format json` on stdin; print one line with the keys the bench-floor load
generator uses (n, errors, rps, p50_ms, p90_ms, p99_ms, p999_ms, max_ms), so both tools share a schema.

Usage: oha ... --output-format json | oha2json.py CONNS RATE
Requests still in flight when the run's deadline hits ("aborted due to deadline") are not errors;
every other error (timeouts, connection failures) and every non-2xx status is.
"""
import json
import sys


def main():
    conns = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 0
    raw = sys.stdin.read()
    try:
        d = json.loads(raw)
    except json.JSONDecodeError:
        print("{}")
        return 1
    s = d.get("summary", {})
    pct = d.get("latencyPercentiles", {})
    codes = {str(k): int(v) for k, v in (d.get("statusCodeDistribution") or {}).items()}
    errs = {str(k): int(v) for k, v in (d.get("errorDistribution") or {}).items()}
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    bad_status = sum(v for k, v in codes.items() if not k.startswith("2"))
    aborted = sum(v for k, v in errs.items() if "deadline" in k)
    other_errs = sum(v for k, v in errs.items() if "deadline" not in k)
    total_time = s.get("total") or 0.0

    def ms(v):
        return None if v is None else round(v * 1000.0, 3)

    out = {
        "tool": "oha",
        "conns": conns,
        "rate": int(rate),
        "stream": False,
        "n": ok + bad_status,
        "errors": bad_status + other_errs,
        "aborted_at_deadline": aborted,
        "rps": round(ok / total_time, 1) if total_time else s.get("requestsPerSec"),
        "p50_ms": ms(pct.get("p50")),
        "p90_ms": ms(pct.get("p90")),
        "p99_ms": ms(pct.get("p99")),
        "p999_ms": ms(pct.get("p99.9")),
        "max_ms": ms(s.get("slowest")),
        "error_kinds": errs,
        "status": codes,
    }
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
