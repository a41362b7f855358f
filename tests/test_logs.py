"""JSON logs: every line a server writes is one JSON object, tracebacks included, whatever
reported it (structlog, stdlib logging, warnings, an exception nobody caught)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Each way a server process reports an error, after configure_logging("json").
EMITTER = textwrap.dedent(
    """
    import asyncio, gc, logging, threading, warnings
    import structlog, uvloop
    from llmserve.common.logs import configure_logging

    configure_logging("json")
    structlog.get_logger("t").info("plain_event", n=1)
    try:
        raise ValueError("logged")
    except ValueError:
        structlog.get_logger("t").exception("caught_by_structlog")
    logging.getLogger("grpc.test").error("grpc says\\nthis", exc_info=KeyError("stdlib"))
    warnings.warn("careful")
    thread = threading.Thread(target=lambda: 1 / 0, name="crasher")
    thread.start()
    thread.join()

    class Finalized:
        def __del__(self):
            raise RuntimeError("in __del__")

    Finalized()

    async def failing():
        raise LookupError("in a task")

    async def main():
        asyncio.get_running_loop().create_task(failing())
        await asyncio.sleep(0.05)
        gc.collect()  # the task, never awaited, reports its exception when collected

    uvloop.run(main())  # the servers' event loop
    raise SystemError("nobody caught this")
    """
)


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


def test_every_error_report_is_one_json_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", EMITTER], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stdout == ""
    events = {e["event"]: e for e in json_lines(result.stderr)}
    assert events["plain_event"]["n"] == 1
    assert events["grpc says\nthis"]["logger"] == "grpc.test"
    assert events["uncaught_thread_exception"]["thread"] == "crasher"
    (warning,) = [e for e in events.values() if e.get("logger") == "py.warnings"]
    assert "UserWarning: careful" in warning["event"]
    (task,) = [name for name in events if name.startswith("Task exception was never retrieved")]
    exceptions = {name: e["exception"] for name, e in events.items() if "exception" in e}
    assert exceptions.pop("grpc says\nthis") == "KeyError: 'stdlib'"  # no traceback: not raised
    ends = {
        "caught_by_structlog": "ValueError: logged",
        "uncaught_thread_exception": "ZeroDivisionError: division by zero",
        "unraisable_exception": "RuntimeError: in __del__",
        task: "LookupError: in a task",
        "uncaught_exception": "SystemError: nobody caught this",
    }
    assert set(exceptions) == set(ends)
    for name, end in ends.items():
        assert exceptions[name].startswith("Traceback (most recent call last):")
        assert exceptions[name].endswith(end)


def test_engine_that_fails_to_start_logs_only_json(tmp_path: Path) -> None:
    """A checkpoint whose config lacks fields: the core's build error and the frontend's
    uncaught one (neither a start-up error the CLI expects) are JSON events with tracebacks."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    result = subprocess.run(
        [sys.executable, "-m", "llmserve.engine_service", "--model", str(model),
         "--port", "0", "--metrics-port", "-1", "--log-format", "json"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 1
    events = json_lines(result.stdout + result.stderr)
    failures = {e["event"]: e["exception"] for e in events if "exception" in e}
    assert set(failures) == {"engine_build_failed", "uncaught_exception"}
    for traceback in failures.values():
        assert traceback.startswith("Traceback (most recent call last):")
        assert traceback.endswith("KeyError: 'num_attention_heads'")
