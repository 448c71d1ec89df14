#!/usr/bin/env python3
"""Turn a bench results.jsonl (one JSON object per measurement) into the gateway table.

Usage: report.py RESULTS.jsonl [--markdown OUT.md]

Prints a plain-text table to stdout; with --markdown also writes the same table as Markdown.
"Added" numbers are gateway minus direct-to-upstream in the same run (performance.md §1, meaning 4);
c=1 and TTFT use the median of per-round differences over interleaved rounds.
"""
import json
import statistics
import sys

TARGETS = ["direct", "floor", "tollgate", "litellm"]
PROXIES = ["floor", "tollgate", "litellm"]


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, unit="", nd=3):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000 and nd <= 3:
        return f"{v:,.0f}{unit}"
    return f"{v:.{nd}f}{unit}"


class Report:
    def __init__(self, rows):
        self.rows = rows
        self.meta = next((r for r in rows if r.get("test") == "meta"), {})
        self.frames = self.meta.get("frames", {"zero": 10, "sse0": 34, "slow": 66})
        present = {r.get("target") for r in rows if r.get("test") != "meta"}
        self.targets = [t for t in TARGETS if t in present]

    def of(self, test, target, placement=None):
        return [
            r
            for r in self.rows
            if r.get("test") == test
            and r.get("target") == target
            and not r.get("failed")
            and (placement is None or r.get("placement") == placement)
        ]

    def round_deltas(self, test, target, key, placement=None):
        """Per-round target-minus-direct differences of KEY, then their median."""
        direct = {r["round"]: r.get(key) for r in self.of(test, "direct", placement)}
        ds = [
            r.get(key) - direct[r["round"]]
            for r in self.of(test, target, placement)
            if direct.get(r["round"]) is not None and r.get(key) is not None
        ]
        return med(ds)

    def placements(self, test):
        out = []
        for r in self.rows:
            if r.get("test") == test and r.get("placement") not in out:
                out.append(r.get("placement"))
        return out

    def medkey(self, test, target, key, placement=None):
        return med([r.get(key) for r in self.of(test, target, placement)])

    # ------------------------------------------------------------------ rows
    def build(self):
        out = []  # (metric, {target: value-str}, ratio-str, target-str, verdict)
        T = self.targets

        def row(metric, vals, ratio=None, target="", ok=None, unit="", nd=3):
            out.append((metric, {t: fmt(vals.get(t), unit, nd) for t in T}, ratio or "", target, "" if ok is None else ("PASS" if ok else "MISS")))

        def ratio(vals, nd=2, inverse=False):
            a, b = vals.get("tollgate"), vals.get("floor")
            if a is None or b is None or a <= 0 or b <= 0:
                return ""
            return f"{(b / a if inverse else a / b):.{nd}f}×"

        # c=1
        for pl in self.placements("c1"):
            p50 = {t: self.medkey("c1", t, "p50_ms", pl) for t in T}
            row(f"c=1 latency p50, zero-delay upstream, {pl} (ms)", p50)
            added = {t: self.round_deltas("c1", t, "p50_ms", pl) for t in T if t != "direct"}
            a = added.get("tollgate")
            row(f"added p50 at c=1, {pl} (ms)", added, ratio(added), "≤ 0.100", None if a is None else a <= 0.1)

        # open loop
        rate = None
        op = {}
        for key in ("rps", "p50_ms", "p99_ms", "p999_ms", "errors"):
            op[key] = {t: self.medkey("open", t, key) for t in T}
        for r in self.rows:
            if r.get("test") == "open" and r.get("rate"):
                rate = r["rate"]
        rl = f"{rate:,}" if rate else "?"
        row(f"open loop {rl} req/s, 60 ms upstream: achieved req/s", op["rps"], nd=0)
        row("  p50 (ms)", op["p50_ms"])
        row("  p99 (ms)", op["p99_ms"])
        row("  errors + timeouts", op["errors"], nd=0)
        addp99 = {t: (op["p99_ms"][t] - op["p99_ms"]["direct"]) if op["p99_ms"].get(t) is not None and op["p99_ms"].get("direct") is not None else None for t in T if t != "direct"}
        a = addp99.get("tollgate")
        ok = None if a is None else (a <= 1.0 and (op["errors"].get("tollgate") or 0) == 0)
        row(f"added p99 at {rl} req/s (ms)", addp99, ratio(addp99), "≤ 1.000", ok)
        rss = {t: kb_to_mb(self.medkey("open", t, "server_rss_peak_kb")) for t in T if t != "direct"}
        a = rss.get("tollgate")
        row(f"peak RSS at {rl} req/s (MB)", rss, ratio(rss), "< 100", None if a is None else a < 100, nd=1)

        # saturation
        for pl in self.placements("sat"):
            sat = {t: self.medkey("sat", t, "rps", pl) for t in T}
            conns = next((r.get("conns") for r in self.of("sat", "direct", pl)), None) or next((r.get("conns") for r in self.rows if r.get("test") == "sat"), "?")
            s_tg, s_fl, s_ll = sat.get("tollgate"), sat.get("floor"), sat.get("litellm")
            ok = None
            tgt = "≥ 50% floor, ≥ 10× LiteLLM"
            if s_tg is not None and s_fl:
                ok = s_tg >= 0.5 * s_fl and (s_ll is None or s_tg >= 10 * s_ll)
            row(f"saturated req/s, zero-delay, c={conns}, {pl}", sat, ratio(sat), tgt, ok, nd=0)
            cpu = {}
            for t in T:
                rs = self.of("sat", t, pl)
                vals = [r["server_cpu_s"] * 1e6 / r["n"] for r in rs if r.get("n") and r.get("server_cpu_s") is not None]
                cpu[t] = med(vals)
            row(f"  server CPU µs per request ({pl}; direct = mock)", cpu, ratio(cpu), nd=1)
            if s_ll and s_tg:
                out.append(("  tollgate ÷ LiteLLM req/s", {t: "" for t in T}, f"{s_tg / s_ll:.1f}×", "≥ 10×", "PASS" if s_tg >= 10 * s_ll else "MISS"))

        # streaming
        for pl in self.placements("ttft"):
            tt = {t: self.medkey("ttft", t, "ttfb_p50_ms", pl) for t in T}
            row(f"stream TTFT p50 at c=1, paced upstream, {pl} (ms)", tt)
            att = {t: self.round_deltas("ttft", t, "ttfb_p50_ms", pl) for t in T if t != "direct"}
            a = att.get("tollgate")
            row(f"added TTFT p50 at c=1, {pl} (ms)", att, ratio(att), "≤ 0.500", None if a is None else a <= 0.5)
            att99 = {t: self.round_deltas("ttft", t, "ttfb_p99_ms", pl) for t in T if t != "direct"}
            row(f"added TTFT p99 at c=1, {pl} (ms)", att99, ratio(att99))
        fr = self.frames.get("sse0", 34)
        per = {}
        for t in T:
            if t == "direct":
                continue
            c = self.of("chunk_c1", t)
            d = self.of("chunk_c1", "direct")
            if c and d:
                dtot = c[0]["p50_ms"] - d[0]["p50_ms"]
                dttfb = c[0]["ttfb_p50_ms"] - d[0]["ttfb_p50_ms"]
                per[t] = (dtot - dttfb) * 1000 / (fr - 1)
        row(f"added latency per chunk, c=1, {fr}-frame unpaced streams (µs)", per, ratio(per), "≤ 10", None if per.get("tollgate") is None else per["tollgate"] <= 10, nd=1)
        cpu = {}
        for t in T:
            rs = self.of("chunk", t)
            vals = [r["server_cpu_s"] * 1e6 / (r["n"] * fr) for r in rs if r.get("n") and r.get("server_cpu_s") is not None]
            cpu[t] = med(vals)
        row("server CPU µs per chunk (unpaced streams; direct = mock)", cpu, ratio(cpu), nd=1)
        sps = {t: self.medkey("chunk", t, "rps") for t in T}
        row("unpaced streams/s (closed loop)", sps, ratio(sps), nd=0)

        # open streams
        st = {t: self.of("streams", t) for t in T if t != "direct"}
        n_open = self.meta.get("open_streams", "N")
        peak = {t: kb_to_mb(rs[0].get("server_rss_peak_kb")) if rs else None for t, rs in st.items()}
        base = {t: kb_to_mb(rs[0].get("rss_base_kb")) if rs else None for t, rs in st.items()}
        perst = {}
        for t, rs in st.items():
            if rs and rs[0].get("server_rss_peak_kb") is not None and rs[0].get("rss_base_kb") is not None:
                perst[t] = (rs[0]["server_rss_peak_kb"] - rs[0]["rss_base_kb"]) / float(n_open)
        row(f"RSS before {n_open} open streams (MB)", base, ratio(base), nd=1)
        row(f"peak RSS with {n_open} concurrent open streams (MB)", peak, ratio(peak), nd=1)
        a = perst.get("tollgate")
        row("RSS per open stream (KiB)", perst, ratio(perst), "< 64", None if a is None else a < 64, nd=1)
        ttfb = {t: rs[0].get("ttfb_p99_ms") if rs else None for t, rs in st.items()}
        row(f"  TTFB p99 with {n_open} streams (ms)", ttfb, ratio(ttfb))
        errs = {t: rs[0].get("errors") if rs else None for t, rs in st.items()}
        row(f"  errors with {n_open} streams", errs, nd=0)
        return out

    def text(self):
        rows = self.build()
        head = ["metric"] + self.targets + ["tollgate/floor", "target", ""]
        table = [head] + [[m] + [v[t] for t in self.targets] + [r, tg, ok] for m, v, r, tg, ok in rows]
        widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
        lines = []
        for i, r in enumerate(table):
            lines.append("  ".join(str(c).ljust(widths[j]) if j == 0 else str(c).rjust(widths[j]) for j, c in enumerate(r)))
            if i == 0:
                lines.append("-" * len(lines[0]))
        return "\n".join(lines)

    def markdown(self):
        rows = self.build()
        head = ["metric"] + self.targets + ["tollgate ÷ floor", "target", "verdict"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m, v, r, tg, ok in rows:
            lines.append("| " + " | ".join([m.strip()] + [v[t] for t in self.targets] + [r, tg, ok]) + " |")
        return "\n".join(lines)

    def header(self):
        m = self.meta
        return (
            f"run {m.get('run_id', '?')} · git {m.get('git', '?')} · placement {m.get('placement', '?')} · "
            f"{m.get('nproc', '?')} CPUs ({m.get('cpu', '?')}) · load average at start {m.get('loadavg_start', '?')} · "
            f"nice {m.get('nice', '?')} · LiteLLM {m.get('litellm') or '—'}{' · QUICK' if m.get('quick') else ''}"
        )


def kb_to_mb(v):
    return None if v is None else v / 1024.0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    rep = Report(load(argv[1]))
    print(rep.header())
    print(rep.text())
    if "--markdown" in argv:
        path = argv[argv.index("--markdown") + 1]
        with open(path, "w") as f:
            f.write(rep.header() + "\n\n" + rep.markdown() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
