"""Structured logging: one event per line, JSON in production, human-readable in a terminal.

Everything a process reports goes through the same renderer: structlog events, stdlib logging
(gRPC, asyncio's unhandled task errors, `warnings`), and exceptions nobody caught (main thread,
other threads, `__del__`). With JSON every line of a server's stderr is one JSON object, a
traceback included (as the event's `exception` string).
"""

import logging
import sys
import threading
from types import TracebackType
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]

log = structlog.get_logger("llmserve")


def configure_logging(log_format: LogFormat = "auto", level: str = "info") -> None:
    """Routes structlog, stdlib logging and uncaught exceptions to stderr in the chosen format."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    # The console renderer prints tracebacks itself (plain: locals may hold prompts); JSON needs
    # them as one string field.
    render: list[structlog.typing.Processor] = (
        [structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]
        if use_console
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    stamp: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *stamp, *render],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per line (print writes the newline separately): processes sharing the
        # stream (the engine's frontend, core and tensor-parallel ranks) never interleave lines.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)  # also one write per record
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_logger_name,
                *stamp,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    logging.basicConfig(handlers=[handler], level=level.upper(), force=True)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    log.critical("uncaught_exception", exc_info=(exc_type, exc, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # what the default hook ignores too
        return
    log.error(
        "uncaught_thread_exception",
        thread=args.thread.name if args.thread is not None else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _log_unraisable(args: "sys.UnraisableHookArgs") -> None:
    log.warning(
        "unraisable_exception",
        message=args.err_msg or "Exception ignored in",
        object=repr(args.object),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
