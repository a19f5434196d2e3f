"""Logging of the launcher and the executor: text lines, or with `--json-output` one JSON object
per line in the router's shape (tracing-subscriber's JSON: timestamp, level, fields.message,
target), so one log pipeline parses all three processes."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Libraries' loggers that bring their own stderr handler (their own line format, outside
# --json-output) and narrate at INFO (transformers' continuous batching: its cache set-up, and
# its thread stopping on every shutdown): ours format them, warnings and errors only.
QUIET_LIBRARY_LOGGERS = ("ContinuousBatchingLogger",)

# tracing's level names
_LEVELS = {"WARNING": "WARN", "CRITICAL": "ERROR"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, str] = {"message": record.getMessage()}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        stamp = datetime.fromtimestamp(record.created, UTC)
        entry = {
            "timestamp": stamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": _LEVELS.get(record.levelname, record.levelname),
            "fields": fields,
            "target": record.name,
        }
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(json_output: bool = False, level: int = logging.INFO) -> None:
    """Replaces the root logger's handlers with one on stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_output else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LIBRARY_LOGGERS:
        # Set up before the library is imported: it then keeps ours rather than adding its own.
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.WARNING)
    # Library warnings become records too, so they come out in the same format.
    logging.captureWarnings(True)
