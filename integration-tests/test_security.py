"""The security promises of README.md and docs/reliability.md, on the real processes: the API
key (flag and environment) on every route but the health probes, the key kept off every command
line, the executor's private socket directory, and its opt-in TCP port on loopback only."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import requests
from conftest import free_port, stop, synthetic_server, tcp_listeners

from tensorgate.v1 import executor_pb2, executor_pb2_grpc

pytestmark = pytest.mark.timeout(300)


def env_without_key() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TENSORGATE_API_KEY", None)
    return env


def session_pids(sid: int) -> dict[int, bytes]:
    """Processes of session `sid` (the launcher and everything it started) and their argv."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
    return out


def every_cmdline() -> dict[int, bytes]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                continue
    return out


def module_pid(procs: dict[int, bytes], module: str) -> int:
    pids = [p for p, cmd in procs.items() if f"\0-m\0{module}\0".encode() in cmd]
    assert len(pids) == 1, (module, procs)
    return pids[0]


# --- the API key -------------------------------------------------------------------------------

# Served outside the OpenAPI document (README.md, "HTTP API").
ROUTES_OUTSIDE_OPENAPI = [("get", "/metrics"), ("get", "/docs"), ("get", "/api-doc/openapi.json")]


def routes(url: str, key: str) -> list[tuple[str, str]]:
    """Every (method, path) the server has: its OpenAPI document, plus the few it does not list,
    so that a route added later cannot be missed."""
    r = requests.get(
        f"{url}/api-doc/openapi.json", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert r.status_code == 200, r.text
    found = [
        (method, path)
        for path, item in r.json()["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    ]
    assert {("post", "/generate"), ("post", "/v1/chat/completions")} <= set(found), found
    return sorted(set(found) | set(ROUTES_OUTSIDE_OPENAPI))


def call(url: str, method: str, path: str, headers: dict[str, str]) -> requests.Response:
    # A JSON body for every POST: with the right key it gets as far as validation (422).
    body = {"json": {}} if method == "post" else {}
    return requests.request(method, f"{url}{path}", headers=headers, timeout=30, **body)


def assert_unauthorized(path: str, r: requests.Response, *, says: str) -> None:
    """401 in the route family's error shape (docs/api.md, "Errors"), the message saying `says`."""
    assert r.status_code == 401, f"{path}: {r.status_code} {r.text[:300]}"
    body = r.json()
    if path.startswith("/v1/"):
        err = body["error"]
        assert err["type"] == "invalid_request_error", body
        assert err["code"] == "authentication", body
        message = err["message"]
    else:
        assert body["error_type"] == "authentication", body
        message = body["error"]
    assert says in message, (path, body)


# Probes for load balancers, which send no credentials (router/src/http/auth.rs, docs/api.md).
OPEN_ROUTES = {("get", "/health"), ("get", "/health_generate")}


def check_every_route_needs_the_key(url: str, key: str) -> None:
    listed = routes(url, key)
    for method, path in sorted(OPEN_ROUTES):
        assert (method, path) in listed, listed
        assert call(url, method, path, {}).status_code == 200, path
    checked = []
    for method, path in listed:
        if (method, path) in OPEN_ROUTES:
            continue
        assert_unauthorized(path, call(url, method, path, {}), says="Authorization: Bearer")
        for wrong in (
            "Bearer wrong-key",
            f"Bearer {key}x",
            f"Basic {key}",
            key,
            f"Bearer {key[:-1]}",
        ):
            r = call(url, method, path, {"Authorization": wrong})
            assert_unauthorized(path, r, says="API key")
        ok = call(url, method, path, {"Authorization": f"Bearer {key}"})
        assert ok.status_code in (200, 422), f"{method} {path} with the key: {ok.status_code}"
        checked.append(f"{method.upper()} {path}")
    assert len(checked) >= 10, checked
    print("needs the key:", ", ".join(checked))


def test_api_key_flag_guards_every_route_but_the_health_probes(tmp_path):
    key = secrets.token_hex(16)
    with synthetic_server(tmp_path, "--api-key", key, env=env_without_key()) as server:
        check_every_route_needs_the_key(server.url, key)


def test_api_key_env_guards_every_route_but_the_health_probes(tmp_path):
    key = secrets.token_hex(16)
    env = {**env_without_key(), "TENSORGATE_API_KEY": key}
    with synthetic_server(tmp_path, env=env) as server:
        check_every_route_needs_the_key(server.url, key)


def test_api_key_given_by_flag_is_on_no_child_command_line(tmp_path):
    """With `--api-key KEY` the key is in the launcher's own argv (the user put it there), but
    the launcher hands it to the router by environment: no other process shows it."""
    key = secrets.token_hex(16)
    with synthetic_server(tmp_path, "--api-key", key, env=env_without_key()) as server:
        procs = session_pids(server.proc.pid)
        module_pid(procs, "tensorgate.router")
        module_pid(procs, "tensorgate.executor")
        showing = {p for p, cmd in every_cmdline().items() if key.encode() in cmd}
        assert showing == {server.proc.pid}, {p: procs.get(p) for p in showing}


def test_api_key_given_by_environment_is_on_no_command_line(tmp_path):
    key = secrets.token_hex(16)
    env = {**env_without_key(), "TENSORGATE_API_KEY": key}
    with synthetic_server(tmp_path, env=env) as server:
        procs = session_pids(server.proc.pid)
        router = module_pid(procs, "tensorgate.router")
        module_pid(procs, "tensorgate.executor")
        showing = {p: cmd for p, cmd in every_cmdline().items() if key.encode() in cmd}
        assert not showing, showing
        # It did reach the router: the key works.
        r = requests.get(
            f"{server.url}/info", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        assert r.status_code == 200, r.text
        assert key.encode() in Path(f"/proc/{router}/environ").read_bytes()


# --- the rollout-control key ------------------------------------------------------------------

# The routes --enable-rl-control adds (docs/api.md, "Rollout control"): they take the control
# key, never the API key (router/src/http/rl/auth.rs).
CONTROL_PATHS = {
    "/release_memory",
    "/resume_memory",
    "/update_weights",
    "/update_weights_from_disk",
    "/update_weights_from_tensor",
    "/flush_cache",
    "/pause_generation",
    "/continue_generation",
    "/abort_request",
    "/get_weight_version",
}


def env_without_keys() -> dict[str, str]:
    env = env_without_key()
    env.pop("TENSORGATE_RL_CONTROL_KEY", None)
    return env


def test_with_rl_control_every_route_needs_its_own_key(tmp_path):
    """API key on every route but /health (the control routes included: it does not open
    them); the control key on the control routes only."""
    api, ctl = secrets.token_hex(16), secrets.token_hex(16)
    env = {**env_without_keys(), "TENSORGATE_RL_CONTROL_KEY": ctl}
    with synthetic_server(tmp_path, "--api-key", api, "--enable-rl-control", env=env) as server:
        listed = routes(server.url, api)
        control = [(m, p) for m, p in listed if p in CONTROL_PATHS]
        assert {p for _, p in control} == CONTROL_PATHS, control
        generation = [(m, p) for m, p in listed if p not in CONTROL_PATHS]
        for method, path in generation:
            if (method, path) in OPEN_ROUTES:
                continue
            r = call(server.url, method, path, {"Authorization": f"Bearer {ctl}"})
            assert_unauthorized(path, r, says="API key")
            ok = call(server.url, method, path, {"Authorization": f"Bearer {api}"})
            assert ok.status_code in (200, 422), f"{method} {path}: {ok.status_code}"
        for method, path in control:
            assert_unauthorized(path, call(server.url, method, path, {}), says="Bearer")
            for wrong in (f"Bearer {api}", "Bearer wrong-key", f"Bearer {ctl}x", ctl):
                r = call(server.url, method, path, {"Authorization": wrong})
                assert_unauthorized(path, r, says="control key")
            # With the key the route acts (these bodies are empty: some are refused, 422, and a
            # release before an update makes that update a conflict, 409): never 401.
            r = call(server.url, method, path, {"Authorization": f"Bearer {ctl}"})
            assert r.status_code in (200, 409, 422), f"{method} {path}: {r.status_code} {r.text}"


def test_rl_control_key_is_on_no_child_command_line(tmp_path):
    """Given as a flag, only the launcher's own argv shows the control key; the router gets it
    by environment and the executor not at all."""
    ctl = secrets.token_hex(16)
    with synthetic_server(
        tmp_path, "--enable-rl-control", "--rl-control-key", ctl, env=env_without_keys()
    ) as server:
        procs = session_pids(server.proc.pid)
        router = module_pid(procs, "tensorgate.router")
        executor = module_pid(procs, "tensorgate.executor")
        showing = {p for p, cmd in every_cmdline().items() if ctl.encode() in cmd}
        assert showing == {server.proc.pid}, {p: procs.get(p) for p in showing}
        assert ctl.encode() in Path(f"/proc/{router}/environ").read_bytes()
        assert ctl.encode() not in Path(f"/proc/{executor}/environ").read_bytes()
        r = requests.get(
            f"{server.url}/get_weight_version",
            headers={"Authorization": f"Bearer {ctl}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text


# --- the executor's socket and port ------------------------------------------------------------


def test_default_executor_socket_is_in_a_private_directory(tmp_path):
    """Without --executor-socket the launcher makes a fresh 0700 directory of its own, the socket
    in it is 0600, and both are gone after a clean stop."""
    with synthetic_server(tmp_path, default_socket=True) as server:
        procs = session_pids(server.proc.pid)
        argv = procs[module_pid(procs, "tensorgate.executor")].split(b"\0")
        sock = Path(argv[argv.index(b"--uds-path") + 1].decode())
        d = sock.parent
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, oct(d.stat().st_mode)
        assert d.stat().st_uid == os.getuid()
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600, oct(sock.stat().st_mode)
        # Fresh: nothing in it but the socket.
        assert [p.name for p in d.iterdir()] == [sock.name]
        assert stop(server.proc) == 0
        assert not d.exists(), f"{d} left behind"


# 127.0.0.1 as /proc/net/tcp writes it, plain or IPv4-mapped in IPv6 (gRPC may listen that way).
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


def own_non_loopback_ipv4() -> str | None:
    """This host's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@contextmanager
def executor_with_port(tmp_path: Path, port: int) -> Iterator[tuple[subprocess.Popen, Path]]:
    d = tmp_path / "sock"
    d.mkdir(mode=0o700)
    sock = d / "executor.sock"
    log = open(tmp_path / "executor.log", "wb")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tensorgate.executor", "--engine", "synthetic"),
            *("--uds-path", str(sock), "--port", str(port)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "executor.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "executor.log").read_text()
            try:
                with grpc.insecure_channel(f"unix:{sock}") as ch:
                    reply = executor_pb2_grpc.ExecutorStub(ch).Health(
                        executor_pb2.HealthRequest(), timeout=2
                    )
                if reply.ready:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        yield proc, sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_executor_port_listens_on_loopback_only(tmp_path):
    port = free_port()
    with executor_with_port(tmp_path, port) as (proc, _):
        listening = tcp_listeners(proc.pid)
        # Never a wildcard or another interface's address.
        assert listening, "the executor does not listen on --port"
        assert {p for _, p in listening} == {port}, listening
        assert {addr for addr, _ in listening} <= LOOPBACK, listening
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = executor_pb2_grpc.ExecutorStub(ch).Health(
                executor_pb2.HealthRequest(), timeout=5
            )
        assert reply.ready
        ip = own_non_loopback_ipv4()
        if ip is not None:
            with pytest.raises(OSError), socket.create_connection((ip, port), timeout=2):
                pass


def test_serve_executor_port_listens_on_loopback_only(tmp_path):
    """`tensorgate serve --executor-port` hands the port to the executor, which still listens
    on loopback only (the router keeps using the unix socket)."""
    port = free_port()
    with synthetic_server(tmp_path, "--executor-port", str(port)) as server:
        procs = session_pids(server.proc.pid)
        executor = module_pid(procs, "tensorgate.executor")
        listening = tcp_listeners(executor)
        assert listening, "the executor does not listen on --executor-port"
        assert {p for _, p in listening} == {port}, listening
        assert {addr for addr, _ in listening} <= LOOPBACK, listening
