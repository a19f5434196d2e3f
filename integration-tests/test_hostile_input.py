"""Hostile and malformed requests against the real server, on the TGI and the OpenAI routes.

Every case must get a 4xx with a JSON body in the route family's error shape whose message
names what was wrong (the field, or the limit): never a 5xx, a hang or a dead server. The last
test checks that the server is still healthy and still generates after all of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests

TGI_ROUTES = ["/generate", "/generate_stream", "/"]
OPENAI_ROUTES = ["/v1/completions", "/v1/chat/completions"]
ALL_ROUTES = TGI_ROUTES + OPENAI_ROUTES

PAYLOAD_LIMIT = 2_000_000  # the router's default --payload-limit
TIMEOUT = (10, 120)  # (connect, read): a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def info(server) -> dict:
    r = requests.get(f"{server.url}/info", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def is_openai(route: str) -> bool:
    return route.startswith("/v1/")


def body_for(route: str, *, prompt: str = "Hi", **params) -> dict:
    """A valid request with a tiny generation, plus `params` in the route's own place."""
    if route == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2, **params}
    if route == "/v1/completions":
        return {"prompt": prompt, "max_tokens": 2, **params}
    return {"inputs": prompt, "parameters": {"max_new_tokens": 2, **params}}


def post_raw(
    server, route: str, data: bytes | Iterator[bytes], content_type: str | None = "application/json"
) -> requests.Response:
    headers = {} if content_type is None else {"Content-Type": content_type}
    return requests.post(f"{server.url}{route}", data=data, headers=headers, timeout=TIMEOUT)


def post_json(server, route: str, body) -> requests.Response:
    return post_raw(server, route, json.dumps(body).encode())


def error_message(route: str, r: requests.Response) -> str:
    """The message of an error response, after checking the family's error shape."""
    assert r.headers.get("content-type", "").startswith("application/json"), (
        r.status_code,
        r.headers,
        r.text[:500],
    )
    body = r.json()
    if is_openai(route):
        assert set(body) == {"error"}, body
        err = body["error"]
        assert isinstance(err.get("message"), str) and err["message"], body
        assert err.get("type") == "invalid_request_error", body
        return err["message"]
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("error_type"), str) and body["error_type"], body
    return body["error"]


def assert_rejected(
    route: str,
    r: requests.Response,
    *needles: str,
    status: int | tuple[int, ...] = (400, 413, 415, 422),
) -> str:
    """A clear client error: the expected status, the family's shape, and a message holding
    every one of `needles` (a needle may be a tuple of alternatives)."""
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, f"{route}: {r.status_code} {r.text[:500]}"
    message = error_message(route, r)
    for needle in needles:
        options = needle if isinstance(needle, tuple) else (needle,)
        assert any(o.lower() in message.lower() for o in options), (
            f"{route}: message {message[:500]!r} does not name any of {options}"
        )
    return message


# --- transport-level: size, encoding, content type ---------------------------------------


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_body_over_the_payload_limit_is_413(server, route):
    body = json.dumps(body_for(route, prompt="a" * (PAYLOAD_LIMIT + 10))).encode()
    assert len(body) > PAYLOAD_LIMIT
    r = post_raw(server, route, body)
    assert_rejected(route, r, "payload-limit", status=413)


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_chunked_body_over_the_payload_limit_is_413(server, route):
    """No Content-Length: the limit must hold while the body streams in."""

    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "'
        for _ in range(30):
            yield b"a" * 100_000
        yield b'"}'

    r = post_raw(server, route, chunks())
    assert_rejected(route, r, "payload-limit", status=413)


INVALID_JSON = [
    pytest.param(b'{"inputs": "Hi",', id="truncated"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b"{inputs: 'Hi'}", id="unquoted"),
    pytest.param(b'{"inputs": "Hi"} trailing', id="trailing-garbage"),
    pytest.param(b'{"inputs": "Hi", "inputs": "Ho"}', id="duplicate-key"),
    pytest.param(b"\x00\x01\x02", id="binary"),
]


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize("data", INVALID_JSON)
def test_invalid_json_is_422(server, route, data):
    r = post_raw(server, route, data)
    assert_rejected(route, r, ("json", "parse", "duplicate", "EOF", "expected"), status=(400, 422))


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_invalid_utf8_is_422(server, route):
    body = json.dumps(body_for(route, prompt="@@@")).encode().replace(b"@@@", b"\xff\xfe\xc3(")
    r = post_raw(server, route, body)
    assert_rejected(route, r, ("utf-8", "utf8", "unicode"), status=(400, 422))


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_lone_surrogate_escape_is_422(server, route):
    body = json.dumps(body_for(route, prompt="@@@")).encode().replace(b"@@@", rb"\ud800")
    r = post_raw(server, route, body)
    assert_rejected(route, r, ("surrogate", "unicode", "escape"), status=(400, 422))


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_wrong_content_type_is_415(server, route, content_type):
    body = json.dumps(body_for(route)).encode()
    r = post_raw(server, route, body, content_type=content_type)
    assert_rejected(route, r, "content-type", status=415)


# --- absurd numbers ------------------------------------------------------------------------


def max_tokens_field(route: str) -> str:
    return "max_tokens" if is_openai(route) else "max_new_tokens"


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_absurd_max_new_tokens_names_the_limit(server, route, info):
    field = max_tokens_field(route)
    r = post_json(server, route, body_for(route, **{field: 10**12}))
    # The message names the parameter (TGI's name is accepted on /v1 too) and the limit.
    assert_rejected(
        route, r, ("max_tokens", "max_new_tokens"), str(info["max_total_tokens"]), status=422
    )


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize("value", [-1, 0])
def test_non_positive_max_new_tokens_is_422(server, route, value):
    field = max_tokens_field(route)
    r = post_json(server, route, body_for(route, **{field: value}))
    assert_rejected(route, r, ("max_tokens", "max_new_tokens"), "positive", status=422)


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize("value", [10**20, -(10**20), 1.5, "4", True])
def test_max_new_tokens_of_the_wrong_type_is_422(server, route, value):
    field = max_tokens_field(route)
    r = post_json(server, route, body_for(route, **{field: value}))
    assert_rejected(route, r, status=422)


SAMPLING_CASES = [
    # (parameter, JSON text of the value, what the message must hold)
    # TGI: "must be strictly positive"; OpenAI (where 0 is greedy): "must be >= 0 and <= 2".
    ("temperature", "-1", (("positive", ">= 0"),)),
    ("temperature", "-0.5", (("positive", ">= 0"),)),
    ("temperature", "1e300", ("finite",)),
    ("temperature", "-1e300", (("finite", "positive"),)),
    ("top_p", "-0.5", ("top_p",)),
    ("top_p", "0", ("top_p",)),
    ("top_p", "1.5", ("top_p",)),
    ("top_p", "1e300", ("top_p", "finite")),
    ("frequency_penalty", "5", ("frequency_penalty",)),
    ("presence_penalty", "-1e300", ("presence_penalty",)),
]


def with_raw_param(route: str, name: str, raw: str) -> bytes:
    """The route's body with `name` set to `raw`, as written (raw may be invalid JSON)."""
    body = json.dumps(body_for(route, **{name: "@@@"})).encode()
    return body.replace(b'"@@@"', raw.encode())


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize(("name", "raw", "needles"), SAMPLING_CASES)
def test_out_of_range_sampling_names_the_parameter(server, route, name, raw, needles):
    r = post_raw(server, route, with_raw_param(route, name, raw))
    needles = needles if name in needles else (name, *needles)
    assert_rejected(route, r, *needles, status=422)


@pytest.mark.parametrize("route", TGI_ROUTES)
@pytest.mark.parametrize("raw", ["-5", "0", "1e300", "2.5"])
def test_bad_top_k_is_422(server, route, raw):
    r = post_raw(server, route, with_raw_param(route, "top_k", raw))
    assert_rejected(route, r, "top_k", status=422)


@pytest.mark.parametrize("route", OPENAI_ROUTES)
def test_top_k_is_an_unknown_field_on_openai_routes(server, route):
    r = post_raw(server, route, with_raw_param(route, "top_k", "5"))
    assert_rejected(route, r, "top_k", status=422)


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize("name", ["temperature", "top_p", "top_k"])
@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "nan", "1e999"])
def test_non_finite_literals_are_invalid_json(server, route, name, raw):
    """JSON has no NaN or Infinity, and 1e999 overflows f64: all are syntax errors."""
    r = post_raw(server, route, with_raw_param(route, name, raw))
    assert_rejected(route, r, status=(400, 422))


# --- stop sequences ------------------------------------------------------------------------


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_ten_thousand_stop_sequences_name_the_limit(server, route, info):
    stops = [f"s{i}" for i in range(10_000)]
    r = post_json(server, route, body_for(route, stop=stops))
    assert_rejected(route, r, "stop", str(info["max_stop_sequences"]), "10000", status=422)


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_one_huge_stop_sequence_names_the_limit(server, route):
    r = post_json(server, route, body_for(route, stop=["x" * 1_000_000]))
    assert_rejected(route, r, "stop", "256", "1000000", status=422)


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_empty_stop_sequence_is_422(server, route):
    r = post_json(server, route, body_for(route, stop=[""]))
    assert_rejected(route, r, "stop", status=422)


# --- prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_prompt_over_max_input_tokens_names_the_limit(server, route, info):
    prompt = "hello " * (info["max_input_tokens"] + 500)
    r = post_json(server, route, body_for(route, prompt=prompt))
    assert_rejected(route, r, str(info["max_input_tokens"]), status=422)


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_prompt_of_a_million_tokens_under_the_payload_limit(server, route, info):
    """~1.9 MB of single-token words: tokenizing it must not stall the server."""
    prompt = "1 " * 950_000
    r = post_json(server, route, body_for(route, prompt=prompt))
    assert_rejected(route, r, str(info["max_input_tokens"]), status=(413, 422))


@pytest.mark.parametrize("route", [*TGI_ROUTES, "/v1/completions"])
def test_empty_prompt_is_422(server, route):
    # (An empty chat message is a valid message: the template still makes a prompt.)
    r = post_json(server, route, body_for(route, prompt=""))
    assert_rejected(route, r, status=422)


# --- deep nesting and huge lists -----------------------------------------------------------

DEPTH = 10_000


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_chat_content_nested_ten_thousand_deep(server):
    route = "/v1/chat/completions"
    body = b'{"messages": [{"role": "user", "content": ' + nested(DEPTH) + b'}], "max_tokens": 2}'
    r = post_raw(server, route, body)
    assert_rejected(route, r, ("recursion", "nest", "depth", "content"), status=(400, 422))


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_deeply_nested_objects_in_free_form_fields(server, route):
    """Fields typed as any JSON value (grammar, tools, logit_bias) must still be depth-bounded."""
    deep = b'{"a":' * DEPTH + b"1" + b"}" * DEPTH
    field = {
        "/v1/chat/completions": "response_format",
        "/v1/completions": "logit_bias",
    }.get(route, "grammar")
    r = post_raw(server, route, with_raw_param(route, field, deep.decode()))
    assert_rejected(route, r, ("recursion", "nest", "depth"), status=(400, 422))


@pytest.mark.parametrize("route", TGI_ROUTES)
def test_inputs_nested_ten_thousand_deep(server, route):
    body = b'{"inputs": ' + nested(DEPTH) + b', "parameters": {"max_new_tokens": 2}}'
    r = post_raw(server, route, body)
    assert_rejected(route, r, ("recursion", "inputs"), status=(400, 422))


def test_hundred_thousand_messages(server):
    route = "/v1/chat/completions"
    messages = [{"role": "user", "content": "a"}] * 100_000
    r = post_json(server, route, {"messages": messages, "max_tokens": 2})
    # Over 2 MB as JSON: refused by size; under a larger limit it would be the token limit.
    assert_rejected(route, r, ("payload-limit", "tokens"), status=(413, 422))


def test_fifty_thousand_messages_under_the_payload_limit(server, info):
    """Rendered through the chat template and tokenized: must end in a clear token-limit 422."""
    route = "/v1/chat/completions"
    messages = [{"role": "user", "content": "a"}] * 50_000
    body = json.dumps({"messages": messages, "max_tokens": 2}, separators=(",", ":")).encode()
    assert len(body) < PAYLOAD_LIMIT
    r = post_raw(server, route, body)
    assert_rejected(route, r, str(info["max_input_tokens"]), status=422)


def test_completions_prompt_list_is_bounded(server):
    route = "/v1/completions"
    r = post_json(server, route, {"prompt": ["a"] * 10_000, "max_tokens": 2})
    assert_rejected(route, r, "prompt", status=422)


# --- chat messages -------------------------------------------------------------------------

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("role", [1, None, ["user"], {"r": "user"}, True, 1.5])
def test_non_string_role_is_422(server, role):
    r = post_json(server, CHAT, {"messages": [{"role": role, "content": "Hi"}], "max_tokens": 2})
    assert_rejected(CHAT, r, ("role", "string"), status=422)


def test_missing_role_is_422(server):
    r = post_json(server, CHAT, {"messages": [{"content": "Hi"}], "max_tokens": 2})
    assert_rejected(CHAT, r, "role", status=422)


def test_empty_messages_list_is_422(server):
    r = post_json(server, CHAT, {"messages": [], "max_tokens": 2})
    assert_rejected(CHAT, r, "messages", status=422)


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param(None, id="null"),
        pytest.param("Hi", id="string"),
        pytest.param({"role": "user", "content": "Hi"}, id="object"),
        pytest.param([None], id="list-of-null"),
        pytest.param(["Hi"], id="list-of-string"),
        pytest.param([[{"role": "user", "content": "Hi"}]], id="list-of-list"),
    ],
)
def test_messages_of_the_wrong_type_is_422(server, messages):
    r = post_json(server, CHAT, {"messages": messages, "max_tokens": 2})
    assert_rejected(CHAT, r, status=422)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(5, id="int"),
        pytest.param({"text": "Hi"}, id="object"),
        pytest.param([5], id="list-of-int"),
        pytest.param([{"text": "Hi"}], id="part-without-type"),
        pytest.param([{"type": "image_url", "image_url": {"url": "http://x"}}], id="image"),
        pytest.param([{"type": "text"}], id="text-part-without-text"),
        pytest.param([{"type": "text", "text": 5}], id="text-part-int"),
    ],
)
def test_content_of_the_wrong_type_is_422(server, content):
    r = post_json(server, CHAT, {"messages": [{"role": "user", "content": content}]})
    assert_rejected(CHAT, r, status=422)


def test_missing_messages_is_422(server):
    r = post_json(server, CHAT, {"max_tokens": 2})
    assert_rejected(CHAT, r, "messages", status=422)


# --- unknown fields and wrong types --------------------------------------------------------


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_unknown_top_level_field_is_named(server, route):
    body = body_for(route)
    body["definitely_not_a_field"] = 1
    r = post_json(server, route, body)
    assert_rejected(route, r, "definitely_not_a_field", status=422)


@pytest.mark.parametrize("route", TGI_ROUTES)
def test_unknown_parameter_is_named(server, route):
    r = post_json(server, route, body_for(route, max_tokens=3))
    assert_rejected(route, r, "max_tokens", status=422)


def test_unknown_message_field_is_refused_or_ignored_but_never_5xx(server):
    r = post_json(
        server,
        CHAT,
        {"messages": [{"role": "user", "content": "Hi", "bogus": 1}], "max_tokens": 1},
    )
    assert r.status_code < 500, r.text


TGI_WRONG_TYPES = [
    pytest.param({"inputs": 123}, id="inputs-int"),
    pytest.param({"inputs": None}, id="inputs-null"),
    pytest.param({"inputs": ["Hi"]}, id="inputs-list"),
    pytest.param({"inputs": {"text": "Hi"}}, id="inputs-object"),
    pytest.param({"parameters": {"max_new_tokens": 2}}, id="inputs-missing"),
    pytest.param({"inputs": "Hi", "parameters": "fast"}, id="parameters-string"),
    # serde accepts a struct as a positional array: these would set max_new_tokens = 2.
    pytest.param({"inputs": "Hi", "parameters": [None] * 8 + [False, 2]}, id="parameters-list"),
    pytest.param(["Hi", [None] * 8 + [False, 2]], id="body-positional-list"),
    pytest.param({"inputs": "Hi", "parameters": {"temperature": "hot"}}, id="temperature-string"),
    pytest.param({"inputs": "Hi", "parameters": {"top_k": "5"}}, id="top_k-string"),
    pytest.param({"inputs": "Hi", "parameters": {"stop": "x"}}, id="stop-string"),
    pytest.param({"inputs": "Hi", "parameters": {"stop": [1, 2]}}, id="stop-ints"),
    pytest.param({"inputs": "Hi", "parameters": {"do_sample": "yes"}}, id="do_sample-string"),
    pytest.param({"inputs": "Hi", "parameters": {"seed": -1}}, id="seed-negative"),
    pytest.param({"inputs": "Hi", "parameters": {"seed": 2**64}}, id="seed-too-big"),
    pytest.param({"inputs": "Hi", "parameters": {"truncate": 0}}, id="truncate-zero"),
    pytest.param({"inputs": "Hi", "parameters": {"truncate": 10**12}}, id="truncate-huge"),
    pytest.param({"inputs": "Hi", "parameters": {"top_n_tokens": 10**6}}, id="top_n-huge"),
    pytest.param({"inputs": "Hi", "parameters": {"best_of": 10**6}}, id="best_of-huge"),
    pytest.param({"inputs": "Hi", "stream": "yes"}, id="stream-string"),
    pytest.param([{"inputs": "Hi"}], id="body-list"),
    pytest.param("Hi", id="body-string"),
    pytest.param(None, id="body-null"),
    pytest.param(42, id="body-int"),
]


@pytest.mark.parametrize("route", TGI_ROUTES)
@pytest.mark.parametrize("body", TGI_WRONG_TYPES)
def test_tgi_wrong_types_are_422(server, route, body):
    r = post_json(server, route, body)
    assert_rejected(route, r, status=422)


OPENAI_WRONG_TYPES = [
    pytest.param({"prompt": 5}, id="prompt-int"),
    pytest.param({"prompt": None}, id="prompt-null"),
    pytest.param({"prompt": [1, 2, 3]}, id="prompt-token-ids"),
    pytest.param({"prompt": []}, id="prompt-empty-list"),
    pytest.param({"messages": "Hi"}, id="messages-string"),
    pytest.param({"n": -1}, id="n-negative"),
    pytest.param({"n": 0}, id="n-zero"),
    pytest.param({"n": 10**6}, id="n-huge"),
    pytest.param({"n": "2"}, id="n-string"),
    pytest.param({"stream": "yes"}, id="stream-string"),
    pytest.param({"stop": 5}, id="stop-int"),
    pytest.param({"stop": [5]}, id="stop-list-of-int"),
    pytest.param({"temperature": "hot"}, id="temperature-string"),
    pytest.param({"seed": -1}, id="seed-negative"),
    pytest.param({"stream_options": {"bogus": True}}, id="stream_options-unknown"),
    pytest.param({"stream_options": "yes"}, id="stream_options-string"),
    pytest.param({"logit_bias": {"1": 100}}, id="logit_bias"),
    pytest.param({"user": 5}, id="user-int"),
    pytest.param({"model": 5}, id="model-int"),
]


@pytest.mark.parametrize("route", OPENAI_ROUTES)
@pytest.mark.parametrize("fields", OPENAI_WRONG_TYPES)
def test_openai_wrong_types_are_422(server, route, fields):
    body = body_for(route)
    body.update(fields)
    r = post_json(server, route, body)
    assert_rejected(route, r, status=422)


@pytest.mark.parametrize("route", OPENAI_ROUTES)
@pytest.mark.parametrize("body", [[], "Hi", None, 42], ids=["list", "string", "null", "int"])
def test_openai_body_not_an_object_is_422(server, route, body):
    r = post_json(server, route, body)
    assert_rejected(route, r, status=422)


# --- afterwards ----------------------------------------------------------------------------


def test_zz_server_survives_and_still_generates(server):
    """Runs last in this module (pytest keeps file order): nothing above hurt the server."""
    assert requests.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200
    assert server.proc.poll() is None
    r = requests.post(
        f"{server.url}/generate",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["generated_text"], str)
    r = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
