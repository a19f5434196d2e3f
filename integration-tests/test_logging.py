"""`--json-output`: every line the server writes, from all three processes, is one JSON object
in the router's shape, so one log pipeline parses them all."""

from __future__ import annotations

import json
from pathlib import Path

import requests
from conftest import start_server, stop, wait_healthy


def test_json_output_covers_launcher_executor_and_router(tmp_path: Path, embedded_model_dir):
    log_path = tmp_path / "server.log"
    proc, url, _ = start_server(
        [
            "--engine",
            "synthetic",
            "--tokenizer-name",
            str(embedded_model_dir),
            "--iteration-ms",
            "1",
            "--json-output",
        ],
        log_path,
    )
    try:
        wait_healthy(proc, url, log_path, 120)
        r = requests.post(
            f"{url}/generate",
            json={"inputs": "hello", "parameters": {"max_new_tokens": 3}},
            timeout=30,
        )
        assert r.status_code == 200
        # A refused request logs nothing at info, but must not break the format either.
        assert requests.post(f"{url}/generate", json={"inputs": ""}, timeout=30).status_code == 422
    finally:
        assert stop(proc) == 0
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert lines, "the server logged nothing"
    targets = set()
    for line in lines:
        entry = json.loads(line)  # a non-JSON line fails here, with the line in the error
        assert {"timestamp", "level", "fields", "target"} <= entry.keys(), line
        assert isinstance(entry["fields"].get("message"), str), line
        targets.add(entry["target"])
    assert any(t.startswith("tensorgate_router") for t in targets), targets
    assert any(t.startswith("tensorgate.executor") for t in targets), targets
    assert any(t.startswith("tensorgate.launcher") for t in targets), targets
