"""Prompt log probabilities and best_of against the real server (embedded model, transformers
engine), checked with the real clients where they expose the fields (huggingface_hub's
InferenceClient, text-generation's Client, openai's completions) against a direct transformers
forward pass of the same checkpoint; and on the synthetic engine, whose values are documented.
"""

from __future__ import annotations

import pytest
import requests
import torch
from conftest import synthetic_server
from huggingface_hub import InferenceClient
from openai import OpenAI
from text_generation import Client

TOL = 1e-3  # the server runs the same float32 weights; CB's kernels differ in the last bits


@pytest.fixture(scope="module")
def model(embedded_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()


def direct(model, ids: list[int], top_n: int = 0):
    """Each token's log probability after the first, from one plain forward pass of `ids`, and
    the top n at each of those positions."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    lsm = torch.log_softmax(logits, dim=-1)
    chosen = lsm.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
    return chosen, (torch.topk(lsm, top_n, dim=-1) if top_n else None)


def tokenize(server, text: str) -> list[int]:
    r = requests.post(f"{server.url}/tokenize", json={"inputs": text}, timeout=60)
    r.raise_for_status()
    return [t["id"] for t in r.json()]


def mean_logprob(tokens) -> float:
    return sum(t.logprob for t in tokens) / len(tokens)


# -- TGI decoder_input_details --------------------------------------------------------------------


def test_inference_client_prefill_equals_a_direct_forward(server, model):
    client = InferenceClient(base_url=server.url, timeout=300)
    out = client.text_generation(
        "The capital of France is",
        max_new_tokens=4,
        details=True,
        decoder_input_details=True,
    )
    prefill = out.details.prefill
    ids = [t.id for t in prefill]
    assert len(ids) == out.details.input_length > 5  # the chat-templated prompt, as sent
    assert prefill[0].logprob is None
    expected, _ = direct(model, ids)
    assert [t.logprob for t in prefill[1:]] == pytest.approx(expected, abs=TOL)
    # The texts are the prompt's, in order (special tokens included, as TGI shows them).
    r = requests.post(
        f"{server.url}/chat_tokenize",
        json={"messages": [{"role": "user", "content": "The capital of France is"}]},
        timeout=60,
    )
    assert "".join(t.text for t in prefill) == r.json()["templated_text"]
    assert [t["id"] for t in r.json()["tokenize_response"]] == ids


def test_text_generation_client_prefill_of_token_ids_equals_a_direct_forward(server, model):
    """Token-id prompts (tensorgate's input_ids) go to the engine as they are, so the prefill is
    exactly those ids; the text-generation client reads the answer."""
    ids = tokenize(server, "Paris is a city of light and")
    r = requests.post(
        f"{server.url}/generate",
        json={
            "input_ids": ids,
            "parameters": {"max_new_tokens": 3, "decoder_input_details": True},
        },
        timeout=300,
    )
    r.raise_for_status()
    details = r.json()["details"]  # decoder_input_details alone brings details, as in TGI
    assert [t["id"] for t in details["prefill"]] == ids
    assert details["prefill"][0]["logprob"] is None
    expected, _ = direct(model, ids)
    assert [t["logprob"] for t in details["prefill"][1:]] == pytest.approx(expected, abs=TOL)
    # The same through text-generation's Client, which parses the prefill.
    client = Client(server.url, timeout=300)
    resp = client.generate("Paris is", max_new_tokens=2, decoder_input_details=True)
    assert resp.details.prefill[0].logprob is None
    got = [t.logprob for t in resp.details.prefill[1:]]
    want, _ = direct(model, [t.id for t in resp.details.prefill])
    assert got == pytest.approx(want, abs=TOL)


def test_prefill_is_empty_without_decoder_input_details(server):
    client = Client(server.url, timeout=300)
    resp = client.generate("Paris is", max_new_tokens=2)
    assert resp.details.prefill == []


def test_streaming_refuses_decoder_input_details_and_best_of_as_tgi(server):
    """TGI's messages; before the first byte, so a 422 here (TGI sends them as an error event).
    text-generation's generate_stream has neither parameter: sent as raw JSON."""
    for route, body in [
        ("/generate_stream", {"inputs": "hi", "parameters": {"decoder_input_details": True}}),
        ("/", {"inputs": "hi", "stream": True, "parameters": {"decoder_input_details": True}}),
    ]:
        r = requests.post(f"{server.url}{route}", json=body, timeout=60)
        assert r.status_code == 422, r.text
        assert r.json() == {
            "error": "`decoder_input_details` == true is not supported when streaming tokens",
            "error_type": "validation",
        }
    r = requests.post(
        f"{server.url}/generate_stream",
        json={"inputs": "hi", "parameters": {"best_of": 2, "do_sample": True}},
        timeout=60,
    )
    assert r.status_code == 422
    assert r.json()["error"] == "`best_of` != 1 is not supported when streaming tokens"


# -- TGI best_of ---------------------------------------------------------------------------------


def test_info_reports_max_best_of(server):
    assert requests.get(f"{server.url}/info", timeout=10).json()["max_best_of"] == 2


def test_best_of_returns_the_best_sequence_and_the_others(server, model):
    client = Client(server.url, timeout=300)
    resp = client.generate(
        "Write a word:",
        max_new_tokens=6,
        best_of=2,
        do_sample=True,
        decoder_input_details=True,
    )
    details = resp.details
    others = details.best_of_sequences
    assert len(others) == 1
    other = others[0]
    # TGI's rule: the highest mean log probability per generated token.
    assert mean_logprob(details.tokens) >= mean_logprob(other.tokens)
    assert details.seed != other.seed  # each sequence its own seed
    assert resp.generated_text == "".join(t.text for t in details.tokens if not t.special)
    # Both sequences' token log probabilities are the model's (no warper: temperature 1), and
    # both carry the prompt's.
    prompt = [t.id for t in details.prefill]
    assert [t.id for t in other.prefill] == prompt
    for seq in (details, other):
        ids = prompt + [t.id for t in seq.tokens]
        expected, _ = direct(model, ids)
        assert [t.logprob for t in seq.tokens] == pytest.approx(
            expected[len(prompt) - 1 :], abs=TOL
        )


def test_inference_client_best_of(server):
    client = InferenceClient(base_url=server.url, timeout=300)
    out = client.text_generation(
        "Name a colour:", max_new_tokens=5, best_of=2, do_sample=True, details=True
    )
    assert len(out.details.best_of_sequences) == 1
    best = out.details
    other = out.details.best_of_sequences[0]
    assert mean_logprob(best.tokens) >= mean_logprob(other.tokens)
    assert best.prefill == [] and other.prefill == []


def test_best_of_without_details_answers_the_text_only(server):
    r = requests.post(
        f"{server.url}/generate",
        json={
            "inputs": "Hi",
            "parameters": {"max_new_tokens": 3, "best_of": 2, "temperature": 0.7},
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"generated_text"}


@pytest.mark.parametrize(
    ("parameters", "field", "says"),
    [
        ({"best_of": 3, "do_sample": True}, "best_of", "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"best_of": 2}, "best_of", "you must use sampling when `best_of` is > 1"),
        (
            {"best_of": 2, "do_sample": True, "seed": 5},
            "seed",
            "`seed` must not be set when `best_of` > 1",
        ),
    ],
)
def test_best_of_limits_are_422_naming_the_field(server, parameters, field, says):
    r = requests.post(
        f"{server.url}/generate",
        json={"inputs": "Hi", "parameters": {"max_new_tokens": 2, **parameters}},
        timeout=60,
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "validation" and body["error"] == says
    assert field in body["error"]


# -- OpenAI completions echo + logprobs -----------------------------------------------------------


@pytest.fixture(scope="module")
def openai_client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300)


def test_echo_with_logprobs_puts_the_prompt_tokens_first(server, openai_client, model):
    prompt = "The sea is"
    ids = tokenize(server, prompt)
    r = openai_client.completions.create(
        model="tgi", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    n = len(ids)
    assert len(lp.tokens) == n + r.usage.completion_tokens
    assert "".join(lp.tokens[:n]) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected, top = direct(model, ids, 2)
    assert lp.token_logprobs[1:n] == pytest.approx(expected, abs=TOL)
    for i in range(1, n):
        assert len(lp.top_logprobs[i]) == 2
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(
            top.values[i - 1].tolist(), abs=TOL
        )
    # Offsets run over the whole text: the prompt's tokens from 0, then the generated ones.
    assert lp.text_offset[0] == 0
    assert lp.text_offset[n] == len(prompt)
    assert lp.text_offset == sorted(lp.text_offset)
    # The generated part is what the same request answers without echo.
    plain = openai_client.completions.create(
        model="tgi", prompt=prompt, max_tokens=3, temperature=0, logprobs=2
    ).choices[0]
    assert choice.text == prompt + plain.text
    assert lp.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=TOL)


def test_echo_with_logprobs_of_token_id_prompts(server, model):
    a = tokenize(server, "One two three")
    b = tokenize(server, "Red green")
    r = requests.post(
        f"{server.url}/v1/completions",
        json={"prompt": [a, b], "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 0},
        timeout=300,
    )
    r.raise_for_status()
    for ids, choice in zip((a, b), r.json()["choices"], strict=True):
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None
        expected, _ = direct(model, ids)
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=TOL)
        assert lp["top_logprobs"][1] == {}  # logprobs 0: no alternatives, as OpenAI's
        assert len(lp["tokens"]) == len(ids) + 2


def test_streamed_echo_with_logprobs_matches_the_whole_answer(openai_client):
    kwargs = dict(model="tgi", prompt="A cat", max_tokens=4, temperature=0, echo=True, logprobs=1)
    whole = openai_client.completions.create(**kwargs).choices[0]
    chunks = list(openai_client.completions.create(stream=True, **kwargs))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0].startswith("A cat")  # the echo rides with the first token
    assert "".join(texts) == whole.text
    tokens: list[str] = []
    logprobs: list[float | None] = []
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            tokens += c.choices[0].logprobs.tokens
            logprobs += c.choices[0].logprobs.token_logprobs
    assert tokens == whole.logprobs.tokens
    assert logprobs[0] is None
    assert logprobs[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)


def test_echo_logprobs_over_the_limit_is_422(server):
    r = requests.post(
        f"{server.url}/v1/completions",
        json={"prompt": "hi", "max_tokens": 2, "echo": True, "logprobs": 99},
        timeout=60,
    )
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert "<= 5" in message and "99" in message, message


# -- the synthetic engine --------------------------------------------------------------------------


def test_synthetic_prefill_is_its_documented_values(tmp_path):
    from tensorgate.executor.engines.synthetic import prompt_logprob

    with synthetic_server(tmp_path, "--iteration-ms", "1") as s:
        ids = [1500, 1501, 2000, 4000, 17]
        r = requests.post(
            f"{s.url}/generate",
            json={
                "input_ids": ids,
                "parameters": {"max_new_tokens": 2, "decoder_input_details": True},
            },
            timeout=60,
        )
        r.raise_for_status()
        prefill = r.json()["details"]["prefill"]
        assert [t["id"] for t in prefill] == ids
        assert [t["logprob"] for t in prefill] == [None] + [
            prompt_logprob(ids[i], i) for i in range(1, len(ids))
        ]
        # It returns no token log probabilities, so it cannot rank best_of sequences.
        r = requests.post(
            f"{s.url}/generate",
            json={"input_ids": ids, "parameters": {"best_of": 2, "do_sample": True}},
            timeout=60,
        )
        assert r.status_code == 422
        assert r.json()["error"].startswith("`best_of` is not supported by this server's engine")
