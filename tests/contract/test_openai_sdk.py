"""Contract tests: the real `openai` Python SDK against a running tollgate (see tests/contract.rs)."""
import json

import openai
import pytest

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone",
                                      "parameters": {"type": "object",
                                                     "properties": {"tz": {"type": "string"}},
                                                     "required": ["tz"]}}},
]
HELLO = [{"role": "user", "content": "hi"}]


def extra(obj, name):
    """A field the SDK types lack, read the two documented ways (attribute, then model_extra)."""
    value = getattr(obj, name, None)
    if value is None:
        value = (obj.model_extra or {}).get(name)
    return value


def test_non_streamed_chat(client, expect):
    r = client.chat.completions.create(model=expect["model"], messages=HELLO)
    assert r.object == "chat.completion"
    assert r.model == expect["model"]
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == expect["plain"]["content"]
    assert extra(choice.message, "reasoning_content") == expect["plain"]["reasoning"]
    u = expect["plain"]["usage"]
    assert r.usage.prompt_tokens == u["prompt_tokens"]
    assert r.usage.completion_tokens == u["completion_tokens"]
    assert r.usage.total_tokens == u["prompt_tokens"] + u["completion_tokens"]
    assert r.usage.prompt_tokens_details.cached_tokens == u["cached_tokens"]


def test_streamed_chat_with_reasoning(client, expect):
    stream = client.chat.completions.create(model=expect["model"], messages=HELLO, stream=True)
    reasoning, content, finish, ids = "", "", None, set()
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == expect["model"]
        ids.add(chunk.id)
        for choice in chunk.choices:
            reasoning += extra(choice.delta, "reasoning_content") or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert reasoning == expect["plain"]["reasoning"]
    assert content == expect["plain"]["content"]
    assert finish == "stop"
    assert len(ids) == 1, f"chunk ids differ: {ids}"


def test_tool_call_round_trip(client, expect):
    messages = [{"role": "user", "content": "Weather and time in Paris?"}]
    r1 = client.chat.completions.create(model=expect["model"], messages=messages, tools=TOOLS)
    msg = r1.choices[0].message
    assert r1.choices[0].finish_reason == "tool_calls"
    want = expect["tool_turn"]["tool_calls"]
    assert [c.id for c in msg.tool_calls] == [w["id"] for w in want]
    assert [c.function.name for c in msg.tool_calls] == [w["name"] for w in want]
    assert [json.loads(c.function.arguments) for c in msg.tool_calls] == \
        [json.loads(w["arguments"]) for w in want]
    assert extra(msg, "reasoning_content") == expect["tool_turn"]["reasoning"]
    # Send the assistant turn back as the SDK gives it (reasoning_content included) plus tool results.
    messages.append(msg.model_dump(exclude_none=True))
    for c in msg.tool_calls:
        messages.append({"role": "tool", "tool_call_id": c.id, "content": "18C, sunny"})
    r2 = client.chat.completions.create(model=expect["model"], messages=messages, tools=TOOLS)
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.content == expect["after_tool"]["content"]


def test_streamed_tool_call_round_trip(client, expect):
    messages = [{"role": "user", "content": "Weather and time in Paris?"}]
    stream = client.chat.completions.create(model=expect["model"], messages=messages, tools=TOOLS,
                                            stream=True)
    calls, reasoning, content, finish = {}, "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            d = choice.delta
            reasoning += extra(d, "reasoning_content") or ""
            content += d.content or ""
            finish = choice.finish_reason or finish
            for tc in d.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert entry["id"] is None, "tool call id repeated in a later fragment"
                    entry["id"] = tc.id
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
    assert finish == "tool_calls"
    assert reasoning == expect["tool_turn"]["reasoning"]
    want = expect["tool_turn"]["tool_calls"]
    assert sorted(calls) == list(range(len(want)))
    assert [calls[i]["id"] for i in sorted(calls)] == [w["id"] for w in want]
    assert [calls[i]["name"] for i in sorted(calls)] == [w["name"] for w in want]
    assert [calls[i]["arguments"] for i in sorted(calls)] == [w["arguments"] for w in want]
    messages.append({
        "role": "assistant",
        "content": content or None,
        "reasoning_content": reasoning,
        "tool_calls": [{"id": calls[i]["id"], "type": "function",
                        "function": {"name": calls[i]["name"], "arguments": calls[i]["arguments"]}}
                       for i in sorted(calls)],
    })
    for i in sorted(calls):
        messages.append({"role": "tool", "tool_call_id": calls[i]["id"], "content": "18C"})
    stream = client.chat.completions.create(model=expect["model"], messages=messages, tools=TOOLS,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expect["after_tool"]["content"]


def test_include_usage(client, expect):
    stream = client.chat.completions.create(model=expect["model"], messages=HELLO, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    u = expect["plain"]["usage"]
    assert last.usage.prompt_tokens == u["prompt_tokens"]
    assert last.usage.completion_tokens == u["completion_tokens"]
    assert last.usage.prompt_tokens_details.cached_tokens == u["cached_tokens"]
    assert all(c.usage is None for c in chunks[:-1]), "usage on a chunk other than the last"
    assert sum(1 for c in chunks if c.choices == []) == 1


def test_400_invalid_temperature(client, expect):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=expect["model"], messages=HELLO, temperature=3)
    assert e.value.status_code == 400
    assert e.value.param == "temperature"


def test_401_bad_key(cfg, expect):
    bad = openai.OpenAI(base_url=cfg["base_url"], api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=expect["model"], messages=HELLO)
    assert e.value.status_code == 401


def test_404_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model-xyz", messages=HELLO)
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"


def test_413_body_too_large(client, expect):
    big = "x" * (expect["max_body_bytes"] + 1024)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=expect["model"],
                                       messages=[{"role": "user", "content": big}])
    assert e.value.status_code == 413
    assert type(e.value) is openai.APIStatusError


def test_upstream_4xx_passthrough(client, expect):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=expect["models"]["upstream_400"], messages=HELLO)
    assert e.value.status_code == 400
    assert expect["upstream_400_message"] in str(e.value.message)


def test_upstream_429_passthrough(client, expect):
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=expect["models"]["upstream_429"], messages=HELLO)
    assert e.value.status_code == 429


def test_upstream_500_is_502(client, expect):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=expect["models"]["upstream_500"], messages=HELLO)
    assert e.value.status_code == 502


def test_upstream_timeout_is_504(client, expect):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=expect["models"]["upstream_slow"], messages=HELLO)
    assert e.value.status_code == 504


def test_mid_stream_failure_raises(client, expect):
    stream = client.chat.completions.create(model=expect["models"]["midstream_error"],
                                            messages=HELLO, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
