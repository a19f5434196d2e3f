"""The official `openai` client against the real server (chat and completions, plain and
streaming)."""

from __future__ import annotations

import openai
import pytest
import requests
from openai import OpenAI

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert len(models.data) == 1
    assert "SmolLM2" in models.data[0].id


def test_chat_completion_answers(client):
    r = client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=20,
        temperature=0,
    )
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.system_fingerprint.startswith("tensorgate-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_plain_and_reports_usage(client):
    kwargs = dict(
        model="tgi",
        messages=[
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        ],
        max_completion_tokens=16,
        temperature=0,
    )
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_seeded_chat_is_reproducible_and_n_gives_choices(client):
    kwargs = dict(
        model="tgi",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=12,
        temperature=1.0,
        seed=5,
    )
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b
    r = client.chat.completions.create(**kwargs, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.choices[0].message.content == a


def test_stop_sequence_is_not_in_the_text(client):
    r = client.completions.create(
        model="tgi", prompt="1, 2, 3, 4, 5, 6,", max_tokens=20, temperature=0
    )
    full = r.choices[0].text
    assert "8" in full, full
    cut = client.completions.create(
        model="tgi", prompt="1, 2, 3, 4, 5, 6,", max_tokens=20, temperature=0, stop=["8"]
    )
    assert cut.choices[0].text == full[: full.index("8")]
    assert cut.choices[0].finish_reason == "stop"


def test_completions_plain_stream_and_echo(client):
    plain = client.completions.create(model="tgi", prompt="The sea is", max_tokens=8, temperature=0)
    assert plain.object == "text_completion"
    text = plain.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tgi", prompt="The sea is", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text
    echoed = client.completions.create(
        model="tgi", prompt="The sea is", max_tokens=8, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "The sea is" + text
    two = client.completions.create(model="tgi", prompt=["A", "B"], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]


def test_unsupported_features_are_422_in_openai_shape(client, server):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(
            model="tgi",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )
    assert "tool_choice" in str(e.value)
    r = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        timeout=30,
    )
    assert r.status_code == 422
    body = r.json()["error"]
    assert body["type"] == "invalid_request_error" and "`max_tokens`" in body["message"]
    assert body["param"] == "max_tokens"
    r = requests.post(f"{server.url}/v1/completions", json={"prompt": "x", "bogus": 1}, timeout=30)
    assert r.status_code == 422 and "bogus" in r.json()["error"]["message"]


def test_chat_logprobs_plain_and_streaming(client):
    kwargs = dict(
        model="tgi",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    r = client.chat.completions.create(**kwargs)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode())
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4
    text = "".join(e.token for e in content)
    assert r.choices[0].message.content in text

    streamed = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed.extend(c.logprobs.content)
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [round(e.logprob, 4) for e in streamed] == [round(e.logprob, 4) for e in content]


def test_completion_logprobs_legacy_shape(client):
    r = client.completions.create(
        model="tgi", prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 5
    assert all(len(top) == 3 for top in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset[0] == 0


def test_top_logprobs_over_the_engine_limit_is_422(client):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(
            model="tgi",
            messages=[{"role": "user", "content": "hi"}],
            logprobs=True,
            top_logprobs=20,
        )
    assert "top_logprobs" in str(e.value)


def test_models_created_is_the_load_time(server, client):
    import time

    created = client.models.list().data[0].created
    assert 1_700_000_000 < created <= time.time()


def test_message_name_user_and_parallel_tool_calls(server, client):
    # `name` reaches the chat template and `user` is recorded: both are accepted.
    r = client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": QUESTION, "name": "ada"}],
        max_tokens=2,
        temperature=0,
        user="end-user-42",
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    # Tool calling is served (test_tools.py); its switch without tools changes nothing.
    r = requests.post(
        f"{server.url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": QUESTION}],
            "parallel_tool_calls": False,
            "max_tokens": 2,
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
