#!/usr/bin/env python3
"""Load generator for bench/engine.sh: drives any OpenAI-compatible /v1/chat/completions endpoint
with streamed requests (standard library only) and prints one JSON line of results."""
import argparse, http.client, json, sys, threading, time, urllib.parse, uuid


def stream_once(base, model, messages, max_tokens, seed=None):
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.8}
    if seed is not None:
        body["seed"] = seed
    t0 = time.perf_counter()
    conn.request("POST", u.path.rstrip("/") + "/chat/completions", json.dumps(body),
                 {"content-type": "application/json", "authorization": "Bearer bench"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first = None
    usage = None
    chunks = 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        for c in obj.get("choices") or []:
            if (c.get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
        if obj.get("usage"):
            usage = obj["usage"]
    t1 = time.perf_counter()
    conn.close()
    toks = (usage or {}).get("completion_tokens", chunks)
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"t0": t0, "first": first or t1, "done": t1, "tokens": toks, "cached": cached}


def long_prompt(n_notes, tag):
    lines = [f"Session {tag}. Reference notes follow."]
    for i in range(n_notes):
        lines.append(f"Note {i}: shelf {i} in the {tag} warehouse holds {i * 7 + 3} boxes of widgets.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="server")
    ap.add_argument("--round", type=int, default=1)
    a = ap.parse_args()
    story = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and a storm."}]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    out = {"label": a.label, "round": a.round, "loadavg": float(load)}
    stream_once(a.base, a.model, story, 8)  # warm-up
    # Single-stream decode rate (tokens after the first / time after the first token).
    rates = []
    for r in range(a.repeats):
        x = stream_once(a.base, a.model, story, a.max_tokens, seed=r)
        if x["tokens"] > 1:
            rates.append((x["tokens"] - 1) / (x["done"] - x["first"]))
    out["single_tok_s"] = round(sorted(rates)[len(rates) // 2], 1)
    # Aggregate throughput with N concurrent streams.
    for n in (4, 8):
        best = 0.0
        for r in range(a.repeats):
            res = [None] * n
            def go(i):
                res[i] = stream_once(a.base, a.model, story, a.max_tokens, seed=100 * n + 10 * r + i)
            ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
            start = time.perf_counter()
            for t in ts: t.start()
            for t in ts: t.join()
            wall = max(x["done"] for x in res) - start
            best = max(best, sum(x["tokens"] for x in res) / wall)
        out[f"aggregate_{n}_tok_s"] = round(best, 1)
    # TTFT with a ~1,000-token prompt: cold (unique prefix) vs. warm (prefix seen before).
    cold, warm, cached = [], [], []
    for r in range(a.repeats):
        prefix = long_prompt(34, uuid.uuid4().hex[:8])
        q1 = [{"role": "system", "content": prefix}, {"role": "user", "content": "How many boxes on shelf 3?"}]
        q2 = [{"role": "system", "content": prefix}, {"role": "user", "content": "What is on shelf 12?"}]
        x = stream_once(a.base, a.model, q1, 4)
        y = stream_once(a.base, a.model, q2, 4)
        cold.append((x["first"] - x["t0"]) * 1000)
        warm.append((y["first"] - y["t0"]) * 1000)
        cached.append(y["cached"])
    out["ttft_cold_ms"] = round(sorted(cold)[len(cold) // 2], 1)
    out["ttft_shared_prefix_ms"] = round(sorted(warm)[len(warm) // 2], 1)
    out["shared_prefix_cached_tokens"] = cached
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
