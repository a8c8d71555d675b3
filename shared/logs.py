"""structlog set-up: JSON key-value events on stderr, one line per batch.

Frame content never goes into a log event: events carry ids, sizes and timings.  Secrets neither:
every string value passes :func:`shared.endpoints.redact`, so a password or token inside a URL (in an
error message, say) is masked whichever code logged it.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog once per process (``AIC_LOG_LEVEL``, ``AIC_LOG_FORMAT=json|console``)."""
    level = (level or os.environ.get("AIC_LOG_LEVEL", "info")).upper()
    if json is None:
        json = os.environ.get("AIC_LOG_FORMAT", "json") == "json"
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _redact_secrets(_logger, _method, event: dict) -> dict:
    from shared.endpoints import redact

    return {k: redact(v) if isinstance(v, str) and "@" in v else v for k, v in event.items()}


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(service=name)
