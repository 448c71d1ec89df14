"""The official `openai` SDK, with its default retries, recovers from tollgate's 429 using only the
response headers. Run by tests/limits_sdk.rs with TOLLGATE_BASE_URL and TOLLGATE_KEY set; the key's
plan allows 12 requests/min, so after a burst of 12 the next slot opens 5 s after the first. The SDK's own
back-off (0.5 s, then 1 s) would give up before that; only `retry-after-ms` gets it through."""

import os
import time

try:  # openai 3.x ships its HTTP client as httpx2
    import httpx2 as httpx
except ImportError:
    import httpx
import openai


def make_client(max_retries, seen):
    def on_response(response):
        seen.append((response.status_code, dict(response.headers)))

    return openai.OpenAI(
        base_url=os.environ["TOLLGATE_BASE_URL"] + "/v1",
        api_key=os.environ["TOLLGATE_KEY"],
        max_retries=max_retries,
        http_client=httpx.Client(event_hooks={"response": [on_response]}),
    )


def ask(client):
    return client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )


def test_default_retries_recover_from_429_using_headers():
    drained = []
    no_retry = make_client(0, drained)
    admitted = 0
    for _ in range(25):
        try:
            ask(no_retry)
            admitted += 1
        except openai.RateLimitError as e:
            assert e.code == "rate_limit_exceeded", e.body
            break
    assert admitted == 12, admitted

    seen = []
    client = make_client(openai.DEFAULT_MAX_RETRIES, seen)
    started = time.monotonic()
    reply = ask(client)
    elapsed = time.monotonic() - started
    assert reply.choices[0].message.content == "ok"
    statuses = [s for s, _ in seen]
    assert statuses[0] == 429 and statuses[-1] == 200, statuses
    first = seen[0][1]
    wait_ms = int(first["retry-after-ms"])
    assert 0 < wait_ms <= 5000, first
    assert first["x-ratelimit-limit-requests"] == "12"
    assert first["x-ratelimit-remaining-requests"] == "0"
    # The SDK slept the server-directed delay, not its own shorter back-off.
    assert elapsed >= wait_ms / 1000 - 0.05, (elapsed, wait_ms)
    assert len(seen) == 2, statuses


def test_request_that_can_never_fit_is_not_retried():
    """A request whose reserved tokens exceed the whole tokens-per-minute limit gets a 429 with
    `x-should-retry: false` and no Retry-After: the SDK raises at once instead of retrying."""
    seen = []
    client = openai.OpenAI(
        base_url=os.environ["TOLLGATE_BASE_URL"] + "/v1",
        api_key=os.environ["TOLLGATE_SMALL_KEY"],
        max_retries=openai.DEFAULT_MAX_RETRIES,
        http_client=httpx.Client(
            event_hooks={"response": [lambda r: seen.append((r.status_code, dict(r.headers)))]}
        ),
    )
    try:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=50
        )
        raise AssertionError("expected a RateLimitError")
    except openai.RateLimitError as e:
        assert e.code == "rate_limit_exceeded", e.body
        assert "Request too large" in str(e), str(e)
    assert len(seen) == 1, [s for s, _ in seen]
    headers = seen[0][1]
    assert headers["x-should-retry"] == "false", headers
    assert "retry-after" not in headers and "retry-after-ms" not in headers, headers
