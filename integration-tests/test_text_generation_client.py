"""Hugging Face's `text-generation` client against the real server."""

from __future__ import annotations

import asyncio

from text_generation import AsyncClient, Client


def test_generate(server):
    client = Client(server.url, timeout=300)
    resp = client.generate("What is the capital of France?", max_new_tokens=12)
    assert resp.generated_text
    assert resp.details.generated_tokens == len(resp.details.tokens) <= 12
    assert resp.details.finish_reason in ("length", "eos_token")


def test_generate_stream_matches_generate(server):
    client = Client(server.url, timeout=300)
    full = client.generate("Tell me about the sea.", max_new_tokens=12).generated_text
    tokens = []
    final = None
    for event in client.generate_stream("Tell me about the sea.", max_new_tokens=12):
        tokens.append(event.token)
        if event.details is not None:
            final = event
    assert final is not None and final.generated_text == full
    assert "".join(t.text for t in tokens if not t.special) == full


def test_async_client_concurrent(server):
    async def main() -> list[str]:
        client = AsyncClient(server.url, timeout=300)
        results = await asyncio.gather(
            *(client.generate(f"Fact {i}:", max_new_tokens=8) for i in range(16))
        )
        return [r.generated_text for r in results]

    texts = asyncio.run(main())
    assert len(texts) == 16 and all(texts)


def test_validation_error_is_raised_as_such(server):
    from text_generation.errors import ValidationError

    client = Client(server.url, timeout=60)
    try:
        client.generate("hi", max_new_tokens=10**8)
    except ValidationError as e:
        assert "max_total_tokens" in str(e)
    else:
        raise AssertionError("expected a ValidationError")


def test_chat(server):
    """text-generation's chat sends every field it knows, unset ones as null
    (repetition_penalty included): the OpenAI route takes them all."""
    from text_generation.types import Message

    client = Client(server.url, timeout=300)
    resp = client.chat(
        messages=[Message(role="user", content="What is the capital of France?")],
        max_tokens=12,
        temperature=0,
    )
    assert resp.choices[0].message.content
    usage = resp.usage if isinstance(resp.usage, dict) else resp.usage.__dict__
    assert usage["completion_tokens"] <= 12
    resp = client.chat(
        messages=[Message(role="user", content="Say hello.")],
        max_tokens=8,
        repetition_penalty=1.3,
        seed=1,
    )
    assert resp.choices[0].finish_reason in ("stop", "length")
