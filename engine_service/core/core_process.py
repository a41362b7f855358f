"""The engine core's own process: it owns the model and the KV cache and runs the step loop.

The gRPC frontend talks to it over one pipe: commands in (add, abort a request or one sample,
stop), one `StepResult` out per step (the messages are `seam`'s). The loop never waits on the
frontend except when it has nothing to do.
"""

import os
from multiprocessing.connection import Connection, wait

import structlog
import torch

from llmserve.common.logs import configure_logging
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.block_pool import KvEvent
from llmserve.engine_service.core.engine_builder import build_engine
from llmserve.engine_service.core.engine_core import EngineCore
from llmserve.engine_service.runner.runner_builder import set_cpu_threads
from llmserve.engine_service.seam import (
    AddRequest,
    LoadSnapshot,
    RejectedRequest,
    StepResult,
)

log = structlog.get_logger(__name__)


def net_cache_changes(events: list[KvEvent]) -> tuple[list[int], list[int]]:
    """Collapses an ordered event list into hashes that entered and left the cache overall."""
    first: dict[int, bool] = {}
    last: dict[int, bool] = {}
    for event in events:
        first.setdefault(event.block_hash, event.stored)
        last[event.block_hash] = event.stored
    # A hash first stored was absent before; first removed, present before.
    stored = [h for h, now in last.items() if now and first[h]]
    removed = [h for h, now in last.items() if not now and not first[h]]
    return stored, removed


class CoreLoop:
    """Applies frontend commands and steps the core while it has work."""

    def __init__(self, core: EngineCore, conn: Connection) -> None:
        self.core = core
        self.conn = conn
        self.last_load: LoadSnapshot | None = None

    def run(self) -> None:
        self.last_load = self.core.load()
        self.conn.send(StepResult([], self.last_load, [], [], 0, 0))
        while self._apply_commands(block=not self.core.has_work):
            preemptions_before = self.core.scheduler.num_preemptions
            computed_before = self.core.num_computed_tokens_total
            proposed_before = self.core.num_spec_proposed_total
            accepted_before = self.core.num_spec_accepted_total
            drafts_before = self.core.num_spec_drafts_total
            outputs = self.core.step() if self.core.has_work or self.core.compiling else []
            if self.core.ended:  # requests whose last running sample was aborted
                outputs = self.core.take_ended() + outputs
            for rejected in self.core.take_rejected():
                self.conn.send(rejected)
            stored, removed = net_cache_changes(self.core.pool.take_events())
            load = self.core.load()
            if outputs or stored or removed or load != self.last_load:
                self.last_load = load
                self.conn.send(StepResult(
                    outputs, load, stored, removed,
                    self.core.scheduler.num_preemptions - preemptions_before,
                    self.core.num_computed_tokens_total - computed_before,
                    self.core.num_spec_proposed_total - proposed_before,
                    self.core.num_spec_accepted_total - accepted_before,
                    self.core.num_spec_drafts_total - drafts_before))

    def _apply_commands(self, block: bool) -> bool:
        """Drains the pipe (waiting for the first command if `block`); False on stop."""
        while block or self.conn.poll():
            if block and self.core.compiling:
                # Only compilations to wait for: wake for a command, a compilation's end or the
                # earliest compile deadline, whichever comes first.
                ready = wait([self.conn, self.core.structured],
                             self.core.structured.seconds_to_deadline())
                if self.conn not in ready:
                    return True
            block = False
            command = self.conn.recv()
            if command is None:
                return False
            if isinstance(command, AddRequest):
                try:
                    self.core.add_request(command.request)
                except ValueError as exc:
                    self.conn.send(RejectedRequest(command.request.request_id, str(exc)))
            else:
                self.core.abort_request(command.request_id, command.sample)
        return True


def core_process_main(config: EngineConfig, conn: Connection) -> None:
    """Entry point of the core process: build the engine, report its info, run the loop."""
    configure_logging(config.log_format, config.log_level)
    set_cpu_threads(config)
    log.info("core_process_started", pid=os.getpid(), torch_threads=torch.get_num_threads())
    try:
        core, info = build_engine(config)
    except Exception as exc:
        log.exception("engine_build_failed")
        conn.send(exc)
        return
    conn.send(info)
    core.structured.warm_up()
    try:
        CoreLoop(core, conn).run()
    except (EOFError, BrokenPipeError):
        log.info("frontend_gone")
    except Exception:
        # Logged as an event: multiprocessing would print the traceback as plain lines.
        log.exception("engine_core_failed")
        raise SystemExit(1) from None
    core.structured.close()
    core.runner.shutdown()
