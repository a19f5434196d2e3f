"""The launcher's and executor's log format: text by default, the router's JSON shape on demand."""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from tensorgate.log_setup import JsonFormatter, setup_logging


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_have_the_routers_fields(restore_root, capsys):
    setup_logging(json_output=True)
    logging.getLogger("tensorgate.executor").warning('queue is %d deep: "full"', 7)
    line = capsys.readouterr().err.strip()
    entry = json.loads(line)
    assert entry["level"] == "WARN"  # tracing's name
    assert entry["target"] == "tensorgate.executor"
    assert entry["fields"] == {"message": 'queue is 7 deep: "full"'}
    assert entry["timestamp"].endswith("Z")


def test_exceptions_stay_on_one_line(restore_root, capsys):
    setup_logging(json_output=True)
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logging.getLogger("t").exception("failed")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR"
    assert "ValueError: bad\nvalue" in entry["fields"]["exception"]


def test_library_warnings_are_records(restore_root, capsys):
    setup_logging(json_output=True)
    warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    entry = json.loads(capsys.readouterr().err.strip())
    assert entry["target"] == "py.warnings"
    assert "deprecated thing" in entry["fields"]["message"]


def test_text_by_default(restore_root, capsys):
    setup_logging()
    logging.getLogger("tensorgate.launcher").info("hello")
    err = capsys.readouterr().err
    assert "INFO tensorgate.launcher: hello" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err)


def test_formatter_keeps_non_ascii():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "modèle %s", ("prêt",), None)
    assert json.loads(JsonFormatter().format(record))["fields"]["message"] == "modèle prêt"


def test_transformers_continuous_batching_logs_through_ours_warnings_only(restore_root, capsys):
    """transformers' CB logger brings its own stderr handler and line format and narrates at
    INFO (on every start and stop); ours formats it, warnings and up."""
    cb = logging.getLogger("ContinuousBatchingLogger")
    saved = cb.handlers[:], cb.propagate, cb.level
    try:
        setup_logging(json_output=True)
        import transformers.generation.continuous_batching  # noqa: F401  (adds its handler)

        cb.info("Background generation thread stopped")
        cb.warning("the cache is full")
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        entry = json.loads(lines[0])
        assert entry["target"] == "ContinuousBatchingLogger"
        assert entry["fields"]["message"] == "the cache is full"
    finally:
        cb.handlers[:], cb.propagate = saved[0], saved[1]
        cb.setLevel(saved[2])
