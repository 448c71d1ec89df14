"""Contract tests: the real `anthropic` Python SDK against tollgate's /v1/messages (run by
tests/dialects_contract.rs against the Moonshot-emulating fake upstream)."""
import json

import anthropic
import pytest

TOOLS = [
    {"name": "get_weather", "description": "Weather in a city",
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "get_time", "description": "Time in a zone",
     "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}},
]
THINK = {"type": "enabled", "budget_tokens": 2048}


@pytest.fixture
def ant(cfg):
    base = cfg["base_url"].removesuffix("/v1")
    return anthropic.Anthropic(base_url=base, api_key=cfg["api_key"], max_retries=0, timeout=30)


def test_messages_create_with_thinking(ant, expect):
    m = ant.messages.create(model=expect["model"], max_tokens=4096, thinking=THINK,
                            messages=[{"role": "user", "content": "hi"}])
    assert m.type == "message" and m.role == "assistant"
    assert m.stop_reason == "end_turn"
    kinds = [b.type for b in m.content]
    assert kinds == ["thinking", "text"]
    assert m.content[0].thinking == expect["plain"]["reasoning"]
    assert m.content[1].text == expect["plain"]["content"]
    u = expect["plain"]["usage"]
    assert m.usage.input_tokens == u["prompt_tokens"] - u["cached_tokens"]
    assert m.usage.cache_read_input_tokens == u["cached_tokens"]
    assert m.usage.output_tokens == u["completion_tokens"]


def test_messages_stream(ant, expect):
    with ant.messages.stream(model=expect["model"], max_tokens=4096, thinking=THINK,
                             messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expect["plain"]["content"]
    assert final.content[0].type == "thinking"
    assert final.content[0].thinking == expect["plain"]["reasoning"]
    assert final.stop_reason == "end_turn"
    u = expect["plain"]["usage"]
    assert final.usage.output_tokens == u["completion_tokens"]
    assert final.usage.input_tokens == u["prompt_tokens"] - u["cached_tokens"]


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_use_round_trip(ant, expect, streamed):
    messages = [{"role": "user", "content": "Weather and time in Paris?"}]
    if streamed:
        with ant.messages.stream(model=expect["model"], max_tokens=4096, thinking=THINK, tools=TOOLS,
                                 messages=messages) as stream:
            first = stream.get_final_message()
    else:
        first = ant.messages.create(model=expect["model"], max_tokens=4096, thinking=THINK, tools=TOOLS,
                                    messages=messages)
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    want = expect["tool_turn"]["tool_calls"]
    assert [u.id for u in uses] == [w["id"] for w in want]
    assert [u.name for u in uses] == [w["name"] for w in want]
    assert [u.input for u in uses] == [json.loads(w["arguments"]) for w in want]
    assert first.content[0].type == "thinking"
    # Send the whole assistant turn back (thinking included), plus the tool results.
    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": u.id, "content": "18C"} for u in uses]})
    second = ant.messages.create(model=expect["model"], max_tokens=4096, thinking=THINK, tools=TOOLS,
                                 messages=messages)
    assert second.stop_reason == "end_turn"
    assert second.content[-1].text == expect["after_tool"]["content"]


def test_errors_are_anthropic_errors(ant):
    with pytest.raises(anthropic.NotFoundError) as e:
        ant.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error"
    with pytest.raises(anthropic.BadRequestError):
        ant.messages.create(model="kimi-k2.6", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                            thinking={"type": "disabled"}, extra_body={"reasoning_effort": "high"})
