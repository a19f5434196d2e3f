"""Structured output and the sampling set through the real server (router → executor →
transformers engine on the embedded model), with real clients: the grammar is enforced token by
token in the engine, so the output parses whatever the model would have said."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from openai import OpenAI
from pydantic import BaseModel, Field

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600)


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int


def test_openai_parse_returns_the_pydantic_object(client):
    r = client.chat.completions.parse(
        model="tgi",
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format=Person,
        max_tokens=80,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_tgi_grammar_regex_gives_a_full_match(server):
    pattern = r"[0-9]{3}-[a-z]{2}"
    r = requests.post(
        f"{server.url}/generate",
        json={
            "inputs": "Write a product code.",
            "parameters": {
                "max_new_tokens": 20,
                "grammar": {"type": "regex", "value": pattern},
                "details": True,
            },
        },
        timeout=600,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert re.fullmatch(pattern, body["generated_text"]), body
    assert body["details"]["finish_reason"] == "eos_token"


def test_tgi_grammar_json_gives_an_object_of_the_schema(server):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    r = requests.post(
        f"{server.url}/generate",
        json={
            "inputs": "What is the capital of France? Answer in JSON.",
            "parameters": {"max_new_tokens": 40, "grammar": {"type": "json", "value": schema}},
        },
        timeout=600,
    )
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["generated_text"]), schema)


PROMPT = "The capital of France is"


def test_logit_bias_bans_the_greedy_first_token_and_forces_another(client, tokenizer):
    def first(**kwargs) -> str:
        r = client.completions.create(
            model="tgi", prompt=PROMPT, max_tokens=1, temperature=0, **kwargs
        )
        return r.choices[0].text

    greedy = first()
    (greedy_id,) = tokenizer.encode(greedy, add_special_tokens=False)
    banned = first(logit_bias={str(greedy_id): -100})
    assert banned != greedy
    (purple,) = tokenizer.encode(" purple", add_special_tokens=False)
    assert first(logit_bias={str(purple): 100}) == " purple"


def test_penalties_change_a_repetitive_greedy_output(client, server):
    prompt = "na na na na na na"

    def text(**kwargs) -> str:
        r = client.completions.create(
            model="tgi", prompt=prompt, max_tokens=12, temperature=0, **kwargs
        )
        return r.choices[0].text

    plain = text()
    assert plain.count("na") >= 10, plain  # greedy, the model keeps repeating itself
    assert text(frequency_penalty=2.0).count("na") < plain.count("na")
    assert text(presence_penalty=2.0).count("na") < plain.count("na")

    def generate(**parameters) -> str:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, **parameters}}
        r = requests.post(f"{server.url}/generate", json=body, timeout=600)
        assert r.status_code == 200, r.text
        return r.json()["generated_text"]

    assert generate(repetition_penalty=3.0) != generate()


# --- at least 100 generated JSON schemas, each enforced --------------------------------------
# Every schema's valid outputs are short by construction (bounded strings, arrays, property
# counts; every property required), so each fits in MAX_TOKENS and a failure is a real one.

MAX_TOKENS = 120
SCHEMAS = 100
_names = st.sampled_from(["id", "name", "age", "ok", "tags", "score", "city", "kind", "size"])
_leaf = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 8)),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-100, 100),
        st.integers(0, 1000),
    ),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(
        lambda xs: {"enum": xs},
        st.lists(st.text("abcdefgh", min_size=1, max_size=6), min_size=1, max_size=4, unique=True),
    ),
    st.builds(
        lambda n: {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 99},
            "maxItems": n,
        },
        st.integers(0, 3),
    ),
)


def _object(values):
    return st.dictionaries(_names, values, min_size=1, max_size=3).map(
        lambda props: {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,
        }
    )


SCHEMA = _object(st.one_of(_leaf, _object(_leaf)))


def _draw_schemas() -> list[dict]:
    drawn: list[dict] = []

    # One example of a list of distinct schemas: the requests then run concurrently (the
    # engine batches them), which one request per example could not.
    @settings(
        max_examples=1,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(SCHEMA, min_size=SCHEMAS, max_size=SCHEMAS, unique_by=json.dumps))
    def draw(schemas):
        drawn.extend(schemas)

    draw()
    return drawn


def _ask(client: OpenAI, index: int, schema: dict) -> str | None:
    """Runs one schema (every other one streamed); None when the output validates."""
    kwargs = dict(
        model="tgi",
        messages=[{"role": "user", "content": "Reply with a JSON object."}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": f"schema{index}", "schema": schema, "strict": True},
        },
    )
    if index % 2:
        parts, finish = [], None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        text = "".join(parts)
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError) as e:
        return f"schema {json.dumps(schema)}: {finish}: {text!r}: {str(e).splitlines()[0]}"
    return None if finish == "stop" else f"schema {json.dumps(schema)}: finish {finish}"


def test_generated_json_schemas_each_give_output_that_validates(client):
    schemas = _draw_schemas()
    assert len(schemas) == SCHEMAS and len({json.dumps(s) for s in schemas}) == SCHEMAS
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda a: _ask(client, *a), enumerate(schemas)))
    failures = [r for r in results if r is not None]
    assert not failures, f"{len(failures)} of {SCHEMAS} failed:\n" + "\n".join(failures[:10])
