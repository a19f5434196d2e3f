"""The executor over TCP (`--listen`): a real `python -m tensorgate.executor` (synthetic engine) on
127.0.0.1 with TLS and the shared secret, called by real grpc clients. Every RPC kind needs
`authorization: Bearer <secret>`; plaintext and an untrusted certificate do not connect; a
--listen without TLS files or the secret refuses to start, naming what is missing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from tls_certs import make_test_pki

from tensorgate.executor.remote import SECRET_ENV, RemoteConfigError, parse_listen
from tensorgate.v1 import executor_pb2 as pb
from tensorgate.v1 import executor_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

PYTHON_SOURCE = Path(__file__).resolve().parents[1]
SECRET = "test-secret-" + os.urandom(12).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executor_env(secret: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(PYTHON_SOURCE)}
    env.pop(SECRET_ENV, None)
    if secret is not None:
        env[SECRET_ENV] = secret
    return env


def run_executor(*args: str, secret: str | None = SECRET) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tensorgate.executor", "--engine", "synthetic", *args],
        env=executor_env(secret),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def auth(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def remote(pki):
    """A real executor on 127.0.0.1:<free port> with TLS; yields (address, stub, process)."""
    port = free_port()
    proc = run_executor(
        "--listen", f"127.0.0.1:{port}",
        "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key),
        "--iteration-ms", "2",
    )  # fmt: skip
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=pki.ca_pem())
    )
    stub = pb_grpc.ExecutorStub(channel)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if stub.Health(pb.HealthRequest(), timeout=2, metadata=auth(SECRET)).ready:
                break
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "the executor did not become ready"
        time.sleep(0.2)
    yield f"127.0.0.1:{port}", stub, proc
    channel.close()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_health_with_the_secret_is_ok(remote):
    _, stub, _ = remote
    reply = stub.Health(pb.HealthRequest(), timeout=5, metadata=auth(SECRET))
    assert reply.ready
    info = stub.Info(pb.InfoRequest(), timeout=5, metadata=auth(SECRET))
    assert info.engine == "synthetic"


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ([], "requires the gRPC metadata `authorization: Bearer <secret>`"),
        (auth("not-the-secret"), "the authorization secret is not this executor's"),
        (auth(SECRET + "x"), "the authorization secret is not this executor's"),
        ([("authorization", SECRET)], "the authorization secret is not this executor's"),
    ],
)
def test_a_missing_or_wrong_secret_is_unauthenticated(remote, metadata, says):
    _, stub, _ = remote
    with pytest.raises(grpc.RpcError) as e:
        stub.Health(pb.HealthRequest(), timeout=5, metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert says in e.value.details()
    assert SECRET not in e.value.details()


def test_every_kind_of_rpc_is_guarded(remote):
    """Unary (Stats), server-streaming (KvCacheEvents), bidirectional (Generate)."""
    _, stub, _ = remote
    wrong = auth("wrong")
    with pytest.raises(grpc.RpcError) as e:
        stub.Stats(pb.StatsRequest(), timeout=5, metadata=wrong)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        next(iter(stub.KvCacheEvents(pb.KvCacheEventsRequest(), timeout=5, metadata=wrong)))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    command = pb.GenerateCommand(
        requests=[pb.GenerateRequest(id=1, input_ids=[1, 2, 3], max_new_tokens=3)]
    )
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(iter([command]), timeout=5, metadata=wrong))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.FlushCache(pb.FlushCacheRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # With the secret, the same stream generates.
    tokens = []
    for it in stub.Generate(iter([command]), timeout=10, metadata=auth(SECRET)):
        for out in it.outputs:
            tokens += out.token_ids
    assert len(tokens) == 3


def test_plaintext_does_not_connect(remote):
    address, _, _ = remote
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ExecutorStub(channel).Health(
                pb.HealthRequest(), timeout=5, metadata=auth(SECRET)
            )
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_the_client_does_not_trust_does_not_connect(remote, tmp_path):
    address, _, _ = remote
    other = make_test_pki(tmp_path / "other")
    creds = grpc.ssl_channel_credentials(root_certificates=other.ca_pem())
    with grpc.secure_channel(address, creds) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ExecutorStub(channel).Health(
                pb.HealthRequest(), timeout=5, metadata=auth(SECRET)
            )
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_secret_is_not_on_the_command_line(remote):
    _, _, proc = remote
    assert SECRET.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()


def test_the_secret_leaves_the_environment_once_read(pki, monkeypatch):
    """Nothing the engine starts (MPI ranks, workers) inherits it; no repr shows it."""
    from tensorgate.executor.__main__ import parse_args, remote_listen

    monkeypatch.setenv(SECRET_ENV, SECRET)
    cmd = parse_args(
        ["--engine", "synthetic", "--listen", "127.0.0.1:50051",
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    )  # fmt: skip
    listener = remote_listen(cmd)
    assert listener.secret == SECRET
    assert SECRET_ENV not in os.environ
    assert SECRET not in repr(listener) and "PRIVATE" not in repr(listener)


# -- refusals at start --------------------------------------------------------------------------


def refused(*args: str, secret: str | None = SECRET) -> str:
    proc = run_executor(*args, secret=secret)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    return out.decode()


def test_listen_without_tls_files_is_refused(tmp_path):
    out = refused("--listen", "127.0.0.1:1")
    assert "--listen serves off-host, only with TLS: missing --tls-cert and --tls-key" in out


def test_listen_without_the_secret_is_refused_before_loading(pki):
    started = time.monotonic()
    out = refused(
        "--listen", "127.0.0.1:1", "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key), secret=None,
    )  # fmt: skip
    assert f"missing the shared secret in ${SECRET_ENV}" in out
    assert time.monotonic() - started < 30


def test_unreadable_or_wrong_tls_files_are_refused(pki, tmp_path):
    out = refused(
        "--listen", "127.0.0.1:1", "--tls-cert", str(tmp_path / "absent.crt"),
        "--tls-key", str(pki.server_key),
    )  # fmt: skip
    assert "--tls-cert" in out and "cannot read it" in out
    out = refused(
        "--listen", "127.0.0.1:1", "--tls-cert", str(pki.server_key),
        "--tls-key", str(pki.server_key),
    )  # fmt: skip
    assert "not a PEM file with a CERTIFICATE" in out


def test_neither_socket_nor_listen_is_refused():
    out = refused()
    assert "give --uds-path PATH (a unix socket) or --listen HOST:PORT" in out


def test_tls_files_without_listen_are_refused(pki, tmp_path):
    out = refused("--uds-path", str(tmp_path / "e.sock"), "--tls-cert", str(pki.server_cert))
    assert "--tls-cert and --tls-key go with --listen" in out


def test_a_secret_with_a_trailing_newline_is_refused(pki):
    out = refused(
        "--listen", "127.0.0.1:1", "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key), secret=SECRET + "\n",
    )  # fmt: skip
    assert "no leading or trailing whitespace" in out


def test_listen_addresses_parse():
    assert parse_listen("0.0.0.0:50051") == ("0.0.0.0", 50051)
    assert parse_listen("[::]:50051") == ("[::]", 50051)
    for bad in ("50051", ":50051", "host:", "host:http", "host:0", "host:70000"):
        with pytest.raises(RemoteConfigError, match="--listen"):
            parse_listen(bad)
