"""Rollout control (docs/api.md, "Rollout control") on the real processes with the synthetic
engine: the routes exist only with --enable-rl-control and open only to the control key; each
route's happy path; sleeping while memory is released; updates ordered against in-flight
requests (waiting, or aborting them); pause in both modes; abort by request id; payload limits
and bad payloads named; x-request-id and weight_version on every generation route family."""

from __future__ import annotations

import json
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from conftest import Server, synthetic_server

pytestmark = pytest.mark.timeout(300)

API_KEY = secrets.token_hex(16)
CONTROL_KEY = secrets.token_hex(16)
PAYLOAD_LIMIT = 1 << 20  # --rl-max-payload-bytes of the module's server
TIMEOUT = 60

CONTROL_ROUTES = [
    ("post", "/release_memory"),
    ("post", "/resume_memory"),
    ("post", "/update_weights"),
    ("post", "/update_weights_from_disk"),
    ("post", "/update_weights_from_tensor"),
    ("post", "/flush_cache"),
    ("post", "/pause_generation"),
    ("post", "/continue_generation"),
    ("post", "/abort_request"),
    ("get", "/get_weight_version"),
]


def env_without_keys() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TENSORGATE_API_KEY", None)
    env.pop("TENSORGATE_RL_CONTROL_KEY", None)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {**env_without_keys(), "TENSORGATE_RL_CONTROL_KEY": CONTROL_KEY}
    tmp = tmp_path_factory.mktemp("rl")
    with synthetic_server(
        tmp,
        *("--iteration-ms", "20", "--api-key", API_KEY, "--enable-rl-control"),
        *("--rl-max-payload-bytes", str(PAYLOAD_LIMIT)),
        env=env,
    ) as s:
        yield s


GEN = {"Authorization": f"Bearer {API_KEY}"}
CTL = {"Authorization": f"Bearer {CONTROL_KEY}"}


def control(server: Server, path: str, body: dict | None = None, **kw) -> requests.Response:
    if path == "/get_weight_version":
        return requests.get(f"{server.url}{path}", headers=CTL, timeout=TIMEOUT, **kw)
    return requests.post(
        f"{server.url}{path}", json={} if body is None else body, headers=CTL, timeout=TIMEOUT
    )


def ok(r: requests.Response) -> dict:
    assert r.status_code == 200, f"{r.request.url}: {r.status_code} {r.text[:500]}"
    body = r.json()
    assert body["success"] is True, body
    assert isinstance(body["weight_version"], str) and body["weight_version"], body
    return body


def version(server: Server) -> str:
    """GET /get_weight_version: SGLang's `{"weight_version": str}`."""
    r = control(server, "/get_weight_version")
    assert r.status_code == 200, r.text
    return r.json()["weight_version"]


def generate(server: Server, n: int = 3, **headers) -> requests.Response:
    return requests.post(
        f"{server.url}/generate",
        json={"inputs": "hello", "parameters": {"max_new_tokens": n, "details": True}},
        headers={**GEN, **headers},
        timeout=TIMEOUT,
    )


def sse(r: requests.Response) -> Iterator[dict]:
    for line in r.iter_lines():
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            yield json.loads(line[5:])


class Stream:
    """A /generate_stream read on a thread: its events as they come."""

    def __init__(self, server: Server, n: int, rid: str | None = None):
        headers = dict(GEN)
        if rid is not None:
            headers["x-request-id"] = rid
        self.events: list[dict] = []
        self.first = threading.Event()
        self.response: requests.Response | None = None
        self.thread = threading.Thread(target=self._run, args=(server, n, headers), daemon=True)
        self.thread.start()
        assert self.first.wait(30), "no first event"

    def _run(self, server: Server, n: int, headers: dict) -> None:
        with requests.post(
            f"{server.url}/generate_stream",
            json={"inputs": "hello", "parameters": {"max_new_tokens": n}},
            headers=headers,
            stream=True,
            timeout=TIMEOUT,
        ) as r:
            self.response = r
            for ev in sse(r):
                self.events.append(ev)
                self.first.set()
        self.first.set()

    def join(self) -> list[dict]:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the stream did not end"
        return self.events


class Background:
    """A call on a thread, to see whether it is held."""

    def __init__(self, fn, *args, **kwargs):
        self.result: requests.Response | None = None
        self.done = threading.Event()

        def run() -> None:
            try:
                self.result = fn(*args, **kwargs)
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def get(self) -> requests.Response:
        assert self.done.wait(TIMEOUT), "never answered"
        assert self.result is not None
        return self.result


def safetensors(name: str, values: list[float]) -> bytes:
    """A minimal safetensors file (header length, JSON header, little-endian F32 data)."""
    data = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps(
        {name: {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + data


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


# --- routes and keys ---------------------------------------------------------------------------


def test_control_routes_do_not_exist_without_the_flag(tmp_path):
    with synthetic_server(tmp_path, env=env_without_keys()) as plain:
        for method, path in CONTROL_ROUTES:
            r = requests.request(method, f"{plain.url}{path}", json={}, headers=CTL, timeout=30)
            assert r.status_code == 404, (path, r.status_code, r.text)
        doc = requests.get(f"{plain.url}/api-doc/openapi.json", timeout=30).json()
        assert not {p for _, p in CONTROL_ROUTES} & set(doc["paths"]), "documented while off"
        info = requests.get(f"{plain.url}/info", timeout=30).json()
        assert info["rl_control"]["enabled"] is False


def test_the_flag_without_a_key_refuses_to_start(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorgate.cli",
            "serve",
            "--engine",
            "synthetic",
            "--enable-rl-control",
        ],
        env=env_without_keys(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "--rl-control-key" in r.stderr, r.stderr[-2000:]


def test_control_routes_open_only_to_the_control_key(server):
    doc = requests.get(f"{server.url}/api-doc/openapi.json", headers=GEN, timeout=30).json()
    assert {p for _, p in CONTROL_ROUTES} <= set(doc["paths"]), "documented when on"
    for method, path in CONTROL_ROUTES:
        for headers, says in [
            ({}, "Bearer <rl-control-key>"),
            ({"Authorization": "Bearer wrong"}, "not valid"),
            (GEN, "not valid"),  # the API key is not the control key
            ({"Authorization": f"Bearer {CONTROL_KEY}x"}, "not valid"),
        ]:
            r = requests.request(
                method, f"{server.url}{path}", json={}, headers=headers, timeout=30
            )
            assert r.status_code == 401, (path, headers, r.status_code, r.text)
            assert r.json()["error_type"] == "authentication", r.text
            assert says in r.json()["error"], (path, r.text)
    # ... and the control key opens no generation route.
    r = requests.post(
        f"{server.url}/generate",
        json={"inputs": "hi", "parameters": {"max_new_tokens": 1}},
        headers=CTL,
        timeout=30,
    )
    assert r.status_code == 401, r.text


# --- each route's happy path ------------------------------------------------------------------


def test_every_route_answers_its_happy_path(server, tmp_path):
    before = version(server)
    body = ok(control(server, "/flush_cache"))
    assert body["weight_version"] == before

    body = ok(control(server, "/update_weights_from_disk", {"model_path": str(tmp_path)}))
    assert body["weight_version"] != before
    assert body["tensors_updated"] == 0

    payload = safetensors("model.norm.weight", [1.0, 2.0])
    body = ok(
        control(
            server,
            "/update_weights_from_tensor",
            {"serialized_named_tensors": [b64(payload)], "weight_version": "step-1"},
        )
    )
    assert body["weight_version"] == "step-1"
    assert body["tensors_updated"] == 1
    assert version(server) == "step-1"

    # trtllm-serve's bucketed update: a bucket, then the finalize naming the version.
    bucket = ok(control(server, "/update_weights", {"weights": {"GPU-0": b64(b"handles")}}))
    assert bucket["status"] == "success", "trtllm-serve's answer"
    assert bucket["weight_version"] == "step-1", "a bucket takes effect at the finalize"
    held = Background(generate, server, 2)
    time.sleep(0.5)
    assert not held.done.is_set(), "generation is held between a bucket and its finalize"
    final = ok(control(server, "/update_weights", {"weights": None, "weight_version": "step-2"}))
    assert final["weight_version"] == "step-2" and final["status"] == "success"
    r = held.get()
    assert r.status_code == 200, r.text
    assert r.json()["details"]["weight_version"] == "step-2"

    body = ok(control(server, "/release_memory", {"tags": ["kv_cache"]}))
    assert body["released_memory_tags"] == ["kv_cache"] and body["status"] == "success"
    assert "memory_delta_bytes" in body
    body = ok(control(server, "/resume_memory", {"tags": ["kv_cache"]}))
    assert body["released_memory_tags"] == []

    ok(control(server, "/pause_generation", {"mode": "in_place"}))
    ok(control(server, "/continue_generation"))
    body = ok(control(server, "/abort_request", {"abort_all": True}))
    assert body["num_aborted_requests"] == 0
    info = requests.get(f"{server.url}/info", headers=GEN, timeout=30).json()
    assert info["weight_version"] == "step-2"
    assert info["rl_control"]["enabled"] is True
    assert "model" in info["rl_control"]["memory_tags"]


# --- sleeping ----------------------------------------------------------------------------------


def test_released_memory_answers_sleeping_until_resumed(server):
    try:
        body = ok(control(server, "/release_memory", {"tags": []}))
        assert set(body["released_memory_tags"]) >= {"kv_cache", "model"}
        r = generate(server)
        assert r.status_code == 503, r.text
        assert r.json()["error_type"] == "sleeping", r.text
        assert "/resume_memory" in r.json()["error"]
        r = requests.post(
            f"{server.url}/v1/completions",
            json={"prompt": "hi", "max_tokens": 2},
            headers=GEN,
            timeout=30,
        )
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "sleeping", r.text
        health = requests.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["error_type"] == "sleeping"
        info = requests.get(f"{server.url}/info", headers=GEN, timeout=30).json()
        assert "model" in info["released_memory_tags"]
        # The executor refuses an update while the weights are released: 409.
        r = control(server, "/update_weights_from_disk", {"model_path": "/tmp"})
        assert r.status_code == 409, r.text
        assert r.json()["error_type"] == "conflict"
    finally:
        ok(control(server, "/resume_memory", {}))
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    assert generate(server).status_code == 200


# --- ordering against generation ---------------------------------------------------------------


def test_an_update_waits_for_an_in_flight_stream(server, tmp_path):
    old = version(server)
    stream = Stream(server, 60)  # ~1.2 s at 20 ms per token
    body = {"model_path": str(tmp_path), "weight_version": "after-wait"}
    update = Background(control, server, "/update_weights_from_disk", body)
    time.sleep(0.3)
    assert not update.done.is_set(), "the update waits for the stream"
    later = Background(generate, server, 2)
    time.sleep(0.2)
    assert not later.done.is_set(), "a new request is held while the update waits"
    events = stream.join()
    assert "error" not in events[-1], events[-1]
    assert events[-1]["details"]["generated_tokens"] == 60
    assert events[-1]["details"]["weight_version"] == old, "it finished on the old weights"
    assert ok(update.get())["weight_version"] == "after-wait"
    r = later.get()
    assert r.status_code == 200, r.text
    assert r.json()["details"]["weight_version"] == "after-wait", "the next request: new weights"


def test_abort_all_requests_ends_in_flight_streams_with_an_error_event(server, tmp_path):
    stream = Stream(server, 2000)
    body = ok(
        control(
            server,
            "/update_weights_from_disk",
            {"model_path": str(tmp_path), "abort_all_requests": True},
        )
    )
    assert body["num_aborted_requests"] == 1
    events = stream.join()
    assert events[-1].get("error_type") == "aborted", events[-1]
    assert "abort_all_requests" in events[-1]["error"]
    assert len(events) < 2000


def test_pause_abort_then_continue(server):
    stream = Stream(server, 2000)
    body = ok(control(server, "/pause_generation", {}))
    assert body["num_aborted_requests"] == 1
    try:
        assert stream.join()[-1].get("error_type") == "aborted"
        held = Background(generate, server, 2)
        time.sleep(0.5)
        assert not held.done.is_set(), "held while paused"
    finally:
        ok(control(server, "/continue_generation"))
    assert held.get().status_code == 200


def test_pause_in_place_then_continue(server):
    stream = Stream(server, 40)
    ok(control(server, "/pause_generation", {"mode": "in_place"}))
    try:
        time.sleep(0.2)
        seen = len(stream.events)
        time.sleep(0.6)
        assert len(stream.events) == seen, "no token while paused in place"
        held = Background(generate, server, 2)
        time.sleep(0.3)
        assert not held.done.is_set()
        r = control(server, "/pause_generation", {"mode": "retract"})
        assert r.status_code == 422, r.text
        assert "mode" in r.json()["error"] and "in_place" in r.json()["error"]
    finally:
        ok(control(server, "/continue_generation"))
    events = stream.join()
    assert events[-1]["details"]["generated_tokens"] == 40, "it resumed where it was"
    assert held.get().status_code == 200


def test_abort_request_by_rid(server):
    rid = "rl-test-" + secrets.token_hex(4)
    stream = Stream(server, 2000, rid=rid)
    assert stream.response is not None
    assert stream.response.headers["x-request-id"] == rid
    body = ok(control(server, "/abort_request", {"rid": rid}))
    assert body["num_aborted_requests"] == 1
    events = stream.join()
    assert events[-1].get("error_type") == "aborted", events[-1]
    r = control(server, "/abort_request", {"rid": rid})
    assert r.status_code == 404, r.text
    assert rid in r.json()["error"]
    r = control(server, "/abort_request", {})
    assert r.status_code == 422 and "rid" in r.json()["error"], r.text


def metric(server: Server, name: str) -> float:
    text = requests.get(f"{server.url}/metrics", headers=GEN, timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_held_requests_whose_clients_leave_are_freed(server):
    received = server.stats().requests_received
    ok(control(server, "/pause_generation", {}))
    try:
        staying = Background(generate, server, 2)

        def queued_becomes(n: int) -> None:
            deadline = time.monotonic() + 10
            while metric(server, "tensorgate_requests_queued") != n:
                assert time.monotonic() < deadline, f"queued never became {n}"
                time.sleep(0.2)

        queued_becomes(1)  # a held request is queued while its client waits
        for _ in range(3):
            with pytest.raises(requests.ReadTimeout):
                requests.post(
                    f"{server.url}/generate",
                    json={"inputs": "hello", "parameters": {"max_new_tokens": 2}},
                    headers=GEN,
                    timeout=(5, 0.5),
                )
        # Those whose clients went are dropped (swept within a second); the one waiting stays.
        queued_becomes(1)
    finally:
        ok(control(server, "/continue_generation"))
    assert staying.get().status_code == 200
    assert server.stats().requests_received == received + 1, "only the one that stayed ran"


def test_shutdown_refuses_what_a_pause_holds_at_once(tmp_path):
    env = {**env_without_keys(), "TENSORGATE_RL_CONTROL_KEY": CONTROL_KEY}
    with synthetic_server(
        tmp_path, "--enable-rl-control", "--shutdown-timeout", "60", env=env
    ) as s:
        r = requests.post(f"{s.url}/pause_generation", json={}, headers=CTL, timeout=30)
        assert r.status_code == 200, r.text
        held = Background(
            requests.post,
            f"{s.url}/generate",
            json={"inputs": "hello", "parameters": {"max_new_tokens": 2}},
            timeout=TIMEOUT,
        )
        time.sleep(0.5)
        assert not held.done.is_set()
        started = time.monotonic()
        s.proc.terminate()
        r = held.get()
        assert r.status_code == 503, r.text
        assert time.monotonic() - started < 10, "not held until --shutdown-timeout (60 s)"
        assert s.proc.wait(timeout=60) == 0


# --- limits and bad payloads -------------------------------------------------------------------


def test_a_body_over_the_payload_limit_is_413(server):
    big = b64(b"\0" * PAYLOAD_LIMIT)
    r = control(server, "/update_weights_from_tensor", {"serialized_named_tensors": [big]})
    assert r.status_code == 413, r.text[:300]
    assert "--rl-max-payload-bytes" in r.json()["error"]
    assert str(PAYLOAD_LIMIT) in r.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "names"),
    [
        (
            "/update_weights_from_tensor",
            {"serialized_named_tensors": ["aGk=", "@@"]},
            "serialized_named_tensors[1]",
        ),
        ("/update_weights", {"weights": {"GPU-7": "not base64!"}}, "weights.GPU-7"),
        ("/update_weights_from_disk", {"model_path": "/x", "flush": True}, "flush"),
        ("/update_weights_from_disk", {}, "model_path"),
        ("/release_memory", {"tags": "model"}, "tags"),
        ("/pause_generation", {"mode": "retract"}, "mode"),
        (
            "/update_weights_from_tensor",
            {"serialized_named_tensors": ["aGk="], "load_format": "npz"},
            "load_format",
        ),
    ],
)
def test_bad_payloads_are_422_naming_the_field(server, path, body, names):
    before = version(server)
    r = control(server, path, body)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    assert names in r.json()["error"], r.text
    assert version(server) == before, "nothing changed"


def test_bad_json_is_422(server):
    r = requests.post(
        f"{server.url}/update_weights_from_disk",
        data=b'{"model_path": "/x",',
        headers={**CTL, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422, r.text
    assert "EOF" in r.json()["error"], r.text


def test_the_executors_refusal_is_422_with_its_message(server):
    before = version(server)
    payload = b64(b"\xff" * 16)  # not a safetensors file
    r = control(server, "/update_weights_from_tensor", {"serialized_named_tensors": [payload]})
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith("The executor refused the request"), r.text
    r = control(server, "/update_weights_from_disk", {"model_path": "/nonexistent/ckpt"})
    assert r.status_code == 422 and "/nonexistent/ckpt" in r.json()["error"], r.text
    assert version(server) == before


# --- request ids and weight_version on every route family --------------------------------------


def test_x_request_id_is_echoed_or_made(server):
    r = generate(server, **{"x-request-id": "my-id.1"})
    assert r.headers["x-request-id"] == "my-id.1"
    made = generate(server).headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    r = generate(server, **{"x-request-id": "bad id"})
    assert r.status_code == 422 and "x-request-id" in r.json()["error"], r.text
    assert r.headers["x-request-id"]  # even the refusal carries one
    r = requests.post(
        f"{server.url}/v1/completions",
        json={"prompt": "hi"},
        headers={"x-request-id": "no-key-1"},
        timeout=30,
    )
    assert r.status_code == 401 and r.headers["x-request-id"] == "no-key-1", r.text


def test_weight_version_on_every_route_family(server, tmp_path):
    label = "wv-" + secrets.token_hex(3)
    body = {"model_path": str(tmp_path), "weight_version": label}
    ok(control(server, "/update_weights_from_disk", body))
    url = server.url
    tgi = {"inputs": "hi", "parameters": {"max_new_tokens": 3, "details": True}}
    r = requests.post(f"{url}/generate", json=tgi, headers=GEN, timeout=30)
    assert r.json()["details"]["weight_version"] == label
    r = requests.post(f"{url}/", json=tgi, headers=GEN, timeout=30)
    assert r.json()[0]["details"]["weight_version"] == label
    stream = {"json": tgi, "headers": GEN, "stream": True, "timeout": 30}
    with requests.post(f"{url}/generate_stream", **stream) as r:
        events = list(sse(r))
    assert events[-1]["details"]["weight_version"] == label
    assert all(e["details"] is None for e in events[:-1])

    completion = {"prompt": "hi", "max_tokens": 3}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for path, body in [("/v1/completions", completion), ("/v1/chat/completions", chat)]:
        r = requests.post(f"{url}{path}", json=body, headers=GEN, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["weight_version"] == label, (path, r.json())
        assert r.headers["x-request-id"]
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with requests.post(f"{url}{path}", json=stream, headers=GEN, stream=True, timeout=30) as r:
            chunks = list(sse(r))
        finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finishing and finishing[-1]["weight_version"] == label, (path, chunks[-3:])
        assert chunks[-1]["usage"] and chunks[-1]["weight_version"] == label, chunks[-1]


# --- hostile bodies on every control route ------------------------------------------------------

POSTS = [p for m, p in CONTROL_ROUTES if m == "post"]


def post_raw(server: Server, path: str, data, content_type: str | None = "application/json"):
    headers = dict(CTL)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return requests.post(f"{server.url}{path}", data=data, headers=headers, timeout=TIMEOUT)


@pytest.mark.parametrize("path", POSTS)
def test_hostile_bodies_get_a_clear_4xx(server, path):
    cases = [
        (b'["model"]', "application/json", 422, "JSON object"),
        (b'{"tags": ["a"]}', "text/plain", 415, "application/json"),
        (b'{"\xff": 1}', "application/json", 422, ""),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 422, ""),
        (b'{"a": 1e999999}', "application/json", 422, ""),
    ]
    for data, ctype, status, says in cases:
        r = post_raw(server, path, data, ctype)
        assert r.status_code == status, (path, data[:20], r.status_code, r.text[:300])
        assert says in r.json()["error"], (path, r.text[:300])

    def chunks() -> Iterator[bytes]:
        yield b'{"serialized_named_tensors": ["'
        for _ in range(PAYLOAD_LIMIT // 65536 + 2):
            yield b"A" * 65536
        yield b'"]}'

    r = post_raw(server, path, chunks())
    assert r.status_code == 413, (path, r.status_code, r.text[:300])
    assert "--rl-max-payload-bytes" in r.json()["error"]
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
