"""Contract tests: the real `openai` Python SDK's Responses API (`responses.create`,
`responses.stream`) against tollgate (run by tests/dialects_contract.rs)."""
import json

import pytest

TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"type": "function", "name": "get_time", "description": "Time in a zone",
     "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}},
]


def test_responses_create(client, expect):
    r = client.responses.create(model=expect["model"], input="hi")
    assert r.object == "response"
    assert r.status == "completed"
    assert r.output_text == expect["plain"]["content"]
    reasoning = [o for o in r.output if o.type == "reasoning"]
    assert reasoning and reasoning[0].content[0].text == expect["plain"]["reasoning"]
    u = expect["plain"]["usage"]
    assert r.usage.input_tokens == u["prompt_tokens"]
    assert r.usage.input_tokens_details.cached_tokens == u["cached_tokens"]
    assert r.usage.output_tokens == u["completion_tokens"]


def test_responses_stream_with_summary(client, expect):
    text, summary = "", ""
    with client.responses.stream(model=expect["model"], input="hi",
                                 reasoning={"effort": "high", "summary": "auto"}) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type == "response.reasoning_summary_text.delta":
                summary += event.delta
        final = stream.get_final_response()
    assert text == expect["plain"]["content"]
    assert summary == expect["plain"]["reasoning"]
    assert final.output_text == expect["plain"]["content"]
    assert final.status == "completed"


@pytest.mark.parametrize("streamed", [False, True])
def test_function_calls_by_call_id(client, expect, streamed):
    items = [{"role": "user", "content": "Weather and time in Paris?"}]
    if streamed:
        with client.responses.stream(model=expect["model"], input=items, tools=TOOLS) as stream:
            first = stream.get_final_response()
    else:
        first = client.responses.create(model=expect["model"], input=items, tools=TOOLS)
    calls = [o for o in first.output if o.type == "function_call"]
    want = expect["tool_turn"]["tool_calls"]
    assert [c.call_id for c in calls] == [w["id"] for w in want]
    assert [c.name for c in calls] == [w["name"] for w in want]
    assert [json.loads(c.arguments) for c in calls] == [json.loads(w["arguments"]) for w in want]
    # Replay the output items (reasoning included) and answer each call by call_id.
    items += [o.model_dump(exclude_none=True) for o in first.output]
    items += [{"type": "function_call_output", "call_id": c.call_id, "output": "18C"} for c in calls]
    second = client.responses.create(model=expect["model"], input=items, tools=TOOLS)
    assert second.output_text == expect["after_tool"]["content"]
