"""Serving a router on another host: TCP with TLS and a shared secret, never plaintext.

`python -m tensorgate.executor --listen HOST:PORT --tls-cert PEM --tls-key PEM`, with the secret
in the environment variable TENSORGATE_EXECUTOR_SECRET (never on a command line, which every
user can read through ps). All three are required with --listen. Every RPC, on every address of
such an executor, must carry the gRPC metadata `authorization: Bearer <secret>`; anything else
is answered UNAUTHENTICATED before the call reaches the service. The secret is compared in
constant time.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

SECRET_ENV = "TENSORGATE_EXECUTOR_SECRET"
# Shorter than this is accepted, with a warning: the operator's choice, but guessable.
WEAK_SECRET_CHARS = 16


class RemoteConfigError(ValueError):
    """The TCP listener cannot be set up as asked; the message names what is missing."""


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise RemoteConfigError(f"--listen {text!r}: use HOST:PORT, e.g. 0.0.0.0:50051")
    try:
        number = int(port)
    except ValueError:
        raise RemoteConfigError(f"--listen {text!r}: the port {port!r} is not a number") from None
    if not 1 <= number <= 65535:
        raise RemoteConfigError(f"--listen {text!r}: the port must be 1 to 65535")
    return host, number


@dataclass(frozen=True, repr=False)
class RemoteListen:
    """A TCP address to serve with TLS, and the secret every call must carry."""

    host: str
    port: int
    certificate_chain: bytes
    private_key: bytes
    secret: str

    def __repr__(self) -> str:  # never the key or the secret in a log line or a traceback
        return f"RemoteListen({self.address}, TLS)"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def load_remote_listen(
    listen: str,
    cert: Path | None,
    key: Path | None,
    env: Mapping[str, str] | None = None,
) -> RemoteListen:
    """Everything --listen needs, read and checked at start (before the engine loads, which
    may take minutes): the certificate chain and key files, and the secret."""
    host, port = parse_listen(listen)
    missing = [flag for flag, value in (("--tls-cert", cert), ("--tls-key", key)) if not value]
    env = os.environ if env is None else env
    secret = env.get(SECRET_ENV, "")
    if not secret.strip():
        missing.append(f"the shared secret in ${SECRET_ENV}")
    if missing:
        raise RemoteConfigError(
            f"--listen {listen} serves off-host, which needs TLS and a shared secret: missing "
            f"{', '.join(missing)}"
        )
    if secret != secret.strip() or not all(" " <= c <= "~" for c in secret):
        # It travels as a gRPC metadata value: printable ASCII only, and a stray newline (from
        # a file) would make it a secret no client sends.
        raise RemoteConfigError(
            f"${SECRET_ENV} must be printable ASCII with no leading or trailing whitespace"
        )
    assert cert is not None and key is not None
    return RemoteListen(
        host=host,
        port=port,
        certificate_chain=_read_pem(cert, "--tls-cert", "CERTIFICATE"),
        private_key=_read_pem(key, "--tls-key", "PRIVATE KEY"),
        secret=secret,
    )


def _read_pem(path: Path, flag: str, kind: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RemoteConfigError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    # "PRIVATE KEY" matches "RSA PRIVATE KEY" and "EC PRIVATE KEY" too.
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise RemoteConfigError(f"{flag} {path}: not a PEM file with a {kind}")
    return data


def server_credentials(remote: RemoteListen) -> grpc.ServerCredentials:
    """TLS with the given chain and key; clients are not asked for certificates (the secret
    authenticates them)."""
    return grpc.ssl_server_credentials([(remote.private_key, remote.certificate_chain)])


_MISSING = (
    "this executor requires the gRPC metadata `authorization: Bearer <secret>`, with the secret "
    f"it was started with (${SECRET_ENV})"
)
_WRONG = f"the authorization secret is not this executor's (${SECRET_ENV})"


class SecretCheck(grpc.aio.ServerInterceptor):
    """Refuses every call whose metadata lacks `authorization: Bearer <secret>`."""

    def __init__(self, secret: str) -> None:
        self._expected = f"Bearer {secret}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        problem = self._problem(handler_call_details.invocation_metadata or ())
        return handler if problem is None else _refusing(handler, problem)

    def _problem(self, metadata) -> str | None:
        for key, value in metadata:
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return None if hmac.compare_digest(given, self._expected) else _WRONG
        return _MISSING


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary or streaming, each way) that only refuses."""

    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
