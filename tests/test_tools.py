"""Tool calling through the openai client: tools reach the chat template, a required or named
tool_choice always yields calls that parse and follow the tool's parameters (random weights),
auto parses Hermes-style <tool_call> blocks, streams carry the calls, bad choices are 400s."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xgrammar")
openai = pytest.importorskip("openai")

from vattention.server.tools import parse  # noqa: E402

from conftest import needs_model  # noqa: E402

TEMPLATE = ("{% if tools %}TOOLS: {{ tools | tojson }}\n{% endif %}{% for m in messages %}"
            "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False,
                                       "required": ["utc"], "properties": {"utc": {"type": "boolean"}}}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def follows(call) -> bool:
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return set(args) == {"city", "unit"} and args["city"] in ("Paris", "Rome") and args["unit"] in ("C", "F")
    return call.function.name == "get_time" and set(args) == {"utc"} and isinstance(args["utc"], bool)


@pytest.fixture(scope="module")
def client(converted):
    from fastapi.testclient import TestClient

    from vattention.config import EngineConfig
    from vattention.server.app import build_app
    from vattention.server.async_engine import AsyncEngine
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VATTENTION_CACHE", str(converted["cache"]))
        engine = AsyncEngine(EngineConfig.from_kwargs(device="cpu", load_format="dummy", warm_up="off",
                                                      chat_template=TEMPLATE))
    engine.start()
    try:
        with TestClient(build_app(engine, "m")) as http:
            yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    finally:
        engine.shutdown(5)


pytestmark = needs_model


def create(client, **kwargs):
    kwargs = {"max_tokens": 60, **kwargs}
    return client.chat.completions.create(model="m", messages=MESSAGES, temperature=1.0, seed=3, **kwargs)


def test_required_and_named_choices_always_give_valid_calls(client):
    r = create(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, n=6)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert follows(choice.message.tool_calls[0]) and choice.message.content is None
        assert choice.message.tool_calls[0].id.startswith("call_")
    r = create(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}, n=4)
    assert all(c.message.tool_calls[0].function.name == "get_time" and follows(c.message.tool_calls[0])
               for c in r.choices)


def test_a_streamed_call_arrives_whole_in_the_choices_last_delta(client):
    stream = create(client, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, stream=True)
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) >= 1 and all(follows(tc) for tc in calls) and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


def test_tools_reach_the_template_unless_none(client):
    auto = create(client, tools=[WEATHER], max_tokens=2)
    none = create(client, tools=[WEATHER], tool_choice="none", max_tokens=2)
    plain = create(client, max_tokens=2)
    assert auto.usage.prompt_tokens > none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None


def test_bad_tool_choices_are_refused_by_name(client):
    for kwargs, param in ((dict(tool_choice="required"), "tool_choice"),
                          (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                           "tool_choice"),
                          (dict(tools=[WEATHER, WEATHER]), "tools"),
                          (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
                           "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            create(client, **kwargs)
        assert e.value.body["param"] == param, (kwargs, e.value.body)


def test_hermes_blocks_are_parsed_and_the_rest_is_content():
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}'
            '</tool_call> and <tool_call>{"name": "unknown", "arguments": {}}</tool_call>'
            '<tool_call>not json</tool_call>')
    content, calls = parse(text, constrained=False, names={"get_weather"})
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Rome", "unit": "C"}
    assert content == ('Let me check.  and <tool_call>{"name": "unknown", "arguments": {}}</tool_call>'
                       '<tool_call>not json</tool_call>')
    assert parse("no calls here", False, {"get_weather"}) == ("no calls here", [])
    content, calls = parse('[{"name": "get_time", "arguments": {"utc": true}}]', True, {"get_time"})
    assert content is None and json.loads(calls[0].function.arguments) == {"utc": True}
    assert parse('[{"name": "get_ti', True, {"get_time"}) == ('[{"name": "get_ti', [])  # cut short
