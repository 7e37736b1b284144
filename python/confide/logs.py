"""Log setup shared by ``confide client`` and ``confide-server run``: text or JSON lines.

Both commands take ``--log-level``, ``--log-file`` and ``--log-format {text,json}``.
Text lines read ``<UTC time> <level> <logger> <message>``; JSON lines are one object per
line with ``ts``, ``level``, ``logger``, ``message`` and the record's structured fields
(``event``, ``round``, ``stage``, ``reason``, ``epsilon``, ...; passed as
``extra={"fields": {...}}``). Log calls never carry tokens, keys or update bytes: the
fields are ids, counts, stage names and reasons.

Examples
--------
>>> import io, json, logging
>>> buf = io.StringIO()
>>> handler = logging.StreamHandler(buf)
>>> handler.setFormatter(JsonFormatter())
>>> log = logging.getLogger("confide.doctest")
>>> log.addHandler(handler); log.setLevel(logging.INFO); log.propagate = False
>>> log.info("round 1 opened", extra={"fields": {"event": "round_opened", "round": 1}})
>>> doc = json.loads(buf.getvalue())
>>> (doc["event"], doc["round"], doc["message"])
('round_opened', 1, 'round 1 opened')
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from confide.errors import ConfigError

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "add_log_options", "setup_logging"]

#: What ``--log-level`` accepts.
LOG_LEVELS = ("debug", "info", "warning", "error")
#: What ``--log-format`` accepts.
LOG_FORMATS = ("text", "json")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def _utc(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class _TextFormatter(logging.Formatter):
    """``<UTC ISO time> <LEVEL> <logger> <message>``."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return _utc(self, record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message`` + fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Return ``record`` as one line of strict JSON."""
        doc: dict[str, Any] = {
            "ts": _utc(self, record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                if key not in doc:
                    doc[str(key)] = _plain(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, allow_nan=False, default=str)


def _plain(value: Any) -> Any:
    """Return a JSON-safe value (a non-finite float becomes ``None``; strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def setup_logging(
    level: str = "info",
    log_file: str | Path | None = None,
    log_format: str = "text",
    *,
    loggers: tuple[str, ...] = ("confide", "confide_server"),
    stderr: bool = True,
) -> None:
    """Route the named loggers to stderr and/or ``log_file`` at ``level``.

    Parameters
    ----------
    level : str
        One of :data:`LOG_LEVELS`.
    log_file : str or Path, optional
        Also append the lines to this file (created; its folder must exist).
    log_format : str
        ``"text"`` or ``"json"`` (one object per line).
    loggers : tuple of str
        The logger names configured (their children inherit).
    stderr : bool
        Also write to stderr (warnings and errors always are).

    Raises
    ------
    ConfigError
        An unknown level or format, or a log file that cannot be opened.
    """
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if log_format not in LOG_FORMATS:
        raise ConfigError(
            f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}"
        )
    formatter: logging.Formatter = (
        JsonFormatter() if log_format == "json" else _TextFormatter(_TEXT_FORMAT)
    )
    handlers: list[logging.Handler] = []
    if log_file is not None:
        try:
            handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"--log-file {log_file}: {exc.strerror or exc}; pass a writable file path"
            ) from None
    err = logging.StreamHandler()
    # Without a log file everything goes to stderr; with one, stderr keeps the warnings.
    err.setLevel(logging.NOTSET if stderr and log_file is None else logging.WARNING)
    handlers.append(err)
    for handler in handlers:
        handler.setFormatter(formatter)
    for name in loggers:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(level.upper())
        logger.propagate = False


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level``, ``--log-file`` and ``--log-format`` to a command's parser."""
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="least severe level logged"
    )
    parser.add_argument("--log-file", help="append log lines to this file")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text lines, or one JSON object per line (for log collectors)",
    )
