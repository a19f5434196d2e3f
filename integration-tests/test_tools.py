"""Tool calling on /v1/chat/completions against the real server and the `openai` client.

The embedded SmolLM2-135M-Instruct's chat template knows nothing of tools, so the model is not
told about them: a named `tool_choice` (or `required`) is what makes it call one, and the grammar
the router builds from the function's parameters is what makes the arguments validate. The
streamed deltas must assemble to the same call (greedy decoding: the same tokens).
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests
from conftest import synthetic_server

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"hours_ahead": {"type": "integer", "minimum": 0, "maximum": 23}},
    "required": ["hours_ahead"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Time of day", "parameters": TIME},
    },
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")


def assemble(stream) -> tuple[str, list[dict], str | None]:
    """Content, calls and the finish reason of a streamed answer, assembled as the docs say."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name, d
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None, d
                calls[d.index]["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def check_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_a_named_function_is_called_with_valid_arguments_plain_and_streamed(client):
    kwargs = dict(
        model="tgi",
        messages=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    check_call("get_weather", call.function.arguments)

    content, calls, finish = assemble(client.chat.completions.create(**kwargs, stream=True))
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", call.function.arguments)
    ]
    assert calls[0]["id"].startswith("call_")


def test_required_calls_one_of_the_functions(client):
    kwargs = dict(
        model="tgi",
        messages=[{"role": "user", "content": "What time will it be in 3 hours?"}],
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
    )
    r = client.chat.completions.create(**kwargs, parallel_tool_calls=False, max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    check_call(call.function.name, call.function.arguments)
    # Parallel calls allowed: the model decides when to stop adding calls (SmolLM2 may go on
    # until max_tokens); every call it finished validates, and the answer is only calls.
    r = client.chat.completions.create(**kwargs, max_tokens=150)
    choice = r.choices[0]
    calls = choice.message.tool_calls
    assert calls and choice.message.content is None, choice
    finished = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    assert choice.finish_reason in ("tool_calls", "length")
    assert finished, choice
    for call in finished:
        check_call(call.function.name, call.function.arguments)


def test_sampled_forced_calls_validate(client):
    # Sampling explores what the grammar allows; every call must still validate.
    r = client.chat.completions.create(
        model="tgi",
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        seed=7,
        n=4,
        max_tokens=120,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        check_call(call.function.name, call.function.arguments)


def test_the_tool_result_goes_back_through_the_template(client, server):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
    ]
    r = client.chat.completions.create(
        model="tgi", messages=messages, tools=TOOLS, temperature=0, max_tokens=8
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The template renders the tool's answer (SmolLM2's shows every message's content).
    t = requests.post(
        f"{server.url}/chat_tokenize", json={"messages": messages, "tools": TOOLS}, timeout=30
    )
    assert t.status_code == 200, t.text
    assert '{"temperature": 22}' in t.json()["templated_text"]


def test_auto_is_not_constrained(client):
    r = client.chat.completions.create(
        model="tgi", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=8
    )
    choice = r.choices[0]
    # SmolLM2 is not told about the tools: it answers in text.
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("extra", "param", "needle"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools",
            "tools[0].function.name",
        ),
        ({"tools": [{"type": "function"}]}, "tools", "tools[0].function"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": [1]}},
                ]
            },
            "tools",
            "tools[0].function.parameters",
        ),
        (
            {
                "messages": [*QUESTION, {"role": "tool", "content": "22 C"}],
                "tools": TOOLS,
            },
            "messages",
            "messages[1].tool_call_id",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
            "one constraint",
        ),
    ],
)
def test_malformed_tool_fields_are_422_naming_the_field(server, extra, param, needle):
    body = {"messages": QUESTION, "max_tokens": 4, **extra}
    r = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_an_engine_without_grammars_refuses_forced_calls(tmp_path):
    with synthetic_server(tmp_path) as s:
        body = {
            "messages": QUESTION,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 4,
        }
        r = requests.post(f"{s.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["param"] == "tool_choice" and "grammar" in err["message"], err
        # auto needs no grammar: the synthetic engine answers.
        body.pop("tool_choice")
        r = requests.post(f"{s.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text


def test_huggingface_hub_client_gets_the_same_calls(server, client):
    from huggingface_hub import InferenceClient

    hub = InferenceClient(base_url=server.url)
    kwargs = dict(
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=60,
    )
    r = hub.chat_completion(QUESTION, **kwargs)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_time"
    check_call("get_time", call.function.arguments)
    # The same request through the openai client: the same (greedy) call.
    o = client.chat.completions.create(model="tgi", messages=QUESTION, **kwargs)
    assert o.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    args = ""
    for chunk in hub.chat_completion(QUESTION, stream=True, **kwargs):
        for d in chunk.choices[0].delta.tool_calls or []:
            args += d.function.arguments or ""
    assert args == call.function.arguments
