"""Hostile and malformed requests against the real server, on the TGI and the OpenAI routes.

What docs/api.md and docs/reliability.md promise, checked exactly: the one documented status
(413 over `--payload-limit`, 415 without a JSON content type, 422 for everything else wrong: the
router never answers 400), a JSON body in the route family's error shape with the documented
`error_type` / `code`, and a message that names the offending field (as the client spelled it)
and, where there is one, the limit. Never a 5xx, a hang or a dead server: the last test checks
that the server is still healthy and still generates after all of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import requests

TGI_ROUTES = ["/generate", "/generate_stream", "/"]
OPENAI_ROUTES = ["/v1/completions", "/v1/chat/completions"]
ALL_ROUTES = TGI_ROUTES + OPENAI_ROUTES
CHAT = "/v1/chat/completions"

PAYLOAD_LIMIT = 2_000_000  # the router's default --payload-limit
MAX_N = 8  # OpenAI `n`, and prompts x n on /v1/completions (docs/api.md)
TIMEOUT = (10, 120)  # (connect, read): a hang fails the test instead of blocking the suite

# docs/api.md, "Errors": the error_type (TGI) and code (OpenAI) of each client-error status.
ERROR_TYPES = {
    413: {"payload_too_large"},
    415: {"unsupported_media_type"},
    422: {"validation", "tokenizer", "template_error"},
}


@pytest.fixture(scope="module")
def info(server) -> dict:
    r = requests.get(f"{server.url}/info", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def is_openai(route: str) -> bool:
    return route.startswith("/v1/")


def prompt_field(route: str) -> str:
    """The field that carries the prompt, as the route's clients call it."""
    return {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}.get(route, "inputs")


def max_tokens_field(route: str) -> str:
    return "max_tokens" if is_openai(route) else "max_new_tokens"


def body_for(route: str, *, prompt: str = "Hi", **params) -> dict:
    """A valid request with a tiny generation, plus `params` in the route's own place."""
    if route == CHAT:
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
    """The message of an error response, after checking the family's error shape and that its
    error_type (TGI) or code (OpenAI) is the one docs/api.md gives for the status."""
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
        assert err.get("code") in ERROR_TYPES[r.status_code], body
        return err["message"]
    assert set(body) == {"error", "error_type"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert body["error_type"] in ERROR_TYPES[r.status_code], body
    return body["error"]


def subject(message: str) -> str:
    """The message without serde's list of what it would have accepted ("expected one of
    `inputs`, `parameters`"), which names fields that are not the offending one."""
    return re.split(r",? expected ", message, maxsplit=1)[0]


# How axum introduces serde's own message; what follows may start with the path of the field.
SERDE_PREFIXES = (
    "Failed to deserialize the JSON body into the target type: ",
    "Failed to parse the request body as JSON: ",
)


def serde_path(message: str) -> list[str]:
    """The field names in the path that starts serde's message (`messages[0].role: ...` gives
    messages, role), or none."""
    for prefix in SERDE_PREFIXES:
        if message.startswith(prefix):
            m = re.match(r"([A-Za-z_][\w.\[\]]*): ", message[len(prefix) :])
            if m:
                return [c for c in re.split(r"[.\[\]]+", m.group(1)) if c and not c.isdigit()]
    return []


def names(message: str, field: str) -> bool:
    """Whether the message names `field` as what was wrong: quoted (`field`, 'field', "field")
    before any list of what was expected, or in the path of a deserialization error
    (`parameters.field: ...`, `messages[0].field: ...`, `parameters.field.a.b: ...` for
    something inside it). A bare word does not count: `n` or `stop` occur in any sentence."""
    quoted = rf"[`'\"]{re.escape(field)}[`'\"]"
    return re.search(quoted, subject(message)) is not None or field in serde_path(message)


def assert_rejected(
    route: str, r: requests.Response, status: int, *, field: str | None = None, says=()
) -> str:
    """The documented status, the family's error shape, a message naming `field` (see `names`)
    and holding each of `says` (case-insensitive; a tuple lists equivalent spellings)."""
    assert r.status_code == status, f"{route}: {r.status_code} {r.text[:500]}"
    message = error_message(route, r)
    if field is not None:
        assert names(message, field), (
            f"{route}: message {message[:500]!r} does not name the field `{field}`"
        )
    for needle in (says,) if isinstance(says, str) else says:
        options = needle if isinstance(needle, tuple) else (needle,)
        assert any(o.lower() in message.lower() for o in options), (
            f"{route}: message {message[:500]!r} does not say any of {options}"
        )
    return message


def test_names_is_strict():
    """The field check itself: it must not pass on a bare word or on serde's field list."""
    deserialize, parse = SERDE_PREFIXES
    assert names("`n` must be between 1 and 8, got 9", "n")
    assert names(f"{deserialize}n: invalid type: string", "n")
    assert names(f"{deserialize}messages[0].role: invalid type: integer `1`", "role")
    assert names(f"{deserialize}parameters.top_k: invalid type", "top_k")
    assert names(f"{parse}parameters.grammar.a.a: recursion limit exceeded", "grammar")
    assert names(f"{deserialize}unknown field `bogus`, expected `include_usage`", "bogus")
    assert not names(f"{deserialize}unknown field `x`, expected `include_usage`", "include_usage")
    assert not names(f"{deserialize}messages[0].content: no variant", "type")
    assert not names(f"{deserialize}invalid type: string, expected f32", "type")
    assert not names("no stop here, nor n", "stop")
    assert not names("no stop here, nor n", "n")
    assert not names("unknown field `x`, expected one of `inputs`, `parameters`", "inputs")
    assert not names("`max_new_tokens_x` is wrong", "max_new_tokens")


# --- transport-level: size, encoding, content type ---------------------------------------


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_body_over_the_payload_limit_is_413(server, route):
    body = json.dumps(body_for(route, prompt="a" * (PAYLOAD_LIMIT + 10))).encode()
    assert len(body) > PAYLOAD_LIMIT
    r = post_raw(server, route, body)
    assert_rejected(route, r, 413, says=("--payload-limit", str(PAYLOAD_LIMIT)))


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_chunked_body_over_the_payload_limit_is_413(server, route):
    """No Content-Length: the limit must hold while the body streams in."""

    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "'
        for _ in range(30):
            yield b"a" * 100_000
        yield b'"}'

    r = post_raw(server, route, chunks())
    assert_rejected(route, r, 413, says=("--payload-limit", str(PAYLOAD_LIMIT)))


def prompt_json(route: str) -> str:
    """`"<prompt field>": <valid value>`, as JSON text."""
    return json.dumps({prompt_field(route): body_for(route)[prompt_field(route)]})[1:-1]


# (id, body from the route's prompt member, what the message must say besides "JSON")
INVALID_JSON = [
    ("truncated", lambda m: "{" + m + ",", ("EOF", "line 1 column")),
    ("empty-body", lambda m: "", ("EOF", "line 1 column")),
    ("unquoted-key", lambda m: "{" + m + ", max_tokens: 2}", ("key must be a string",)),
    ("trailing-garbage", lambda m: "{" + m + "} trailing", ("trailing characters",)),
    ("binary", lambda m: "\x00\x01\x02", ("object",)),
]


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize(("make", "says"), [pytest.param(m, s, id=i) for i, m, s in INVALID_JSON])
def test_invalid_json_is_422(server, route, make, says):
    r = post_raw(server, route, make(prompt_json(route)).encode())
    assert_rejected(route, r, 422, says=("json", *says))


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_duplicate_key_is_422_naming_it(server, route):
    member = prompt_json(route)
    r = post_raw(server, route, ("{" + member + ", " + member + "}").encode())
    assert_rejected(route, r, 422, field=prompt_field(route), says="duplicate field")


def with_raw_prompt(route: str, raw: bytes) -> bytes:
    """The route's valid body with the prompt text replaced by `raw`, byte for byte."""
    return json.dumps(body_for(route, prompt="@@@")).encode().replace(b"@@@", raw)


def prompt_text_field(route: str) -> str:
    """The innermost field holding the prompt text (a chat message's `content`)."""
    return "content" if route == CHAT else prompt_field(route)


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_invalid_utf8_is_422_naming_the_field(server, route):
    r = post_raw(server, route, with_raw_prompt(route, b"\xff\xfe\xc3("))
    assert_rejected(route, r, 422, field=prompt_text_field(route), says=(("utf-8", "unicode"),))


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_lone_surrogate_escape_is_422_naming_the_field(server, route):
    r = post_raw(server, route, with_raw_prompt(route, rb"\ud800"))
    assert_rejected(route, r, 422, field=prompt_text_field(route), says="escape")


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_wrong_content_type_is_415(server, route, content_type):
    body = json.dumps(body_for(route)).encode()
    r = post_raw(server, route, body, content_type=content_type)
    assert_rejected(route, r, 415, says=("Content-Type", "application/json"))


# --- absurd numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_absurd_max_new_tokens_names_the_limit(server, route, info):
    field = max_tokens_field(route)
    r = post_json(server, route, body_for(route, **{field: 10**12}))
    assert_rejected(route, r, 422, field=field, says=str(info["max_total_tokens"]))


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize("value", [-1, 0])
def test_non_positive_max_new_tokens_is_422(server, route, value):
    field = max_tokens_field(route)
    r = post_json(server, route, body_for(route, **{field: value}))
    assert_rejected(route, r, 422, field=field, says=(("positive", "> 0", ">= 1"),))


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize("value", [10**20, -(10**20), 1.5, "4", True])
def test_max_new_tokens_of_the_wrong_type_is_422(server, route, value):
    field = max_tokens_field(route)
    r = post_json(server, route, body_for(route, **{field: value}))
    assert_rejected(route, r, 422, field=field)


SAMPLING_CASES = [
    # (parameter, JSON text of the value, what the message must say: the bound broken)
    # TGI: "must be strictly positive"; OpenAI (where 0 is greedy): "must be >= 0 and <= 2".
    ("temperature", "-1", (("positive", ">= 0"),)),
    ("temperature", "-0.5", (("positive", ">= 0"),)),
    ("temperature", "1e300", (("finite", "<= 2"),)),
    ("temperature", "-1e300", (("finite", "positive", ">= 0"),)),
    ("top_p", "-0.5", ("<= 1",)),
    ("top_p", "0", ("<= 1",)),
    ("top_p", "1.5", ("<= 1",)),
    ("top_p", "1e300", (("finite", "<= 1"),)),
    ("frequency_penalty", "5", ("<= 2",)),
    ("presence_penalty", "-1e300", (("finite", ">= -2"),)),
]


def with_raw_param(route: str, name: str, raw: str) -> bytes:
    """The route's body with `name` set to `raw`, as written (raw may be invalid JSON)."""
    body = json.dumps(body_for(route, **{name: "@@@"})).encode()
    return body.replace(b'"@@@"', raw.encode())


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize(("name", "raw", "says"), SAMPLING_CASES)
def test_out_of_range_sampling_names_the_parameter(server, route, name, raw, says):
    r = post_raw(server, route, with_raw_param(route, name, raw))
    assert_rejected(route, r, 422, field=name, says=says)


@pytest.mark.parametrize("route", TGI_ROUTES)
@pytest.mark.parametrize("raw", ["-5", "0", "1e300", "2.5"])
def test_bad_top_k_is_422(server, route, raw):
    r = post_raw(server, route, with_raw_param(route, "top_k", raw))
    assert_rejected(route, r, 422, field="top_k")


@pytest.mark.parametrize("route", OPENAI_ROUTES)
def test_top_k_is_an_unknown_field_on_openai_routes(server, route):
    r = post_raw(server, route, with_raw_param(route, "top_k", "5"))
    assert_rejected(route, r, 422, field="top_k", says="unknown field")


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize("name", ["temperature", "top_p", "top_k"])
@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "nan", "1e999"])
def test_non_finite_literals_are_invalid_json(server, route, name, raw):
    """JSON has no NaN or Infinity, and 1e999 overflows f64: all are syntax errors, reported
    at the field that holds them (top_k on /v1: an unknown field, named all the same)."""
    r = post_raw(server, route, with_raw_param(route, name, raw))
    assert_rejected(route, r, 422, field=name)


# --- stop sequences ------------------------------------------------------------------------


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_ten_thousand_stop_sequences_name_the_limit(server, route, info):
    stops = [f"s{i}" for i in range(10_000)]
    r = post_json(server, route, body_for(route, stop=stops))
    assert_rejected(route, r, 422, field="stop", says=(str(info["max_stop_sequences"]), "10000"))


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_one_huge_stop_sequence_names_the_limit(server, route):
    r = post_json(server, route, body_for(route, stop=["x" * 1_000_000]))
    assert_rejected(route, r, 422, field="stop", says=("256", "1000000"))


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_empty_stop_sequence_is_422(server, route):
    r = post_json(server, route, body_for(route, stop=[""]))
    assert_rejected(route, r, 422, field="stop", says="256")


# --- prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_prompt_over_max_input_tokens_names_the_limit(server, route, info):
    prompt = "hello " * (info["max_input_tokens"] + 500)
    r = post_json(server, route, body_for(route, prompt=prompt))
    assert_rejected(route, r, 422, field=prompt_field(route), says=str(info["max_input_tokens"]))


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_prompt_of_a_million_tokens_under_the_payload_limit(server, route, info):
    """~1.9 MB of single-token words: tokenizing it must not stall the server."""
    body = json.dumps(body_for(route, prompt="1 " * 950_000)).encode()
    assert len(body) < PAYLOAD_LIMIT
    r = post_raw(server, route, body)
    assert_rejected(route, r, 422, field=prompt_field(route), says=str(info["max_input_tokens"]))


@pytest.mark.parametrize("route", [*TGI_ROUTES, "/v1/completions"])
def test_empty_prompt_is_422(server, route):
    # (An empty chat message is a valid message: the template still makes a prompt.)
    r = post_json(server, route, body_for(route, prompt=""))
    assert_rejected(route, r, 422, field=prompt_field(route), says="empty")


# --- deep nesting and huge lists -----------------------------------------------------------

DEPTH = 10_000


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_chat_content_nested_ten_thousand_deep(server):
    body = b'{"messages": [{"role": "user", "content": ' + nested(DEPTH) + b'}], "max_tokens": 2}'
    r = post_raw(server, CHAT, body)
    assert_rejected(CHAT, r, 422, field="content", says="recursion limit")


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_deeply_nested_objects_in_free_form_fields(server, route):
    """Fields typed as any JSON value (grammar, response_format, logit_bias) must still be
    depth-bounded."""
    deep = b'{"a":' * DEPTH + b"1" + b"}" * DEPTH
    field = {CHAT: "response_format", "/v1/completions": "logit_bias"}.get(route, "grammar")
    r = post_raw(server, route, with_raw_param(route, field, deep.decode()))
    assert_rejected(route, r, 422, field=field, says="recursion limit")


@pytest.mark.parametrize("route", TGI_ROUTES)
def test_inputs_nested_ten_thousand_deep(server, route):
    body = b'{"inputs": ' + nested(DEPTH) + b', "parameters": {"max_new_tokens": 2}}'
    r = post_raw(server, route, body)
    assert_rejected(route, r, 422, field="inputs", says="string")


def test_hundred_thousand_messages(server):
    messages = [{"role": "user", "content": "a"}] * 100_000
    body = json.dumps({"messages": messages, "max_tokens": 2}).encode()
    assert len(body) > PAYLOAD_LIMIT
    r = post_raw(server, CHAT, body)
    assert_rejected(CHAT, r, 413, says=("--payload-limit", str(PAYLOAD_LIMIT)))


def test_fifty_thousand_messages_under_the_payload_limit(server, info):
    """Rendered through the chat template and tokenized: must end in a clear token-limit 422."""
    messages = [{"role": "user", "content": "a"}] * 50_000
    body = json.dumps({"messages": messages, "max_tokens": 2}, separators=(",", ":")).encode()
    assert len(body) < PAYLOAD_LIMIT
    r = post_raw(server, CHAT, body)
    assert_rejected(CHAT, r, 422, field="messages", says=str(info["max_input_tokens"]))


def test_completions_prompt_list_is_bounded(server):
    route = "/v1/completions"
    r = post_json(server, route, {"prompt": ["a"] * 10_000, "max_tokens": 2})
    assert_rejected(route, r, 422, field="prompt", says=(str(MAX_N), "10000"))


# --- chat messages -------------------------------------------------------------------------


@pytest.mark.parametrize("role", [1, None, ["user"], {"r": "user"}, True, 1.5])
def test_non_string_role_is_422(server, role):
    r = post_json(server, CHAT, {"messages": [{"role": role, "content": "Hi"}], "max_tokens": 2})
    assert_rejected(CHAT, r, 422, field="role", says="string")


def test_missing_role_is_422(server):
    r = post_json(server, CHAT, {"messages": [{"content": "Hi"}], "max_tokens": 2})
    assert_rejected(CHAT, r, 422, field="role", says="missing field")


def test_empty_messages_list_is_422(server):
    r = post_json(server, CHAT, {"messages": [], "max_tokens": 2})
    assert_rejected(CHAT, r, 422, field="messages", says="empty")


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        pytest.param(None, "messages", id="null"),
        pytest.param("Hi", "messages", id="string"),
        pytest.param({"role": "user", "content": "Hi"}, "messages", id="object"),
        pytest.param([None], "messages", id="list-of-null"),
        pytest.param(["Hi"], "messages", id="list-of-string"),
        pytest.param([[{"role": "user", "content": "Hi"}]], "messages", id="list-of-list"),
    ],
)
def test_messages_of_the_wrong_type_is_422(server, messages, field):
    r = post_json(server, CHAT, {"messages": messages, "max_tokens": 2})
    assert_rejected(CHAT, r, 422, field=field)


@pytest.mark.parametrize(
    ("content", "field", "says"),
    [
        pytest.param(5, "content", (), id="int"),
        pytest.param({"text": "Hi"}, "content", (), id="object"),
        pytest.param([5], "content", (), id="list-of-int"),
        pytest.param([{"text": "Hi"}], "type", "missing", id="part-without-type"),
        pytest.param(
            [{"type": "image_url", "image_url": {"url": "http://x"}}],
            "image_url",
            (),
            id="image",
        ),
        pytest.param([{"type": "text"}], "text", "missing", id="text-part-without-text"),
        pytest.param([{"type": "text", "text": 5}], "text", "string", id="text-part-int"),
    ],
)
def test_content_of_the_wrong_type_is_422(server, content, field, says):
    r = post_json(server, CHAT, {"messages": [{"role": "user", "content": content}]})
    assert_rejected(CHAT, r, 422, field=field, says=says)


def test_missing_messages_is_422(server):
    r = post_json(server, CHAT, {"max_tokens": 2})
    assert_rejected(CHAT, r, 422, field="messages", says="missing field")


# --- unknown fields and wrong types --------------------------------------------------------


@pytest.mark.parametrize("route", ALL_ROUTES)
def test_unknown_top_level_field_is_named(server, route):
    body = body_for(route)
    body["definitely_not_a_field"] = 1
    r = post_json(server, route, body)
    assert_rejected(route, r, 422, field="definitely_not_a_field", says="unknown field")


@pytest.mark.parametrize("route", TGI_ROUTES)
def test_unknown_parameter_is_named(server, route):
    r = post_json(server, route, body_for(route, max_tokens=3))
    assert_rejected(route, r, 422, field="max_tokens", says="unknown field")


def test_unknown_message_field_is_named(server):
    """docs/api.md: unknown fields are refused (422) rather than ignored."""
    r = post_json(
        server,
        CHAT,
        {"messages": [{"role": "user", "content": "Hi", "bogus": 1}], "max_tokens": 1},
    )
    assert_rejected(CHAT, r, 422, field="bogus", says="unknown field")


def tgi_case(body, field: str | None, says=(), *, id: str):
    return pytest.param(body, field, says, id=id)


TGI_WRONG_TYPES = [
    tgi_case({"inputs": 123}, "inputs", id="inputs-int"),
    tgi_case({"inputs": None}, "inputs", id="inputs-null"),
    tgi_case({"inputs": ["Hi"]}, "inputs", id="inputs-list"),
    tgi_case({"inputs": {"text": "Hi"}}, "inputs", id="inputs-object"),
    tgi_case({"parameters": {"max_new_tokens": 2}}, "inputs", id="inputs-missing"),
    tgi_case({"inputs": "Hi", "parameters": "fast"}, "parameters", id="parameters-string"),
    # serde accepts a struct as a positional array: these would set max_new_tokens = 2.
    tgi_case(
        {"inputs": "Hi", "parameters": [None] * 8 + [False, 2]},
        "parameters",
        "object",
        id="parameters-list",
    ),
    tgi_case(["Hi", [None] * 8 + [False, 2]], None, "JSON object", id="body-positional-list"),
    tgi_case({"inputs": "Hi", "parameters": {"temperature": "hot"}}, "temperature", id="temp-str"),
    tgi_case({"inputs": "Hi", "parameters": {"top_k": "5"}}, "top_k", id="top_k-string"),
    tgi_case({"inputs": "Hi", "parameters": {"stop": "x"}}, "stop", id="stop-string"),
    tgi_case({"inputs": "Hi", "parameters": {"stop": [1, 2]}}, "stop", id="stop-ints"),
    tgi_case({"inputs": "Hi", "parameters": {"do_sample": "yes"}}, "do_sample", id="do_sample-str"),
    tgi_case({"inputs": "Hi", "parameters": {"seed": -1}}, "seed", id="seed-negative"),
    tgi_case({"inputs": "Hi", "parameters": {"seed": 2**64}}, "seed", id="seed-too-big"),
    tgi_case({"inputs": "Hi", "parameters": {"truncate": 0}}, "truncate", id="truncate-zero"),
    tgi_case({"inputs": "Hi", "parameters": {"truncate": 10**12}}, "truncate", id="truncate-huge"),
    tgi_case({"inputs": "Hi", "parameters": {"top_n_tokens": 10**6}}, "top_n_tokens", id="top_n"),
    tgi_case({"inputs": "Hi", "parameters": {"best_of": 10**6}}, "best_of", id="best_of-huge"),
    tgi_case({"inputs": "Hi", "stream": "yes"}, "stream", id="stream-string"),
    tgi_case([{"inputs": "Hi"}], None, "JSON object", id="body-list"),
    tgi_case("Hi", None, "JSON object", id="body-string"),
    tgi_case(None, None, "JSON object", id="body-null"),
    tgi_case(42, None, "JSON object", id="body-int"),
]


@pytest.mark.parametrize("route", TGI_ROUTES)
@pytest.mark.parametrize(("body", "field", "says"), TGI_WRONG_TYPES)
def test_tgi_wrong_types_are_422(server, route, body, field, says):
    r = post_json(server, route, body)
    assert_rejected(route, r, 422, field=field, says=says)


@pytest.mark.parametrize("route", TGI_ROUTES)
def test_truncate_over_max_input_tokens_names_the_limit(server, route, info):
    r = post_json(server, route, body_for(route, truncate=info["max_input_tokens"] + 1))
    assert_rejected(route, r, 422, field="truncate", says=str(info["max_input_tokens"]))


@pytest.mark.parametrize("route", TGI_ROUTES)
def test_top_n_tokens_over_the_engine_limit_names_it(server, route, info):
    r = post_json(server, route, body_for(route, top_n_tokens=info["max_top_n_tokens"] + 1))
    assert_rejected(route, r, 422, field="top_n_tokens", says=str(info["max_top_n_tokens"]))


OPENAI_WRONG_TYPES = [
    # (fields, the field the message must name, what else it must say)
    pytest.param({"prompt": 5}, "prompt", (), id="prompt-int"),
    pytest.param({"prompt": None}, "prompt", (), id="prompt-null"),
    pytest.param({"prompt": ["Hi", 5]}, "prompt", (), id="prompt-mixed-list"),
    pytest.param({"prompt": []}, "prompt", (), id="prompt-empty-list"),
    pytest.param({"messages": "Hi"}, "messages", (), id="messages-string"),
    pytest.param({"n": -1}, "n", (), id="n-negative"),
    pytest.param({"n": 0}, "n", (), id="n-zero"),
    pytest.param({"n": 10**6}, "n", (str(MAX_N),), id="n-huge"),
    pytest.param({"n": "2"}, "n", (), id="n-string"),
    pytest.param({"stream": "yes"}, "stream", (), id="stream-string"),
    pytest.param({"stop": 5}, "stop", (), id="stop-int"),
    pytest.param({"stop": [5]}, "stop", (), id="stop-list-of-int"),
    pytest.param({"temperature": "hot"}, "temperature", (), id="temperature-string"),
    pytest.param({"seed": -1}, "seed", (), id="seed-negative"),
    pytest.param({"stream_options": {"bogus": True}}, "bogus", (), id="stream_options-unknown"),
    pytest.param({"stream_options": "yes"}, "stream_options", (), id="stream_options-string"),
    # Refused by an engine without logit bias; out of the vocabulary for one with it.
    pytest.param({"logit_bias": {"99999999": 1}}, "logit_bias", (), id="logit_bias"),
    pytest.param({"user": 5}, "user", (), id="user-int"),
    pytest.param({"model": 5}, "model", (), id="model-int"),
]


@pytest.mark.parametrize("route", OPENAI_ROUTES)
@pytest.mark.parametrize(("fields", "field", "says"), OPENAI_WRONG_TYPES)
def test_openai_wrong_types_are_422(server, route, fields, field, says):
    body = body_for(route)
    body.update(fields)
    r = post_json(server, route, body)
    assert_rejected(route, r, 422, field=field, says=says)


@pytest.mark.parametrize("route", OPENAI_ROUTES)
@pytest.mark.parametrize("body", [[], "Hi", None, 42], ids=["list", "string", "null", "int"])
def test_openai_body_not_an_object_is_422(server, route, body):
    r = post_json(server, route, body)
    assert_rejected(route, r, 422, says="JSON object")


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
