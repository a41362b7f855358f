"""Structured logging: one event per line, JSON in production, human-readable in a terminal."""

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


def configure_logging(log_format: LogFormat = "auto", level: str = "info") -> None:
    """Routes structlog (and stdlib logging) to stderr in the chosen format."""
    renderer: structlog.typing.Processor
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    if use_console:
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per line (print writes the newline separately): processes sharing the
        # stream (the engine's frontend, core and tensor-parallel ranks) never interleave lines.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(name)s %(message)s")
