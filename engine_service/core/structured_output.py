"""Structured output in the engine core: each constrained request's grammar, compiled off the step
loop, and the matcher that masks every token its sequence draws.

The library is llguidance (docs/structured-output.md says why, with the measurements). Its token
vocabulary is built once from the checkpoint's own tokenizer.json, sized to the model's logits.

A request with a constraint is not scheduled until its grammar is compiled: `submit` hands the
compilation to a small thread pool (llguidance releases the GIL while it builds a grammar, so
the step loop keeps running beside it) and `poll`, called by every step, admits what has
compiled and refuses what failed (INVALID_ARGUMENT, with the library's message) or is still
compiling past `structured_output_compile_timeout_s` (DEADLINE_EXCEEDED). llguidance cannot be
interrupted, but it bounds its own work (`LIMITS`: lexer fuel, grammar size, Earley items per
step), so a thread that outlives its request's deadline still ends, and caches its result.

Compiled grammars are cached in an LRU keyed by (kind, text): a request for a cached one gets a
copy of its matcher at once (a copy costs microseconds and shares the lexer states the others
have built). A burst of requests for one new grammar compiles it once. Failures are cached too.

Each step, the rows that sample for a constrained sequence get their next-token bitmask filled
on the host (`fill_bitmask`, in parallel over rows), which the sampler applies to the logits
before anything else reads them (runner/token_bitmask.py); after the token is drawn the
sequence's matcher accepts it, and once the matcher can take nothing more the sequence ends
with FINISH_REASON_STOP.
"""

import contextlib
import json
import os
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llguidance
import structlog
import torch

from llmserve.engine_service.seam import EngineRequest, StructuredOutputSpec

log = structlog.get_logger(__name__)

# llguidance's defaults, with short errors: they go back to the caller, and the verbose ones
# carry the parser's state and the whole grammar.
LIMITS = llguidance.LLParserLimits(verbose_errors=False)
CACHE_SIZE = 256
COMPILE_THREADS = 2
# The most of a library message a refusal quotes.
MAX_MESSAGE_CHARS = 1000

FIELD = "sampling.structured_output"

Matcher = llguidance.LLMatcher


class StructuredOutputError(Exception):
    """A constraint the engine cannot serve; `status` is the gRPC status code's name."""

    def __init__(self, message: str, status: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.status = status


def _quoted(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


def grammar_of(spec: StructuredOutputSpec) -> str:
    """The llguidance grammar for a constraint; raises StructuredOutputError for a JSON schema
    that is not JSON (the library's own checks come when the matcher is built)."""
    kind, text = spec.kind, spec.spec
    if kind == "json_schema":
        assert isinstance(text, str)
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise StructuredOutputError(f"{FIELD}.json_schema: not valid JSON: {exc}") from exc
        if not isinstance(schema, dict | bool):
            raise StructuredOutputError(
                f"{FIELD}.json_schema: a schema is a JSON object (or true/false), not "
                f"{type(schema).__name__}")
        return Matcher.grammar_from_json_schema(text)
    if kind == "json_object":
        return Matcher.grammar_from_json_schema('{"type": "object"}')
    if kind == "regex":
        assert isinstance(text, str)
        return Matcher.grammar_from_regex(text)
    if kind == "grammar":
        assert isinstance(text, str)
        return Matcher.grammar_from_lark(text)
    if kind == "choice":
        # Lark string literals take JSON's escapes.
        return Matcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in text))
    raise StructuredOutputError(f"{FIELD}: unknown kind {kind!r}")


def field_of(spec: StructuredOutputSpec) -> str:
    return f"{FIELD}.{spec.kind}" + (".choices" if spec.kind == "choice" else "")


@dataclass
class _Job:
    request: EngineRequest
    future: "Future[Matcher]"
    deadline: float


class StructuredOutputs:
    """The core's structured-output side: compilation, the grammar cache and the step masks.

    Everything but the compilation runs on the core's thread. Threads start on first use.
    """

    def __init__(self, tokenizer_path: Path, vocab_size: int, eos_token_ids: tuple[int, ...],
                 timeout_s: float, pin_memory: bool = False) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.timeout_s = timeout_s
        self.pin_memory = pin_memory
        self.words = (vocab_size + 31) // 32
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_error: str | None = None
        self._lock = threading.Lock()  # the cache, the compilations in flight, the tokenizer
        self._cache: OrderedDict[tuple, Matcher | StructuredOutputError] = OrderedDict()
        self._compiling: dict[tuple, Future[Matcher]] = {}
        self._jobs: dict[str, _Job] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # --- compilation (worker threads) ---------------------------------------------------------

    def warm_up(self) -> None:
        """Builds the vocabulary in the background, so the first request need not wait for it."""
        self._threads().submit(self._vocabulary_or_error)

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar-compile")
        return self._pool

    def _vocabulary_or_error(self) -> None:
        with contextlib.suppress(StructuredOutputError):  # each request will say it
            self._vocabulary()

    def _vocabulary(self) -> llguidance.LLTokenizer:
        """The model's tokens for llguidance, from the checkpoint's tokenizer.json (once)."""
        with self._lock:
            if self._tokenizer is None and self._tokenizer_error is None:
                started = time.monotonic()
                try:
                    text = self.tokenizer_path.read_text()
                    self._tokenizer = llguidance.LLTokenizer(
                        text, n_vocab=self.vocab_size, eos_token=list(self.eos_token_ids) or None)
                    log.info("structured_output_vocabulary_built", tokens=self.vocab_size,
                             seconds=round(time.monotonic() - started, 3))
                except (OSError, ValueError) as exc:
                    self._tokenizer_error = (
                        f"{FIELD}: this engine cannot serve structured output: its tokenizer "
                        f"({self.tokenizer_path}) could not be read: {_quoted(str(exc))}")
                    log.warning("structured_output_unavailable", error=self._tokenizer_error)
            if self._tokenizer is None:
                raise StructuredOutputError(self._tokenizer_error or "")
            return self._tokenizer

    def _compile(self, key: tuple, spec: StructuredOutputSpec) -> Matcher:
        """Builds the matcher of a constraint in its start state, with its first mask computed
        (llguidance builds its lexer lazily), and caches it, or the error."""
        try:
            started = time.monotonic()
            matcher = Matcher(self._vocabulary(), grammar_of(spec), log_level=0, limits=LIMITS)
            if not matcher.is_error():
                scratch = torch.empty(self.words, dtype=torch.int32).numpy()
                matcher.unsafe_compute_mask_ptr(scratch.ctypes.data, scratch.nbytes)
            if matcher.is_error():
                raise StructuredOutputError(f"{field_of(spec)}: {_quoted(matcher.get_error())}")
            log.info("structured_output_compiled", kind=spec.kind,
                     seconds=round(time.monotonic() - started, 4))
            result: Matcher | StructuredOutputError = matcher
        except StructuredOutputError as exc:
            result = exc
        except Exception as exc:  # the library's own exceptions, for a bad specification
            result = StructuredOutputError(f"{field_of(spec)}: {_quoted(str(exc))}")
        with self._lock:
            self._compiling.pop(key, None)
            if not (isinstance(result, StructuredOutputError) and self._tokenizer is None):
                self._cache[key] = result
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        if isinstance(result, StructuredOutputError):
            raise result
        return result

    # --- the core's side ----------------------------------------------------------------------

    @property
    def num_compiling(self) -> int:
        return len(self._jobs)

    def has(self, request_id: str) -> bool:
        return request_id in self._jobs

    def submit(self, request: EngineRequest) -> None:
        """Starts compiling the request's constraint (a cached one is ready at the next
        `poll`)."""
        spec = request.sampling.structured_output
        assert spec is not None
        key = (spec.kind, spec.spec)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                future: Future[Matcher] = Future()
                if isinstance(cached, StructuredOutputError):
                    future.set_exception(cached)
                else:
                    future.set_result(cached)
            else:
                future = self._compiling.get(key)  # type: ignore[assignment]
                if future is None:
                    future = self._threads().submit(self._compile, key, spec)
                    self._compiling[key] = future
        self._jobs[request.request_id] = _Job(request, future,
                                              time.monotonic() + self.timeout_s)
        future.add_done_callback(self._wake)

    def _wake(self, _future: Future) -> None:
        with contextlib.suppress(OSError):  # the socket's buffer is full: the core is awake
            self._wake_w.send(b"\0")

    def fileno(self) -> int:
        """Readable when a compilation has ended (`multiprocessing.connection.wait` takes it)."""
        return self._wake_r.fileno()

    def seconds_to_deadline(self) -> float | None:
        """Until the earliest compilation's deadline, or None when nothing compiles."""
        if not self._jobs:
            return None
        return max(0.0, min(job.deadline for job in self._jobs.values()) - time.monotonic())

    def wait(self) -> None:
        """Blocks until a compilation ends or a deadline passes (when nothing else can run)."""
        timeout = self.seconds_to_deadline()
        if timeout is None:
            return
        self._wake_r.settimeout(timeout)
        try:
            self._wake_r.recv(1, socket.MSG_PEEK)
        except (TimeoutError, BlockingIOError):
            pass
        finally:
            self._wake_r.setblocking(False)

    def cancel(self, request_id: str) -> None:
        """Forgets a request that was aborted while compiling (its grammar still gets cached)."""
        self._jobs.pop(request_id, None)

    def poll(self) -> tuple[list[tuple[EngineRequest, Matcher]],
                            list[tuple[str, StructuredOutputError]]]:
        """The requests whose constraint is ready, each with its own matcher, and those refused
        (failed, timed out, or not resumable where a failover asked)."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        if not self._jobs:
            return [], []
        ready, refused = [], []
        now = time.monotonic()
        for request_id, job in list(self._jobs.items()):
            if job.future.done():
                del self._jobs[request_id]
                error = job.future.exception()
                if error is None:
                    try:
                        ready.append((job.request, self._start(job.request, job.future.result())))
                    except StructuredOutputError as exc:
                        refused.append((request_id, exc))
                else:
                    if not isinstance(error, StructuredOutputError):
                        error = StructuredOutputError(f"{FIELD}: {_quoted(str(error))}",
                                                      "INTERNAL")
                    refused.append((request_id, error))
            elif now >= job.deadline:
                del self._jobs[request_id]
                spec = job.request.sampling.structured_output
                assert spec is not None
                refused.append((request_id, StructuredOutputError(
                    f"{field_of(spec)}: still compiling after {self.timeout_s:g} s (the engine's "
                    "--structured-output-compile-timeout-s)", "DEADLINE_EXCEEDED")))
        return ready, refused

    @staticmethod
    def _start(request: EngineRequest, template: Matcher) -> Matcher:
        """The request's own matcher, past the output a failover resubmitted as prompt."""
        matcher = template.deep_copy()
        resumed = request.resumed_output_tokens
        if resumed and not matcher.consume_tokens(request.prompt_token_ids[-resumed:]):
            raise StructuredOutputError(
                f"resumed_output_tokens: the constraint does not allow the {resumed} output "
                f"tokens already streamed: {_quoted(matcher.get_error())}")
        return matcher

    def fill_bitmask(self, matchers: list[Matcher]) -> torch.Tensor:
        """Each matcher's next-token mask [len(matchers), ceil(vocab / 32)] int32, on the host
        (pinned on CUDA, so its copy to the device does not wait)."""
        bitmask = torch.empty((len(matchers), self.words), dtype=torch.int32,
                              pin_memory=self.pin_memory)
        array = bitmask.numpy()
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(array.ctypes.data, array.nbytes)
        else:
            if self._executor is None:
                # The step loop waits for the masks (the forward pass runs meanwhile on the
                # device): every core but one, the frontend's.
                self._executor = llguidance.LLExecutor(
                    num_threads=max(1, min(32, (os.cpu_count() or 2) - 1)))
            self._executor.unsafe_compute_mask_ptr(
                [(m, i) for i, m in enumerate(matchers)], array.ctypes.data, self.words * 4,
                len(matchers))
        return bitmask

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._wake_r.close()
        self._wake_w.close()


def accept(matcher: Matcher, token: int) -> StructuredOutputError | None:
    """The sequence drew `token`: None once its matcher has taken it; else why the request
    fails. The library may give up computing a mask when a constraint goes past its limits
    (lexer fuel, Earley items): the mask then allows only end-of-sequence, and the request ends
    with INVALID_ARGUMENT (another engine would give up too). A token the matcher refuses that
    its own mask allowed would be a bug (INTERNAL)."""
    if matcher.is_error():
        return StructuredOutputError(
            f"{FIELD}: the constraint went past the engine's limits while generating: "
            f"{_quoted(matcher.get_error())}")
    if not matcher.consume_token(token):
        return StructuredOutputError(
            f"{FIELD}: the drawn token {token} broke the constraint: "
            f"{_quoted(matcher.get_error())}", "INTERNAL")
    return None


def terminated(matcher: Matcher) -> bool:
    """The constraint is complete and can take no further token."""
    return matcher.is_stopped()
