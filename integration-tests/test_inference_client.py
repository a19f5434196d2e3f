"""huggingface_hub's InferenceClient against the real server: text_generation and
chat_completion, plain and streaming; and the /tokenize route."""

from __future__ import annotations

import pytest
import requests
from huggingface_hub import InferenceClient

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(server) -> InferenceClient:
    return InferenceClient(base_url=server.url, timeout=300)


def test_text_generation_plain_and_details(client):
    text = client.text_generation(QUESTION, max_new_tokens=20)
    assert "Paris" in text
    out = client.text_generation(QUESTION, max_new_tokens=20, details=True)
    assert out.generated_text == text
    assert out.details.generated_tokens == len(out.details.tokens)


def test_text_generation_stream(client):
    plain = client.text_generation(QUESTION, max_new_tokens=12)
    events = list(client.text_generation(QUESTION, max_new_tokens=12, stream=True, details=True))
    # As in TGI, a special token (the final <|im_end|>) streams with its text and special=true.
    assert "".join(e.token.text for e in events if not e.token.special) == plain
    assert events[-1].generated_text == plain


def test_chat_completion_plain_and_stream(client):
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat_completion(messages, max_tokens=20, temperature=0)
    answer = r.choices[0].message.content
    assert "Paris" in answer
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat_completion(messages, max_tokens=20, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == answer


def test_tokenize_matches_the_tokenizer(server, embedded_model_dir):
    from tokenizers import Tokenizer

    text = "Héllo, wörld! 123"
    r = requests.post(f"{server.url}/tokenize", json={"inputs": text}, timeout=30)
    assert r.status_code == 200, r.text
    tokens = r.json()
    expected = Tokenizer.from_file(str(embedded_model_dir / "tokenizer.json")).encode(text)
    assert [t["id"] for t in tokens] == expected.ids
    assert "".join(t["text"] for t in tokens) == text
    assert all(text.encode()[t["start"] : t["stop"]].decode() == t["text"] for t in tokens)
