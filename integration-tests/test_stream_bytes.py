"""The bytes of fixed streams, against a recording: the router's hot path (detokenization,
stop-sequence scan, SSE and JSON rendering) may be rewritten for speed, never for output.

A fresh server on the synthetic engine is fully determined: its token at step s is a fixed
function of the prompt and s. Each case's raw HTTP body
is compared byte for byte with integration-tests/golden/streams.txt, with only what is meant to
vary masked (the random completion id and the `created` clock). To record again after a
deliberate change of output:

    TENSORGATE_RECORD_GOLDEN=1 pytest integration-tests/test_stream_bytes.py
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import requests
from conftest import synthetic_server

GOLDEN = Path(__file__).parent / "golden" / "streams.txt"

# The synthetic engine's tokens depend on the prompt: a stop sequence is chosen from its text.
CASES: list[tuple[str, dict]] = [
    ("/generate_stream", {"inputs": "Hello there", "parameters": {"max_new_tokens": 80}}),
    (
        "/generate_stream",
        {
            "inputs": "Tell me",
            "parameters": {"max_new_tokens": 80, "stop": ["ZZZ"], "return_full_text": True},
        },
    ),
    # A stop sequence that the text reaches mid-stream.
    (
        "/generate_stream",
        {"inputs": "Stop early", "parameters": {"max_new_tokens": 80, "stop": ["ation"]}},
    ),
    (
        "/v1/chat/completions",
        {
            "model": "x",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 80,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    (
        "/v1/chat/completions",
        {
            "model": "x",
            "messages": [{"role": "user", "content": "stop me"}],
            "max_tokens": 80,
            "stream": True,
            "stop": ["imperative", "zzqq"],
        },
    ),
    (
        "/v1/completions",
        {"model": "x", "prompt": "Once upon", "max_tokens": 80, "stream": True, "echo": True},
    ),
    ("/generate", {"inputs": "Hello there", "parameters": {"max_new_tokens": 40, "details": True}}),
    (
        "/v1/chat/completions",
        {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40},
    ),
]

MASKS = [
    (re.compile(rb'"id":"(chatcmpl|cmpl)-[0-9a-f]{32}"'), rb'"id":"\1-<id>"'),
    (re.compile(rb'"created":\d+'), rb'"created":<t>'),
]


def masked(body: bytes) -> bytes:
    for pattern, repl in MASKS:
        body = pattern.sub(repl, body)
    return body


def transcript(url: str) -> bytes:
    out = []
    for path, body in CASES:
        r = requests.post(url + path, json=body, stream=True, timeout=60)
        raw = b"".join(r.iter_content(None))
        out.append(b"### POST %s %d\n" % (path.encode(), r.status_code) + masked(raw) + b"\n")
    return b"".join(out)


def test_fixed_streams_are_byte_identical_to_the_recording(tmp_path: Path) -> None:
    with synthetic_server(tmp_path, "--iteration-ms", "1") as server:
        got = transcript(server.url)
    if os.environ.get("TENSORGATE_RECORD_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(got)
        pytest.skip("recorded integration-tests/golden/streams.txt")
    want = GOLDEN.read_bytes()
    if got != want:
        # The first differing line, not two 100 kB blobs.
        for i, (a, b) in enumerate(zip(got.splitlines(), want.splitlines(), strict=False)):
            assert a == b, f"line {i + 1} differs from the recording"
        assert got == want, "the transcript's length differs from the recording"


def test_the_recording_covers_every_ending() -> None:
    """The recording is worth comparing against: it holds each way a stream ends."""
    golden = GOLDEN.read_bytes()
    assert golden.count(b"### POST") == len(CASES)
    assert b'"finish_reason":"length"' in golden
    assert b'"finish_reason":"stop_sequence"' in golden
    assert b'"finish_reason":"stop"' in golden
    assert b"data: [DONE]" in golden
    assert b'"usage":{"prompt_tokens"' in golden
