"""The async HTTP client a trainer drives tensorgate with: token-exact generation and the
rollout-control routes (docs/rl.md).

Generation goes through TGI's `/generate` with `input_ids` (one request per sample, bounded
concurrency), authenticated with the API key; control routes with the control key.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

import tensorgate.rollout.weights as w
from tensorgate.rollout.errors import RolloutConnectionError, RolloutError, error_from_response
from tensorgate.rollout.types import ControlResult, Sample, SamplingParams, UpdateResult

try:
    import aiohttp
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("tensorgate.rollout needs aiohttp: pip install 'tensorgate[rollout]'") from e

# 640 MiB of tensor bytes per request: base64 makes ~853 MiB of body, under the server's
# default --rl-max-payload-bytes (1 GiB); the embedded 135M model (538 MB) goes in one request.
DEFAULT_BUCKET_BYTES = 640 << 20
# CUDA IPC sends handles, a few kB per bucket whatever it holds, and an update costs per
# request (~7 ms each on the H200, docs/benchmarks.md section 6): 4 GiB buckets update an 8B
# model in 87 ms where 512 MiB buckets take 274 ms.
DEFAULT_IPC_BUCKET_BYTES = 4 << 30

Transport = Literal["auto", "tensors", "cuda_ipc"]
UpdateMode = Literal["wait", "abort"]


class RolloutClient:
    """Use as `async with RolloutClient(url, control_key=...) as client: ...`.

    `api_key` is the server's `--api-key` (generation routes), `control_key` its
    `--rl-control-key` (control routes); either may be None when the server has none.
    At most `max_concurrency` generation requests are in flight at once (the router answers 429
    past its `--max-concurrent-requests`).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        control_key: str | None = None,
        max_concurrency: int = 32,
        timeout_s: float = 600.0,
    ) -> None:
        if max_concurrency <= 0:
            raise ValueError(f"max_concurrency must be > 0, got {max_concurrency}")
        self.url = url.rstrip("/")
        self._api_key = api_key
        self._control_key = control_key
        self._max_concurrency = max_concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use, inside the caller's event loop (aiohttp binds a session to it).
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_concurrency + 8)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
            self._slots = asyncio.Semaphore(self._max_concurrency)
        return self._session

    async def _call(
        self,
        method: str,
        route: str,
        body: Any = None,
        *,
        control: bool,
        raw: bytes | None = None,
    ) -> tuple[Any, Mapping[str, str]]:
        """One HTTP call with a JSON body (`body`, or `raw` already encoded); the parsed JSON
        answer and its headers, or a typed RolloutError."""
        session = self._open()
        key = self._control_key if control else self._api_key
        h = {}
        if key:
            h["Authorization"] = f"Bearer {key}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            h["Content-Type"] = "application/json"
        where = f"{method} {route}"
        try:
            async with session.request(method, self.url + route, data=data, headers=h) as r:
                text = await r.text()
                if r.status >= 400:
                    raise error_from_response(r.status, text, where)
                try:
                    parsed = json.loads(text) if text else None
                except ValueError as e:
                    raise RolloutError(
                        f"answer is not JSON: {text[:200]!r}",
                        status=r.status,
                        error_type=None,
                        route=where,
                    ) from e
                return parsed, r.headers
        except aiohttp.ClientError as e:
            raise RolloutConnectionError(
                f"{type(e).__name__}: {e}", status=None, error_type=None, route=where
            ) from e
        except TimeoutError as e:
            raise RolloutConnectionError(
                f"no answer within {self._timeout.total}s",
                status=None,
                error_type=None,
                route=where,
            ) from e

    async def _control(self, route: str, body: Any = None, method: str = "POST") -> ControlResult:
        parsed, _ = await self._call(
            method, route, {} if body is None and method == "POST" else body, control=True
        )
        return ControlResult.from_json(parsed)

    # Generation -------------------------------------------------------------------------------

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        *,
        n: int = 1,
    ) -> list[list[Sample]]:
        """`n` samples of each prompt (token ids, sent as they are: no template, no
        re-tokenization). Returns one list of `n` Samples per prompt, in order.

        With `params.seed`, sample i of prompt p uses seed + p*n + i (reproducible and
        distinct); without, the server draws a seed per request. The first failure cancels the
        requests still running and is raised.
        """
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        params = params or SamplingParams()
        for p, ids in enumerate(prompts):
            if len(ids) == 0:
                raise ValueError(f"prompt {p} is empty")
        out: list[list[Sample | None]] = [[None] * n for _ in prompts]

        async def one(p: int, i: int) -> None:
            seed = None if params.seed is None else params.seed + p * n + i
            out[p][i] = await self._generate_one(prompts[p], params, p, i, seed)

        try:
            async with asyncio.TaskGroup() as tg:
                for p in range(len(prompts)):
                    for i in range(n):
                        tg.create_task(one(p, i))
        except ExceptionGroup as group:
            # The TaskGroup cancelled the others; the caller gets the first typed error.
            raise group.exceptions[0] from None
        return [[s for s in row if s is not None] for row in out]

    async def _generate_one(
        self, ids: Sequence[int], params: SamplingParams, p: int, i: int, seed: int | None
    ) -> Sample:
        self._open()
        assert self._slots is not None
        body = {"input_ids": [int(t) for t in ids], "parameters": params.to_tgi(seed)}
        async with self._slots:
            answer, headers = await self._call("POST", "/generate", body, control=False)
        details = (answer or {}).get("details") or {}
        tokens = details.get("tokens") or []
        version = details.get("weight_version")
        return Sample(
            prompt_index=p,
            sample_index=i,
            token_ids=[int(t["id"]) for t in tokens],
            logprobs=[float(t["logprob"]) for t in tokens],
            finish_reason=str(details.get("finish_reason", "")),
            weight_version=str(version) if version is not None else None,
            request_id=headers.get("x-request-id"),
            seed=details.get("seed", seed),
        )

    async def health(self) -> bool:
        """True when GET /health answers 200 (503 while starting, or while memory is
        released)."""
        try:
            await self._call("GET", "/health", control=False)
        except RolloutError:
            return False
        return True

    async def wait_ready(self, timeout_s: float = 300.0, interval_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.health():
            if time.monotonic() > deadline:
                raise RolloutConnectionError(
                    f"not healthy within {timeout_s}s",
                    status=None,
                    error_type=None,
                    route="GET /health",
                )
            await asyncio.sleep(interval_s)

    async def info(self) -> dict[str, Any]:
        parsed, _ = await self._call("GET", "/info", control=False)
        return parsed

    # Memory -----------------------------------------------------------------------------------

    async def release_memory(self, tags: Sequence[str] | None = None) -> ControlResult:
        """trtllm-serve's /release_memory; `tags` None or empty: every tag the engine has
        ("kv_cache", "model"). Generation answers 503 `sleeping` until resumed."""
        return await self._control("/release_memory", {"tags": list(tags or [])})

    async def resume_memory(self, tags: Sequence[str] | None = None) -> ControlResult:
        return await self._control("/resume_memory", {"tags": list(tags or [])})

    # Weights ----------------------------------------------------------------------------------

    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        weight_version: str | None = None,
        mode: UpdateMode = "wait",
        flush_cache: bool = True,
    ) -> ControlResult:
        """SGLang's /update_weights_from_disk: a checkpoint directory the server can read."""
        body: dict[str, Any] = {"model_path": str(model_path), "flush_cache": flush_cache}
        _ordering(body, weight_version, mode)
        return await self._control("/update_weights_from_disk", body)

    async def update_weights_from_tensors(
        self,
        named_tensors: Sequence[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        *,
        weight_version: str | None = None,
        mode: UpdateMode = "wait",
        flush_cache: bool = True,
        dtype: torch.dtype | None = None,
    ) -> ControlResult:
        """One /update_weights_from_tensor call carrying these tensors (safetensors payload)."""
        items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        fields: dict[str, Any] = {"load_format": "safetensors", "flush_cache": flush_cache}
        _ordering(fields, weight_version, mode)
        # Serialization is CPU work of seconds for large buckets: off the event loop.
        raw = await asyncio.to_thread(
            lambda: w.json_with_base64_list(
                "serialized_named_tensors", [w.safetensors_payload(items, dtype)], fields
            )
        )
        parsed, _ = await self._call("POST", "/update_weights_from_tensor", control=True, raw=raw)
        return ControlResult.from_json(parsed)

    async def update_weights_cuda_ipc(
        self, handles_by_gpu: Mapping[str, str] | None, *, weight_version: str | None = None
    ) -> ControlResult:
        """One raw trtllm-serve /update_weights call: a bucket (`{uuid: base64 pickle}`), or
        None to finalize (post-load hooks, cache reset; `weight_version` applies then)."""
        body: dict[str, Any] = {"weights": None if handles_by_gpu is None else dict(handles_by_gpu)}
        if handles_by_gpu is None and weight_version is not None:
            body["weight_version"] = weight_version
        return await self._control("/update_weights", body)

    async def update_weights_from_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        bucket_bytes: int | None = None,
        weight_version: str | None = None,
        mode: UpdateMode = "wait",
        transport: Transport = "auto",
        dtype: torch.dtype | None = None,
        flush_cache: bool = True,
    ) -> UpdateResult:
        """Pushes a whole (or partial) state dict in buckets of at most `bucket_bytes`
        (default: DEFAULT_BUCKET_BYTES of bytes on the tensors transport,
        DEFAULT_IPC_BUCKET_BYTES of handles on cuda_ipc).

        `transport`: "tensors" sends the bytes (SGLang's /update_weights_from_tensor, one
        request per bucket); "cuda_ipc" sends CUDA IPC handles (trtllm-serve's /update_weights,
        one request per bucket, then `{"weights": null}`), which needs every tensor on a GPU of
        the server's host; "auto" picks cuda_ipc when every tensor is on CUDA.
        `mode`: "wait" lets in-flight requests finish first (new ones are held), "abort"
        cancels them (`abort_all_requests`).
        `dtype`: cast to the server's dtype first (the server refuses a dtype mismatch).

        On the tensors transport each bucket is an update of its own: `weight_version` is sent
        with every bucket (without one the server counts each bucket as an update) and requests
        that run between two buckets see a mix of old and new weights; call
        pause_generation() around the push to avoid that. The CUDA IPC transport applies the
        version only at the final call.
        """
        named = w.unique_named_tensors(state_dict)
        if not named:
            raise ValueError("the state dict is empty")
        if transport == "auto":
            transport = "cuda_ipc" if all(t.device.type == "cuda" for _, t in named) else "tensors"
        if transport not in ("tensors", "cuda_ipc"):
            raise ValueError(f"transport must be auto, tensors or cuda_ipc, got {transport!r}")
        if bucket_bytes is None:
            bucket_bytes = (
                DEFAULT_BUCKET_BYTES if transport == "tensors" else DEFAULT_IPC_BUCKET_BYTES
            )
        started = time.perf_counter()
        groups = list(w.buckets(named, bucket_bytes))
        total = sum(w.tensor_bytes(t) for _, t in named)
        last: ControlResult | None = None
        if transport == "tensors":
            for k, bucket in enumerate(groups):
                final = k == len(groups) - 1
                last = await self.update_weights_from_tensors(
                    bucket,
                    weight_version=weight_version,
                    mode=mode,
                    flush_cache=flush_cache and final,
                    dtype=dtype,
                )
            requests = len(groups)
        else:
            for bucket in groups:
                handles, keep = w.cuda_ipc_payload(bucket, dtype)
                body: dict[str, Any] = {"weights": handles}
                if mode == "abort":
                    body["abort_all_requests"] = True
                await self._control("/update_weights", body)
                del keep  # the server has copied from them
            last = await self.update_weights_cuda_ipc(None, weight_version=weight_version)
            requests = len(groups) + 1
        assert last is not None
        return UpdateResult(
            requests=requests,
            tensors=len(named),
            bytes=total,
            seconds=time.perf_counter() - started,
            weight_version=last.weight_version,
            last=last,
        )

    async def get_weight_version(self) -> str:
        result = await self._control("/get_weight_version", method="GET")
        if result.weight_version is None:
            raise RolloutError(
                "answer has no weight_version",
                status=200,
                error_type=None,
                route="GET /get_weight_version",
            )
        return result.weight_version

    # Scheduling -------------------------------------------------------------------------------

    async def pause_generation(self, mode: Literal["abort", "in_place"] = "abort") -> ControlResult:
        """SGLang's /pause_generation. "abort": in-flight requests are cancelled and new ones
        held; "in_place": new ones held and the engine stops stepping, keeping its requests
        and KV cache. Both until continue_generation()."""
        return await self._control("/pause_generation", {"mode": mode})

    async def continue_generation(self) -> ControlResult:
        return await self._control("/continue_generation", {})

    async def abort_request(self, request_id: str) -> ControlResult:
        """Cancels one request by its `x-request-id` (RouteNotFoundError if unknown or done)."""
        return await self._control("/abort_request", {"rid": request_id})

    async def abort_all(self) -> ControlResult:
        return await self._control("/abort_request", {"abort_all": True})

    async def flush_cache(self) -> ControlResult:
        return await self._control("/flush_cache", {})


def _ordering(body: dict[str, Any], weight_version: str | None, mode: UpdateMode) -> None:
    if mode not in ("wait", "abort"):
        raise ValueError(f"mode must be 'wait' or 'abort', got {mode!r}")
    if weight_version is not None:
        body["weight_version"] = weight_version
    if mode == "abort":
        body["abort_all_requests"] = True
