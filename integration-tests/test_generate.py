"""The real server on the embedded model, driven over raw HTTP."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

PROMPT = "What is the capital of France?"


def generate(server, inputs: str, **parameters) -> requests.Response:
    return requests.post(
        f"{server.url}/generate",
        json={"inputs": inputs, "parameters": parameters},
        timeout=300,
    )


def test_health_and_info(server):
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    info = requests.get(f"{server.url}/info", timeout=5).json()
    assert info["engine"] == "transformers"
    assert "SmolLM2-135M-Instruct" in info["model_id"]
    assert 0 < info["max_input_tokens"] < info["max_total_tokens"]
    assert info["max_batch_size"] == 16
    # The embedded model is an instruct model: TGI inputs go through its chat template.
    assert info["prompt_format"] == "chat"


def test_greedy_output_matches_transformers_generate(server, embedded_model_dir):
    """The served greedy text equals transformers' own generate() on the same checkpoint, with
    the prompt templated by transformers: so the Rust templating and tokenization match too."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = generate(server, PROMPT, max_new_tokens=20, details=True)
    assert r.status_code == 200, r.text
    body = r.json()

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    expected_ids = out[0, ids.shape[1] :].tolist()
    served_ids = [t["id"] for t in body["details"]["tokens"]]
    assert served_ids == expected_ids
    assert body["generated_text"] == tok.decode(expected_ids, skip_special_tokens=True)
    assert body["details"]["finish_reason"] in ("length", "eos_token")
    assert body["details"]["generated_tokens"] == len(expected_ids)


def test_the_readme_question_is_answered(server):
    r = generate(server, PROMPT, max_new_tokens=20)
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["generated_text"]


def test_greedy_is_deterministic(server):
    a = generate(server, "Once upon a time", max_new_tokens=12).json()
    b = generate(server, "Once upon a time", max_new_tokens=12).json()
    assert a["generated_text"] == b["generated_text"] != ""


def test_seeded_sampling_is_reproducible(server):
    params = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_k": 50}
    a = generate(server, "The weather today", seed=1234, **params).json()
    b = generate(server, "The weather today", seed=1234, **params).json()
    assert a["generated_text"] == b["generated_text"]
    outs = {
        generate(server, "The weather today", seed=s, **params).json()["generated_text"]
        for s in range(5)
    }
    assert len(outs) > 1, "different seeds should not all give the same text"


def test_max_new_tokens_is_honoured(server):
    body = generate(server, "Count: 1, 2, 3,", max_new_tokens=5, details=True).json()
    assert body["details"]["generated_tokens"] <= 5
    assert len(body["details"]["tokens"]) == body["details"]["generated_tokens"]


def test_stream_events_concatenate_to_the_final_text(server):
    r = requests.post(
        f"{server.url}/generate_stream",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 16}},
        stream=True,
        timeout=300,
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line[len("data:") :])
        for line in r.iter_lines(decode_unicode=True)
        if line.startswith("data:")
    ]
    assert events, "no events"
    assert all(e["generated_text"] is None for e in events[:-1])
    final = events[-1]
    assert final["details"]["generated_tokens"] == len(events)
    text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert text == final["generated_text"]
    assert [e["index"] for e in events] == list(range(len(events)))


def test_sixteen_concurrent_requests_all_complete(server):
    def one(i: int) -> dict:
        r = generate(server, f"Request number {i}: tell me a fact.", max_new_tokens=16)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    assert all(r["generated_text"] for r in results)


def test_client_disconnect_cancels_in_executor(server):
    before = server.stats().requests_cancelled
    r = requests.post(
        f"{server.url}/generate_stream",
        json={
            "inputs": "Write a very long story about dragons.",
            "parameters": {"max_new_tokens": 400},
        },
        stream=True,
        timeout=300,
    )
    lines = r.iter_lines(decode_unicode=True)
    got = 0
    for line in lines:
        if line.startswith("data:"):
            got += 1
            if got == 3:
                break
    r.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = server.stats()
        if stats.requests_cancelled > before and stats.active_requests == 0:
            break
        time.sleep(0.2)
    assert stats.requests_cancelled > before, stats
    assert stats.active_requests == 0, stats


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"inputs": "hi", "parameters": {"temperature": -1}}, "temperature"),
        ({"inputs": "hi", "parameters": {"top_p": 2}}, "top_p"),
        ({"inputs": "", "parameters": {}}, "inputs"),
        ({"inputs": "hi", "parameters": {"best_of": 3}}, "best_of"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 10**9}}, "max_total_tokens"),
        ({"inputs": "hi", "parameters": {"unknown_knob": 1}}, "unknown_knob"),
        ({"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "stop"),
    ],
)
def test_invalid_requests_get_422_naming_the_problem(server, payload, needle):
    r = requests.post(f"{server.url}/generate", json=payload, timeout=30)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "validation"
    assert needle in body["error"]


def test_prompt_over_the_limit_names_the_limit(server):
    info = requests.get(f"{server.url}/info", timeout=5).json()
    limit = info["max_input_tokens"]
    r = generate(server, "hello " * (limit + 10), max_new_tokens=1)
    assert r.status_code == 422
    assert str(limit) in r.json()["error"]


def test_malformed_json_is_422_not_500(server):
    r = requests.post(
        f"{server.url}/generate",
        data=b'{"inputs": "hi", ',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation"


def test_openapi_document_and_swagger_ui(server):
    doc = requests.get(f"{server.url}/api-doc/openapi.json", timeout=10).json()
    assert "/generate" in doc["paths"] and "/v1/chat/completions" in doc["paths"]
    ui = requests.get(f"{server.url}/docs/", timeout=10)
    assert ui.status_code == 200 and "swagger" in ui.text.lower()
