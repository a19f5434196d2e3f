"""Token-exact prompts: TGI `input_ids` and `/v1/completions` token-id prompts reach the engine
as given, so a prompt sent as ids generates exactly what the same prompt sent as text does."""

from __future__ import annotations

import requests

PROMPT = "The capital of France is"


def raw_ids(server, text: str) -> list[int]:
    r = requests.post(f"{server.url}/tokenize", json={"inputs": text}, timeout=30)
    return [t["id"] for t in r.json()]


def test_completions_with_ids_equal_completions_with_text(server):
    ids = raw_ids(server, PROMPT)
    body = {"max_tokens": 8, "temperature": 0, "logprobs": 1}
    text = requests.post(
        f"{server.url}/v1/completions", json={**body, "prompt": PROMPT}, timeout=120
    ).json()
    by_ids = requests.post(
        f"{server.url}/v1/completions", json={**body, "prompt": ids}, timeout=120
    ).json()
    assert by_ids["usage"]["prompt_tokens"] == len(ids) == text["usage"]["prompt_tokens"]
    assert by_ids["choices"][0]["text"] == text["choices"][0]["text"]
    assert (
        by_ids["choices"][0]["logprobs"]["token_logprobs"]
        == text["choices"][0]["logprobs"]["token_logprobs"]
    )


def test_completions_accepts_lists_of_id_lists_and_echoes_them(server):
    a, b = raw_ids(server, "One, two,"), raw_ids(server, "Red, green,")
    r = requests.post(
        f"{server.url}/v1/completions",
        json={"prompt": [a, b], "max_tokens": 3, "temperature": 0, "echo": True},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["text"].startswith("One, two,")
    assert choices[1]["text"].startswith("Red, green,")


def test_tgi_input_ids_give_the_exact_sampled_ids(server):
    ids = raw_ids(server, PROMPT)
    r = requests.post(
        f"{server.url}/generate",
        json={
            "input_ids": ids,
            "parameters": {"max_new_tokens": 6, "details": True, "return_full_text": True},
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    d = body["details"]
    assert d["input_length"] == len(ids)
    assert len(d["tokens"]) == d["generated_tokens"]
    assert all(isinstance(t["logprob"], float) for t in d["tokens"])
    assert body["generated_text"].startswith(PROMPT)
    # The same ids through /v1/completions (raw prompt, greedy) sample the same tokens.
    c = requests.post(
        f"{server.url}/v1/completions",
        json={"prompt": ids, "max_tokens": 6, "temperature": 0},
        timeout=120,
    ).json()
    generated = "".join(t["text"] for t in d["tokens"] if not t["special"])
    assert c["choices"][0]["text"] == generated


def test_bad_token_id_prompts_are_422_naming_the_field(server):
    cases = [
        ("/generate", {"input_ids": [10**9]}, "input_ids", "vocabulary"),
        ("/generate", {"input_ids": []}, "input_ids", "non-empty"),
        ("/generate", {"inputs": "x", "input_ids": [1]}, "input_ids", "without `inputs`"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt", "vocabulary"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "prompt"),
    ]
    for path, body, field, needle in cases:
        r = requests.post(f"{server.url}{path}", json=body, timeout=30)
        assert r.status_code == 422, (path, body, r.text)
        message = r.json()["error"] if path == "/generate" else r.json()["error"]["message"]
        assert f"`{field}`" in message or field in message, (body, message)
        assert needle in message, (body, message)
