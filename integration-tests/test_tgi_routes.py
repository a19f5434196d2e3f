"""TGI's `/chat_tokenize` and the generating health probe `/health_generate` against the real
server, and the details of `/generate` (one entry per generated token)."""

from __future__ import annotations

import requests
from transformers import AutoTokenizer

MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_chat_tokenize_is_the_prompt_transformers_renders(server, embedded_model_dir):
    r = requests.post(f"{server.url}/chat_tokenize", json={"messages": MESSAGES}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    expected = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert body["templated_text"] == expected
    ids = [t["id"] for t in body["tokenize_response"]]
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]
    first = body["tokenize_response"][0]
    text = body["templated_text"].encode()
    assert text[first["start"] : first["stop"]].decode() == first["text"]


def test_chat_tokenize_counts_what_a_chat_completion_sends(server):
    r = requests.post(f"{server.url}/chat_tokenize", json={"messages": MESSAGES}, timeout=30)
    n = len(r.json()["tokenize_response"])
    chat = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 1, "temperature": 0},
        timeout=120,
    )
    assert chat.json()["usage"]["prompt_tokens"] == n


def test_chat_tokenize_refuses_bad_input_in_tgi_shape(server):
    r = requests.post(f"{server.url}/chat_tokenize", json={"messages": []}, timeout=30)
    assert r.status_code == 422
    body = r.json()
    assert body["error_type"] == "validation"
    assert "`messages`" in body["error"]
    r = requests.post(f"{server.url}/chat_tokenize", json={"message": MESSAGES}, timeout=30)
    assert r.status_code == 422
    assert "message" in r.json()["error"]


def test_health_generate_generates_a_token(server):
    before = server.stats().tokens_generated
    r = requests.get(f"{server.url}/health_generate", timeout=30)
    assert r.status_code == 200, r.text
    assert server.stats().tokens_generated >= before + 1


def test_generate_details_has_one_token_per_generated_token(server):
    for max_new in (1, 7):
        r = requests.post(
            f"{server.url}/generate",
            json={
                "inputs": "Count to ten:",
                "parameters": {"max_new_tokens": max_new, "details": True},
            },
            timeout=120,
        )
        details = r.json()["details"]
        assert len(details["tokens"]) == details["generated_tokens"] <= max_new
