"""deploy/kubernetes/: the manifests against Kubernetes' own API schemas, and the commands the
pods run against the real parsers and a real executor.

- kubernetes-validate (its schemas are in the package: no network) in strict mode, where a
  field the API does not have fails, for the oldest and newest Kubernetes versions pinned below;
- the router's arguments through the router's own clap parser (`tensorgate-router ARGS --help`
  exits 0 only when every argument before --help parses), and their names against
  router/src/config.rs;
- the executor's arguments through its argparse parser;
- the executor's liveness probe, run as written against a real executor listening on TCP with
  TLS and the shared secret;
- the names that tie the files together (Service, namespace, ports, Secrets, mounts, metric).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests claim (docs/scale-out.md) and the newest whose schemas the
# pinned kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

# Every object in deploy/kubernetes/, so that a file that stops parsing, or a document that
# disappears, fails here rather than leaving less to validate.
EXPECTED = {
    ("executor.yaml", "Service", "tensorgate-executor"),
    ("executor.yaml", "StatefulSet", "tensorgate-executor"),
    ("router.yaml", "Service", "tensorgate-router"),
    ("router.yaml", "Deployment", "tensorgate-router"),
    ("models-pvc.yaml", "PersistentVolumeClaim", "tensorgate-models"),
    ("secret.example.yaml", "Secret", "tensorgate-executor-secret"),
    ("secret.example.yaml", "Secret", "tensorgate-executor-tls"),
    ("hpa.yaml", "HorizontalPodAutoscaler", "tensorgate-executor"),
}
# What `kubectl apply -k` applies; the rest are examples applied by hand (docs/scale-out.md).
APPLIED = ["models-pvc.yaml", "executor.yaml", "router.yaml"]
NOT_APPLIED = {"secret.example.yaml", "hpa.yaml"}


def documents() -> list[tuple[str, dict]]:
    """(file name, object) for every API object, kustomization.yaml apart."""
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def find(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def flag_value(args: list[str], flag: str) -> str:
    (i,) = [i for i, a in enumerate(args) if a == flag]
    return args[i + 1]


def kustomization() -> dict:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def test_every_manifest_is_there_and_parses():
    found = {(f, d["kind"], d["metadata"]["name"]) for f, d in documents()}
    assert found == EXPECTED
    assert len(documents()) == len(EXPECTED) == 8


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_strictly_against_the_kubernetes_schemas(version):
    checked = 0
    for name, doc in documents():
        where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{where} is not valid for Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            # The command line only warns on an unknown kind; here it fails.
            pytest.fail(f"{where}: {e.message}")
        checked += 1
    assert checked == len(EXPECTED)


def test_the_validator_refuses_an_unknown_field():
    """The check above can fail: a misspelt field deep in the pod template is refused."""
    workload = copy.deepcopy(find("StatefulSet", "tensorgate-executor"))
    kubernetes_validate.validate(workload, KUBERNETES_VERSIONS[0], strict=True)
    container(workload)["readinessProbe"]["tcpSockett"] = {"port": "grpc"}
    with pytest.raises(kubernetes_validate.ValidationError, match="tcpSockett"):
        kubernetes_validate.validate(workload, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_applies_the_deployment_and_names_the_namespace():
    k = kustomization()
    assert k["resources"] == APPLIED
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(APPLIED) | NOT_APPLIED
    # Objects carry no namespace of their own: the kustomization's applies to all of them.
    assert all("namespace" not in d["metadata"] for _, d in documents())
    executor_url = flag_value(
        container(find("Deployment", "tensorgate-router"))["args"], "--executor"
    )
    assert f".{k['namespace']}.svc.cluster.local:" in executor_url
    (image,) = k["images"]
    for kind, name in (("Deployment", "tensorgate-router"), ("StatefulSet", "tensorgate-executor")):
        assert container(find(kind, name))["image"] == image["name"]


# -- the router's command ---------------------------------------------------------------------


def router_flags_in_config_rs() -> set[str]:
    """Every `--flag` of router/src/config.rs: a field with an `#[arg(long...)]` attribute,
    named by `long = "..."` or else by the field (`skip` fields are no flags)."""
    source = (ROOT / "router" / "src" / "config.rs").read_text()
    struct = source[source.index("pub struct Config {") :]
    struct = struct[: struct.index("\n}\n")]
    flags = set()
    for attr, field in re.findall(r"#\[arg\(((?:[^\]]|\][^\n])*?)\)\]\s*pub (\w+):", struct):
        if not re.search(r"\blong\b", attr):
            continue
        named = re.search(r'\blong\s*=\s*"([^"]+)"', attr)
        flags.add("--" + (named.group(1) if named else field.replace("_", "-")))
    return flags


def test_router_flags_exist_in_config_rs():
    flags = router_flags_in_config_rs()
    # The parse above found the struct's flags at all (not an empty set that nothing is in).
    assert {"--hostname", "--port", "--tokenizer", "--cors-allow-origin"} <= flags
    args = container(find("Deployment", "tensorgate-router"))["args"]
    used = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    assert len(used) >= 8
    assert used <= flags, f"not router flags (router/src/config.rs): {sorted(used - flags)}"


def test_router_args_parse_with_the_router_parser():
    c = container(find("Deployment", "tensorgate-router"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert c["command"] == ["tensorgate-router"]
    assert scripts["tensorgate-router"] == "tensorgate.router:main"
    # clap reads the arguments in order and stops at --help: a bad name or value before it is
    # an error (exit 2), a clean parse prints the help (exit 0). Nothing is started.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORGATE_")}
    done = subprocess.run(
        [sys.executable, "-m", "tensorgate.router", *c["args"], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "--executor" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "tensorgate.router", *c["args"], "--routing", "nope", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert bad.returncode == 2 and "--routing" in bad.stderr, bad.stderr


# -- the executor's command -------------------------------------------------------------------


def test_executor_args_parse_with_the_executor_parser():
    from tensorgate.executor.__main__ import build_parser, parse_args

    c = container(find("StatefulSet", "tensorgate-executor"))
    assert c["command"] == ["python", "-m", "tensorgate.executor"]
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stderr(refusal):
            cmd = parse_args(c["args"])
    except SystemExit:
        pytest.fail(
            f"python -m tensorgate.executor refuses the manifest's args: {refusal.getvalue()}"
        )
    assert cmd.config.engine == "transformers"
    assert str(cmd.config.model_dir) == flag_value(c["args"], "--model-id")
    with pytest.raises(SystemExit):
        build_parser().parse_args([*c["args"], "--no-such-flag"])


def test_names_tie_the_files_together():
    executor = find("StatefulSet", "tensorgate-executor")
    executor_c = container(executor)
    headless = find("Service", "tensorgate-executor")
    router = find("Deployment", "tensorgate-router")
    router_c = container(router)
    router_svc = find("Service", "tensorgate-router")

    # Discovery: the router's URL is the headless Service, on its port, which is the
    # executor's --listen port; the StatefulSet is governed by that Service.
    assert headless["spec"]["clusterIP"] == "None"
    assert executor["spec"]["serviceName"] == headless["metadata"]["name"]
    labels = executor["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()
    (grpc_port,) = headless["spec"]["ports"]
    assert (grpc_port["name"], grpc_port["port"]) == ("grpc", 50051)
    url = flag_value(router_c["args"], "--executor")
    ns = kustomization()["namespace"]
    assert url == f"https://{headless['metadata']['name']}.{ns}.svc.cluster.local:50051"
    listen = flag_value(executor_c["args"], "--listen")
    assert listen == f"0.0.0.0:{grpc_port['port']}"
    assert executor_c["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}]

    # The router's Service: 80 -> the container's http port, which is --port.
    (http,) = router_svc["spec"]["ports"]
    assert (http["port"], http["targetPort"]) == (80, "http")
    assert (
        router_svc["spec"]["selector"].items()
        <= router["spec"]["template"]["metadata"]["labels"].items()
    )
    (http_port,) = router_c["ports"]
    assert http_port["name"] == "http"
    assert str(http_port["containerPort"]) == flag_value(router_c["args"], "--port")
    assert router_c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}

    # Files named in the args are in mounted volumes holding those keys.
    def mounted_file(workload: dict, path: str) -> tuple[dict, str]:
        c = container(workload)
        for m in c["volumeMounts"]:
            if path.startswith(m["mountPath"] + "/"):
                (vol,) = [
                    v
                    for v in workload["spec"]["template"]["spec"]["volumes"]
                    if v["name"] == m["name"]
                ]
                return vol, path[len(m["mountPath"]) + 1 :]
        raise AssertionError(f"{path} is in no volume mounted in {workload['metadata']['name']}")

    tls_secret = find("Secret", "tensorgate-executor-tls")
    for workload, flag in (
        (executor, "--tls-cert"),
        (executor, "--tls-key"),
        (router, "--executor-tls-ca"),
    ):
        vol, key = mounted_file(workload, flag_value(container(workload)["args"], flag))
        assert vol["secret"]["secretName"] == tls_secret["metadata"]["name"]
        assert key in tls_secret["stringData"]
        assert key in {i["path"] for i in vol["secret"].get("items", [{"path": key}])}
    # The router sees the CA only, never the executors' private key.
    (router_tls,) = [v for v in router["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert router_tls["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    for workload, flag in ((executor, "--model-id"), (router, "--tokenizer")):
        vol, _ = mounted_file(workload, flag_value(container(workload)["args"], flag))
        assert vol["persistentVolumeClaim"]["claimName"] == "tensorgate-models"

    # Both sides read the shared secret from the same Secret key, by environment.
    secret = find("Secret", "tensorgate-executor-secret")
    for c in (executor_c, router_c):
        (env,) = [e for e in c["env"] if e["name"] == "TENSORGATE_EXECUTOR_SECRET"]
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
        assert not any("secret" in a.lower() for a in c["args"])

    # One GPU per executor; the router asks for none.
    assert executor_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in router_c["resources"].get("limits", {})

    # The autoscaler scales the StatefulSet on a gauge the router really exports.
    hpa = find("HorizontalPodAutoscaler", "tensorgate-executor")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": executor["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    metrics_rs = (ROOT / "router" / "src" / "metrics.rs").read_text()
    assert f'pub const QUEUED: &str = "{metric["external"]["metric"]["name"]}";' in metrics_rs


# -- the executor's liveness probe, for real --------------------------------------------------

SERVICE_NAME = "tensorgate-executor.tensorgate.svc.cluster.local"


def make_certificates(directory: Path) -> None:
    """A CA and an executor certificate for the Service's names, by docs/scale-out.md's
    openssl commands."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "1", "-subj", "/CN=tensorgate executor CA",
            "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    openssl("req", *ec, "-subj", "/CN=tensorgate-executor", "-keyout", "tls.key", "-out", "e.csr")
    (directory / "e.ext").write_text(
        f"subjectAltName=DNS:{SERVICE_NAME},DNS:*.{SERVICE_NAME}\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl("x509", "-req", "-in", "e.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", "e.ext", "-out", "tls.crt")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_executor_liveness_probe_checks_a_real_executor(tmp_path):
    executor = find("StatefulSet", "tensorgate-executor")
    c = container(executor)
    (tls_mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
    probe = c["livenessProbe"]["exec"]["command"]
    assert probe[:2] == ["python", "-c"]
    make_certificates(tmp_path)
    port = free_port()

    def here(text: str) -> str:
        """The manifest's paths and port, moved to this test's."""
        return text.replace(tls_mount["mountPath"], str(tmp_path)).replace(":50051", f":{port}")

    # The manifest's own executor args, on the synthetic engine and loopback.
    args = [here(a) for a in c["args"]]
    args[args.index("--engine") + 1] = "synthetic"
    args[args.index("--listen") + 1] = f"127.0.0.1:{port}"
    for flag in ("--model-id", "--device"):
        i = args.index(flag)
        del args[i : i + 2]
    secret = "s3cret-" + os.urandom(8).hex()
    env = {**os.environ, "TENSORGATE_EXECUTOR_SECRET": secret}
    log = open(tmp_path / "executor.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorgate.executor", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )

    def run_probe(secret: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", here(probe[2])],
            capture_output=True,
            text=True,
            timeout=30,
            env={**env, "TENSORGATE_EXECUTOR_SECRET": secret},
        )

    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "executor.log").read_text()
            ok = run_probe(secret)
            if ok.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ok.returncode == 0, ok.stderr + (tmp_path / "executor.log").read_text()
        # The probe fails when the executor refuses it: a wrong secret is not healthy.
        wrong = run_probe("not-the-secret")
        assert wrong.returncode != 0
        assert "UNAUTHENTICATED" in wrong.stderr or "PERMISSION_DENIED" in wrong.stderr, (
            wrong.stderr
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
