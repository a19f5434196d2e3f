"""One router, many executors (issue 18), as real processes: synthetic executors with the
prefix-cache model behind one router. KV-aware routing against round-robin and an oracle on a
multi-turn chat workload; kill -9 of an executor under load with migration; a worker that joins
at run time; a slow worker."""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from fleet import (
    SYNTHETIC,
    Executor,
    Fleet,
    fleet,
    free_port,
    hit_rate,
    multi_turn,
    start_executor,
    start_router,
    stop_process,
    stream,
    stream_body,
    user_prompt,
    wait_workers,
)

# Three workers, each with room for a third of the users' conversations and a little more:
# routed by prefix, every conversation stays cached; spread round, each worker sees every user
# and its LRU thrashes.
SMALL_CACHE = ["--synthetic-cache-blocks", "420"]


def test_kv_aware_routing_nears_the_oracle_hit_rate_and_halves_ttft(embedded_model_dir):
    # The oracle: one worker whose cache holds every conversation (no routing can do better).
    with fleet(embedded_model_dir, [["--synthetic-cache-blocks", "100000"]]) as f:
        multi_turn(f.url)
        oracle = hit_rate(f.info())
    results = {}
    for policy in ("kv-aware", "round-robin"):
        with fleet(embedded_model_dir, [SMALL_CACHE] * 3, ["--routing", policy]) as f:
            ttfts = multi_turn(f.url)
            info = f.info()
            assert info["routing"] == policy
            assert all(w["requests"] > 0 for w in info["workers"]), info["workers"]
            results[policy] = (hit_rate(info), statistics.median(ttfts))
    kv_hits, kv_ttft = results["kv-aware"]
    rr_hits, rr_ttft = results["round-robin"]
    print(
        f"oracle hit rate {oracle:.3f}; kv-aware {kv_hits:.3f}, TTFT p50 {kv_ttft * 1000:.1f} ms; "
        f"round-robin {rr_hits:.3f}, TTFT p50 {rr_ttft * 1000:.1f} ms"
    )
    assert oracle > 0.5, oracle  # the workload does share prefixes
    assert kv_hits >= 0.9 * oracle, (kv_hits, oracle)
    assert kv_ttft <= 0.5 * rr_ttft, (kv_ttft, rr_ttft)


def prompts(n: int, length: int = 200) -> list[list[int]]:
    rng = random.Random(7)
    return [user_prompt(rng, length) for _ in range(n)]


def run_all(url: str, batch: list[list[int]], max_new: int) -> list[tuple[list[int], dict]]:
    with ThreadPoolExecutor(len(batch)) as pool:
        return [
            (tokens, last) for _, tokens, last in pool.map(lambda p: stream(url, p, max_new), batch)
        ]


def migrations(metrics: str, outcome: str) -> float:
    m = re.search(rf'tensorgate_migrations_total\{{outcome="{outcome}"\}} (\S+)', metrics)
    return float(m.group(1)) if m else 0.0


def test_a_killed_executor_loses_no_request_and_no_token(embedded_model_dir):
    batch = prompts(24)
    with fleet(embedded_model_dir, [[]] * 3, ["--routing", "least-load"]) as f:
        reference = run_all(f.url, batch, 120)
        assert all(len(t) == 120 for t, _ in reference)
        results: list = []
        runner = threading.Thread(target=lambda: results.extend(run_all(f.url, batch, 120)))
        runner.start()
        # Mid-generation: 120 steps of 4 ms take about half a second.
        time.sleep(0.25)
        assert f.info()["workers"][0]["in_flight"] > 0
        f.executors[0].kill()
        runner.join(timeout=120)
        assert not runner.is_alive()
        for (tokens, last), (expected, _) in zip(results, reference, strict=True):
            assert "error" not in last, last
            assert tokens == expected  # no token lost, repeated or changed
        assert migrations(f.metrics(), "moved") >= 1
        states = {w["id"]: w["state"] for w in f.info()["workers"]}
        assert states[0] == "disconnected", states


def test_without_migration_a_killed_executor_ends_its_streams_with_an_error(
    embedded_model_dir,
):
    batch = prompts(12)
    with fleet(
        embedded_model_dir, [[]] * 2, ["--routing", "round-robin", "--migration-limit", "0"]
    ) as f:
        results: list = []
        runner = threading.Thread(target=lambda: results.extend(run_all(f.url, batch, 200)))
        runner.start()
        time.sleep(0.25)
        f.executors[0].kill()
        runner.join(timeout=120)
        assert not runner.is_alive()
        errors = [last["error"] for _, last in results if "error" in last]
        # Half went to the killed worker: each ends with an error event saying why, none hangs.
        assert len(errors) == len(batch) // 2, results
        assert all("--migration-limit 0" in e for e in errors), errors
        assert all(len(t) == 200 for t, last in results if "error" not in last)


def test_a_worker_started_at_run_time_joins_and_takes_load(embedded_model_dir):
    batch = prompts(12)
    with fleet(embedded_model_dir, [[]] * 3, start=[True, True, False]) as f:
        run_all(f.url, batch, 8)
        workers = f.info()["workers"]
        assert [w["state"] for w in workers] == ["healthy", "healthy", "disconnected"]
        late = start_executor(f.directory, "executor-2", f.executors[0].proc.args[7:])
        f.executors.append(late)
        wait_workers(f, 3)
        run_all(f.url, prompts(12, 300), 8)
        workers = f.info()["workers"]
        assert workers[2]["state"] == "healthy"
        assert workers[2]["requests"] > 0, workers


@pytest.mark.parametrize("policy", ["least-load", "kv-aware"])
def test_a_slow_worker_gets_less(embedded_model_dir, policy):
    # Worker 2 steps ten times slower: its requests stay in flight ten times longer.
    with fleet(embedded_model_dir, [[], [], ["--iteration-ms", "40"]], ["--routing", policy]) as f:

        def client(c: int) -> None:
            rng = random.Random(c)
            for _ in range(8):
                _, tokens, last = stream(f.url, user_prompt(rng, 64), 24)
                assert len(tokens) == 24, last

        # A closed loop: each client sends its next request when the last one ends.
        with ThreadPoolExecutor(9) as pool:
            list(pool.map(client, range(9)))
        counts = [w["requests"] for w in f.info()["workers"]]
        assert sum(counts) == 72
        assert counts[2] < 0.5 * min(counts[0], counts[1]), counts


def test_a_hung_worker_leaves_routing_and_returns_when_healthy(embedded_model_dir):
    with fleet(embedded_model_dir, [[]] * 3, ["--routing", "least-load"]) as f:
        hung = f.executors[0]
        os.kill(hung.proc.pid, signal.SIGSTOP)  # its stream stays open; Health times out
        try:
            deadline = time.monotonic() + 30
            while f.info()["workers"][0]["state"] != "unhealthy":
                assert time.monotonic() < deadline, f.info()["workers"]
                time.sleep(0.2)
            before = f.info()["workers"][0]["requests"]
            assert all(len(t) == 16 for t, _ in run_all(f.url, prompts(12), 16))
            assert f.info()["workers"][0]["requests"] == before
        finally:
            os.kill(hung.proc.pid, signal.SIGCONT)
        wait_workers(f, 3)
        run_all(f.url, prompts(12, 150), 16)
        assert f.info()["workers"][0]["requests"] > before


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends/trtllm/tests"))


def test_executors_off_host_are_reached_over_tls_with_the_shared_secret(embedded_model_dir):
    from tls_certs import make_test_pki

    directory = Path(tempfile.mkdtemp(prefix="tg-tls-"))
    pki = make_test_pki(directory)
    port = free_port()
    secret = {**os.environ, "TENSORGATE_EXECUTOR_SECRET": "s3cret-for-tests"}
    executor = start_executor(
        directory,
        "remote",
        [
            *SYNTHETIC,
            "--listen",
            f"127.0.0.1:{port}",
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
        ],
        env=secret,
    )
    routers = []
    try:
        executor.wait_ready()
        tls = ["--executor-tls-ca", str(pki.ca_cert), "--discovery-interval-s", "1"]
        url_of = f"https://localhost:{port}"

        def router(env):
            proc, url, log = start_router(
                embedded_model_dir, [], directory, ["--executor", url_of, *tls], env=env
            )
            routers.append(proc)
            return Fleet(url=url, router=proc, router_log=log)

        # localhost is a name: resolved, each of its addresses a worker (::1 finds nothing).
        good = router(secret)
        wait_workers(good, 1)
        _, tokens, last = stream(good.url, prompts(1)[0], 8)
        assert len(tokens) == 8, last
        healthy = [w for w in good.info()["workers"] if w["state"] == "healthy"]
        assert [w["address"] for w in healthy] == [f"https://localhost@127.0.0.1:{port}"]

        # A wrong secret: the executor refuses every call, and the router refuses to start.
        bad = router({**os.environ, "TENSORGATE_EXECUTOR_SECRET": "wrong"})
        assert bad.router.wait(timeout=60) != 0
        refused = bad.router_log.read_text()
        assert "refused the router's shared secret (TENSORGATE_EXECUTOR_SECRET)" in refused

        # No secret or no CA: refused at start, naming what is missing.
        proc, _, log = start_router(embedded_model_dir, [], directory, ["--executor", url_of])
        assert proc.wait(timeout=30) != 0
        assert "--executor-tls-ca" in log.read_text()
        proc, _, log = start_router(
            embedded_model_dir, [], directory, ["--executor", f"http://127.0.0.1:{port}"]
        )
        assert proc.wait(timeout=30) != 0
        assert "plaintext" in log.read_text()
    finally:
        for proc in routers:
            stop_process(proc)
        stop_process(executor.proc)


def test_serve_with_data_parallel_size_runs_a_pool(tmp_path):
    from conftest import synthetic_server

    with synthetic_server(tmp_path, "--data-parallel-size", "2", "--iteration-ms", "2") as s:
        info = requests.get(f"{s.url}/info", timeout=5).json()
        assert info["routing"] == "kv-aware"
        assert [w["state"] for w in info["workers"]] == ["healthy", "healthy"]
        addresses = [w["address"] for w in info["workers"]]
        assert addresses[0].endswith("-0.sock") and addresses[1].endswith("-1.sock"), addresses
        with ThreadPoolExecutor(8) as pool:
            done = list(pool.map(lambda p: stream(s.url, p, 8), prompts(8)))
        assert all(len(tokens) == 8 for _, tokens, _ in done)
        workers = requests.get(f"{s.url}/info", timeout=5).json()["workers"]
        assert sum(w["requests"] for w in workers) == 8


# -- migration on a real model: two transformers executors (SmolLM2-135M on the CPU) -------------


def transformers_pool(directory: Path, model: Path) -> list:
    args = ["--engine", "transformers", "--model-id", str(model), "--device", "cpu"]
    args += ["--max-batch-size", "4", "--max-total-tokens", "1024"]
    executors = []
    for i in range(2):
        sock = directory / f"tf-{i}.sock"
        log = directory / f"tf-{i}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tensorgate.executor", "--uds-path", str(sock), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        executors.append(Executor(socket=sock, proc=proc, log=log))
    for e in executors:
        e.wait_ready(timeout=600)
    return executors


def test_a_seeded_sampled_request_survives_its_executor_token_for_token(embedded_model_dir):
    directory = Path(tempfile.mkdtemp(prefix="tg-tf-fleet-"))
    executors = transformers_pool(directory, embedded_model_dir)
    router, url, log = start_router(
        embedded_model_dir,
        [e.socket for e in executors],
        directory,
        ["--routing", "round-robin", "--prompt-format", "raw"],
    )
    f = Fleet(url=url, router=router, router_log=log, executors=executors)
    try:
        wait_workers(f, 2)
        sampled = {
            "inputs": "The three most useful things to pack for a long hike are",
            "parameters": {"do_sample": True, "temperature": 0.9, "seed": 42, "max_new_tokens": 40},
        }
        _, reference, last = stream_body(url, sampled)
        assert len(reference) == 40, last

        def kill_after(n: int):
            def on_token(count: int) -> None:
                if count == n:
                    # The worker running it now: the only one with a request in flight.
                    busy = [w["id"] for w in f.info()["workers"] if w["in_flight"] > 0]
                    assert len(busy) == 1, f.info()["workers"]
                    executors[busy[0]].kill()

            return on_token

        # Killed 10 tokens in: the request moves to the other executor with its 10 tokens
        # and its seed, which continues its per-step stream there.
        _, moved, last = stream_body(url, sampled, kill_after(10))
        assert "error" not in last, last
        assert moved == reference
        assert migrations(f.metrics(), "moved") == 1

        # A grammar's matcher state cannot move: the stream ends with an error saying so.
        survivor = next(e for e in executors if e.proc.poll() is None)
        guided = {
            "inputs": "A JSON object describing a hiking trip:",
            "parameters": {
                "max_new_tokens": 60,
                "grammar": {"type": "json", "value": {"type": "object"}},
            },
        }
        _, _, last = stream_body(url, guided, lambda n: survivor.kill() if n == 5 else None)
        assert "grammar" in last.get("error", ""), last
    finally:
        stop_process(router)
        for e in executors:
            stop_process(e.proc)


def test_a_worker_serving_another_model_is_kept_out(embedded_model_dir):
    with fleet(embedded_model_dir, [[], []], start=[True, False]) as f:
        other = start_executor(f.directory, "executor-1", [*SYNTHETIC, "--vocab-size", "500"])
        f.executors.append(other)
        other.wait_ready()
        deadline = time.monotonic() + 30
        while f.info()["workers"][1]["state"] != "incompatible":
            assert time.monotonic() < deadline, f.info()["workers"]
            time.sleep(0.2)
        run_all(f.url, prompts(6), 4)
        workers = f.info()["workers"]
        assert [w["requests"] for w in workers] == [6, 0], workers
