"""tensorgate.rollout's client against an in-process HTTP server that records what it is sent
and answers as told: request shapes, keys, payload encodings and the typed errors. The client
against the real server is integration-tests/test_rollout.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from aiohttp import web
from safetensors.torch import load as load_safetensors

from tensorgate.rollout import (
    AbortedError,
    AuthenticationError,
    ConflictError,
    PayloadTooLargeError,
    RolloutClient,
    RolloutConnectionError,
    RouteNotFoundError,
    SamplingParams,
    SleepingError,
    UnavailableError,
    ValidationError,
)
from tensorgate.rollout import weights as w

Handler = Callable[[str, Any], Awaitable[web.Response]]


@dataclass
class Fake:
    """What the fake server saw: (method, path, headers, JSON body) per request."""

    seen: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0


def tgi_answer(ids: list[int], rid: str, version: str = "7") -> web.Response:
    details = {
        "finish_reason": "length",
        "generated_tokens": len(ids),
        "seed": 11,
        "tokens": [
            {"id": t, "text": f"t{t}", "logprob": -0.5 * (k + 1), "special": False}
            for k, t in enumerate(ids)
        ],
        "weight_version": version,
    }
    return web.json_response(
        {"generated_text": "x", "details": details}, headers={"x-request-id": rid}
    )


def ok(**extra: Any) -> web.Response:
    return web.json_response({"success": True, "message": "done", "weight_version": "3", **extra})


def run_with_server(handler: Handler, test: Callable[[str, Fake], Awaitable[None]]) -> Fake:
    """Starts the fake server on a free port, runs `test(url, fake)`, stops it."""
    fake = Fake()

    async def dispatch(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        fake.seen.append((request.method, request.path, dict(request.headers), body))
        fake.in_flight += 1
        fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
        try:
            return await handler(request.path, body)
        finally:
            fake.in_flight -= 1

    async def main() -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", dispatch)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            await test(f"http://127.0.0.1:{port}", fake)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return fake


def test_generate_sends_input_ids_with_details_and_returns_exact_ids_and_logprobs():
    async def handler(path: str, body: Any) -> web.Response:
        await asyncio.sleep(0.02)  # so that requests overlap
        ids = body["input_ids"]
        return tgi_answer(
            [ids[0] + 100, ids[0] + 101], rid=f"r{ids[0]}-{body['parameters']['seed']}"
        )

    groups: list = []

    async def test(url: str, fake: Fake) -> None:
        async with RolloutClient(url, api_key="gen-key", control_key="ctl", max_concurrency=3) as c:
            params = SamplingParams(max_new_tokens=2, temperature=0.7, top_p=0.9, seed=40)
            groups.extend(await c.generate([[1, 2], [5]], params, n=4))

    fake = run_with_server(handler, test)
    assert [[s.sample_index for s in g] for g in groups] == [[0, 1, 2, 3]] * 2
    first = groups[0][0]
    assert first.token_ids == [101, 102]
    assert first.logprobs == [-0.5, -1.0]
    assert first.weight_version == "7"
    assert first.finish_reason == "length"
    assert first.request_id == "r1-40"
    # Sample i of prompt p gets seed + p*n + i: distinct and reproducible.
    seeds = sorted(b["parameters"]["seed"] for _, _, _, b in fake.seen)
    assert seeds == list(range(40, 48))
    assert fake.most_in_flight == 3  # bounded by max_concurrency, and it was used
    for method, path, headers, body in fake.seen:
        assert (method, path) == ("POST", "/generate")
        assert headers["Authorization"] == "Bearer gen-key"  # the API key, not the control key
        assert body["parameters"]["details"] is True
        assert body["parameters"]["do_sample"] is True
        assert body["parameters"]["temperature"] == 0.7
        assert body["parameters"]["top_p"] == 0.9
        assert body["input_ids"] in ([1, 2], [5])


def test_temperature_zero_is_greedy_without_seed_or_sampling_fields():
    params = SamplingParams(max_new_tokens=3, temperature=0, seed=5)
    assert params.to_tgi(5) == {"max_new_tokens": 3, "details": True, "do_sample": False}
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=0, top_p=0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (
            422,
            {"error": "`input_ids` must be non-empty", "error_type": "validation"},
            ValidationError,
            "`input_ids` must be non-empty",
        ),
        (
            503,
            {"error": "memory released: model; call /resume_memory", "error_type": "sleeping"},
            SleepingError,
            "call /resume_memory",
        ),
        (
            503,
            {"error": "executor not connected", "error_type": "unavailable"},
            UnavailableError,
            "not connected",
        ),
        (
            401,
            {
                "error": {
                    "message": "bad key",
                    "type": "invalid_request_error",
                    "code": "authentication",
                }
            },
            AuthenticationError,
            "bad key",
        ),
        (
            503,
            {"error": "aborted by /abort_request", "error_type": "aborted"},
            AbortedError,
            "aborted by",
        ),
        (404, None, RouteNotFoundError, "--enable-rl-control"),
        (
            409,
            {"error": "model released", "error_type": "conflict"},
            ConflictError,
            "model released",
        ),
        (
            413,
            {"error": "over 1024 bytes", "error_type": "payload_too_large"},
            PayloadTooLargeError,
            "1024",
        ),
    ],
)
def test_error_statuses_become_typed_errors_with_the_servers_message(status, body, error, message):
    async def handler(path: str, _: Any) -> web.Response:
        if body is None:
            return web.Response(status=status)
        return web.json_response(body, status=status)

    async def test(url: str, fake: Fake) -> None:
        async with RolloutClient(url, control_key="k") as c:
            with pytest.raises(error) as raised:
                await c.release_memory(["kv_cache"])
            assert raised.value.status == status
            assert message in raised.value.message
            assert raised.value.route == "POST /release_memory"
            if isinstance(body, dict) and isinstance(body["error"], str):
                assert raised.value.error_type == body["error_type"]

    run_with_server(handler, test)


def test_first_generation_failure_cancels_the_rest_and_is_raised():
    # The other two answer only once the failure was raised (or after 30 s): a client that
    # waited for them would hang. Released afterwards, so the server stops at once.
    release = asyncio.Event()

    async def handler(path: str, body: Any) -> web.Response:
        if body["input_ids"] == [9]:
            return web.json_response({"error": "bad", "error_type": "validation"}, status=422)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), timeout=30)
        return tgi_answer([1], "r")

    async def test(url: str, fake: Fake) -> None:
        async with RolloutClient(url) as c:
            with pytest.raises(ValidationError):
                await asyncio.wait_for(c.generate([[1], [9], [2]], SamplingParams()), timeout=10)
        release.set()

    run_with_server(handler, test)


def test_unreachable_server_is_a_connection_error():
    async def main() -> None:
        async with RolloutClient("http://127.0.0.1:9", timeout_s=5) as c:
            with pytest.raises(RolloutConnectionError) as raised:
                await c.get_weight_version()
            assert raised.value.status is None
            assert raised.value.route == "GET /get_weight_version"

    asyncio.run(main())


def tied_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    emb = torch.randn(64, 8)
    return {
        "model.embed_tokens.weight": emb,
        "model.layers.0.mlp.weight": torch.randn(8, 16),
        "model.layers.1.mlp.weight": torch.randn(8, 16),
        "model.norm.weight": torch.randn(8),
        "lm_head.weight": emb,  # tied: the same storage under a second name
    }


def test_state_dict_push_over_tensors_in_buckets_decodes_to_the_same_tensors():
    sd = tied_state_dict()

    async def handler(path: str, body: Any) -> web.Response:
        return ok()

    results = []

    async def test(url: str, fake: Fake) -> None:
        async with RolloutClient(url, api_key="gen", control_key="ctl") as c:
            # 2048 bytes of embedding (over the bucket: alone), 512 per MLP (two fill one),
            # 32 of norm: three buckets.
            results.append(
                await c.update_weights_from_state_dict(
                    sd, bucket_bytes=1024, weight_version="v1", mode="abort"
                )
            )

    fake = run_with_server(handler, test)
    (result,) = results
    assert result.requests == 3
    assert result.tensors == 4  # lm_head.weight is the embedding: sent once
    assert result.weight_version == "3"  # as the server answered the last request
    got: dict[str, torch.Tensor] = {}
    for k, (method, path, headers, body) in enumerate(fake.seen):
        assert (method, path) == ("POST", "/update_weights_from_tensor")
        assert headers["Authorization"] == "Bearer ctl"
        assert body["load_format"] == "safetensors"
        assert body["weight_version"] == "v1"
        assert body["abort_all_requests"] is True
        assert body["flush_cache"] is (k == len(fake.seen) - 1)  # flushed once, at the end
        (payload,) = body["serialized_named_tensors"]
        got.update(load_safetensors(base64.b64decode(payload)))
    assert sorted(got) == sorted(set(sd) - {"lm_head.weight"})
    for name, t in got.items():
        assert torch.equal(t, sd[name]), name


def test_state_dict_push_casts_to_the_servers_dtype():
    sd = {"a": torch.randn(4, 4)}

    async def test(url: str, fake: Fake) -> None:
        async with RolloutClient(url) as c:
            await c.update_weights_from_state_dict(sd, dtype=torch.bfloat16, transport="tensors")

    fake = run_with_server(lambda p, b: _ok_async(), test)
    (payload,) = fake.seen[0][3]["serialized_named_tensors"]
    got = load_safetensors(base64.b64decode(payload))["a"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, sd["a"].to(torch.bfloat16))


async def _ok_async() -> web.Response:
    return ok()


def test_control_routes_send_the_documented_bodies():
    async def handler(path: str, body: Any) -> web.Response:
        if path == "/get_weight_version":
            return web.json_response({"weight_version": "12"})
        return ok(released_memory_tags=["kv_cache"], memory_delta_bytes=123)

    async def test(url: str, fake: Fake) -> None:
        async with RolloutClient(url, control_key="ctl") as c:
            r = await c.release_memory()
            assert r.success and r.raw["memory_delta_bytes"] == 123
            await c.resume_memory(["kv_cache", "model"])
            await c.update_weights_from_disk("/ckpt", weight_version="v2")
            await c.pause_generation("in_place")
            await c.continue_generation()
            await c.abort_request("req-1")
            await c.abort_all()
            await c.flush_cache()
            await c.update_weights_cuda_ipc(None, weight_version="v3")
            assert await c.get_weight_version() == "12"

    fake = run_with_server(handler, test)
    assert [(m, p, b) for m, p, _, b in fake.seen] == [
        ("POST", "/release_memory", {"tags": []}),
        ("POST", "/resume_memory", {"tags": ["kv_cache", "model"]}),
        (
            "POST",
            "/update_weights_from_disk",
            {"model_path": "/ckpt", "flush_cache": True, "weight_version": "v2"},
        ),
        ("POST", "/pause_generation", {"mode": "in_place"}),
        ("POST", "/continue_generation", {}),
        ("POST", "/abort_request", {"rid": "req-1"}),
        ("POST", "/abort_request", {"abort_all": True}),
        ("POST", "/flush_cache", {}),
        ("POST", "/update_weights", {"weights": None, "weight_version": "v3"}),
        ("GET", "/get_weight_version", None),
    ]
    assert all(h["Authorization"] == "Bearer ctl" for _, _, h, _ in fake.seen)


def test_buckets_keep_order_and_never_split_a_tensor():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5])]
    groups = list(w.buckets(named, bucket_bytes=80))  # 4 bytes per element
    assert [[name for name, _ in g] for g in groups] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(w.buckets(named, 0))


def test_cuda_ipc_payload_refuses_cpu_tensors_naming_them():
    with pytest.raises(ValueError, match="'x' is on cpu"):
        w.cuda_ipc_payload([("x", torch.zeros(2))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_cuda_ipc_payload_is_what_trtllm_worker_extension_rebuilds(tmp_path):
    """The payload, read in another process the way TensorRT-LLM's rlhf_utils
    WorkerExtension.update_weights reads it: base64 -> unpickle -> [(name, (func, args))],
    args[6] set to the local device, func(*args) -> the tensor."""
    import subprocess
    import sys

    sd = {
        "a": torch.randn(3, 5, device="cuda"),
        "b": torch.arange(7, device="cuda", dtype=torch.float16),
    }
    weights, keep = w.cuda_ipc_payload(list(sd.items()))
    assert list(weights) == [w.gpu_uuid(torch.device("cuda", 0))]
    assert next(iter(weights)).startswith("GPU-")
    (tmp_path / "payload.json").write_text(json.dumps(weights))
    reader = f"""
import base64, json, pickle, torch
weights = json.load(open({str(tmp_path / "payload.json")!r}))
uuid = "GPU-" + str(torch.cuda.get_device_properties(0).uuid)
handles = pickle.loads(base64.b64decode(weights[uuid]))
out = {{}}
for name, (func, args) in handles:
    args = list(args)
    args[6] = 0
    out[name] = func(*args).cpu()
torch.save(out, {str(tmp_path / "got.pt")!r})
"""
    subprocess.run([sys.executable, "-c", reader], check=True, timeout=120)
    got = torch.load(tmp_path / "got.pt")
    assert sorted(got) == ["a", "b"]
    for name, t in sd.items():
        assert torch.equal(got[name], t.cpu())
    del keep


def test_unique_named_tensors_refuses_non_tensors():
    with pytest.raises(TypeError, match="'x' is a str"):
        w.unique_named_tensors({"x": "not a tensor"})  # type: ignore[dict-item]
