"""Structured output in the engine core: each constrained request's grammar, compiled off the step
loop, and the matcher that masks every token its sequence draws.

Two libraries can do the work, each behind the same small interface (a backend: compile a
constraint into a `Matcher`, fill bitmask rows for a batch of its matchers): llguidance
(core/grammar_llguidance.py) and xgrammar (core/grammar_xgrammar.py). `--structured-output-backend`
picks one per engine; `auto`, the default, lets llguidance check every constraint (so refusals
and their messages do not depend on the backend) and serves the masks with xgrammar wherever
xgrammar enforces the whole constraint, which fills masks several times faster; `grammar` (Lark)
is always llguidance's (docs/structured-output.md says why, with the measurements). Each
backend's token vocabulary is built once from the checkpoint's own tokenizer.json, sized to the
model's logits.

A request with a constraint is not scheduled until its grammar is compiled: `submit` hands the
compilation to a small thread pool (both libraries release the GIL while they build a grammar,
so the step loop keeps running beside it) and `poll`, called by every step, admits what has
compiled and refuses what failed (INVALID_ARGUMENT, with the library's message) or is still
compiling past `structured_output_compile_timeout_s` (DEADLINE_EXCEEDED). Neither library can be
interrupted; llguidance bounds its own work (lexer fuel, grammar size, Earley items per step),
and xgrammar is given only constraints it compiles in bounded time (a nesting limit), so a
thread that outlives its request's deadline still ends, and caches its result.

Compiled grammars are cached in an LRU keyed by (kind, text): a request for a cached one gets a
copy of its matcher at once. A burst of requests for one new grammar compiles it once. Failures
are cached too.

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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
import torch

from llmserve.engine_service.core import grammar_llguidance
from llmserve.engine_service.seam import EngineRequest, StructuredOutputSpec

log = structlog.get_logger(__name__)

BACKENDS = ("auto", "llguidance", "xgrammar")
CACHE_SIZE = 256
COMPILE_THREADS = 2
# Threads that fill a step's masks, in either library: the step loop waits for them (the forward
# pass runs meanwhile on the device), so every core but one, the frontend's.
MASK_THREADS = max(1, min(32, (os.cpu_count() or 2) - 1))
# The most of a library message a refusal quotes.
MAX_MESSAGE_CHARS = 1000

FIELD = "sampling.structured_output"


class Matcher(Protocol):
    """A constraint's state for one sequence (llguidance's `LLMatcher` is one as it is; the
    xgrammar backend wraps its own)."""

    def deep_copy(self) -> "Matcher": ...
    def consume_token(self, token: int) -> bool: ...
    def consume_tokens(self, tokens: list[int]) -> bool: ...
    def rollback(self, num_tokens: int) -> object: ...
    def validate_tokens(self, tokens: list[int]) -> int: ...
    def is_stopped(self) -> bool: ...
    def is_error(self) -> bool: ...
    def get_error(self) -> str: ...


class Backend(Protocol):
    """A library's side: its vocabulary of the model (built by the constructor), compilation
    (`schema`: a JSON schema's, parsed; raises ValueError or the library's own exceptions, with
    a message fit to quote) and the
    masks of a batch of its matchers, into the given rows of a host int32 bitmask (bit `t % 32`
    of word `t // 32`: 1 = allowed)."""

    name: str

    def compile(self, kind: str, text: str | tuple[str, ...], schema: object) -> Matcher: ...
    def owns(self, matcher: object) -> bool: ...
    def fill(self, matchers: Sequence, bitmask: torch.Tensor, rows: Sequence[int]) -> None: ...


class StructuredOutputError(Exception):
    """A constraint the engine cannot serve; `status` is the gRPC status code's name."""

    def __init__(self, message: str, status: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.status = status


def _quoted(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


def validate(spec: StructuredOutputSpec) -> object:
    """The checks every backend's compilation starts with: a JSON schema must be a JSON object
    (or true/false), returned parsed (None for the other kinds); raises StructuredOutputError
    (the libraries' own checks come when they compile)."""
    kind, text = spec.kind, spec.spec
    if kind not in ("json_schema", "json_object", "regex", "grammar", "choice"):
        raise StructuredOutputError(f"{FIELD}: unknown kind {kind!r}")
    if kind != "json_schema":
        return None
    assert isinstance(text, str)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise StructuredOutputError(f"{FIELD}.json_schema: not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise StructuredOutputError(f"{FIELD}.json_schema: nests too deep to read") from exc
    if not isinstance(schema, dict | bool):
        raise StructuredOutputError(
            f"{FIELD}.json_schema: a schema is a JSON object (or true/false), not "
            f"{type(schema).__name__}")
    return schema


def field_of(spec: StructuredOutputSpec) -> str:
    return f"{FIELD}.{spec.kind}" + (".choices" if spec.kind == "choice" else "")


def _llguidance(tokenizer_path: Path, vocab_size: int, eos: tuple[int, ...]) -> Backend:
    return grammar_llguidance.LLGuidanceBackend(tokenizer_path, vocab_size, eos, MASK_THREADS)


def _xgrammar(tokenizer_path: Path, vocab_size: int, eos: tuple[int, ...]) -> Backend:
    # Imported on first use: xgrammar loads torch's and transformers' Python side (seconds).
    from llmserve.engine_service.core import grammar_xgrammar

    return grammar_xgrammar.XGrammarBackend(tokenizer_path, vocab_size, eos, MASK_THREADS)


BUILDERS: dict[str, Callable[[Path, int, tuple[int, ...]], Backend]] = {
    "llguidance": _llguidance, "xgrammar": _xgrammar}


@dataclass
class _Job:
    request: EngineRequest
    future: "Future[Matcher]"
    deadline: float


class StructuredOutputs:
    """The core's structured-output side: compilation, the grammar cache and the step masks.

    Everything but the compilation runs on the core's thread. Threads start on first use.
    `backend` is one of BACKENDS (the engine's --structured-output-backend).
    """

    def __init__(self, tokenizer_path: Path, vocab_size: int, eos_token_ids: tuple[int, ...],
                 timeout_s: float, pin_memory: bool = False, backend: str = "auto") -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.timeout_s = timeout_s
        self.pin_memory = pin_memory
        self.backend = backend
        self.words = (vocab_size + 31) // 32
        self._lock = threading.Lock()  # the cache, the compilations in flight, the backends
        self._backends: dict[str, Backend | StructuredOutputError] = {}
        self._building: dict[str, threading.Lock] = {name: threading.Lock() for name in BUILDERS}
        self._cache: OrderedDict[tuple, Matcher | StructuredOutputError] = OrderedDict()
        self._compiling: dict[tuple, Future[Matcher]] = {}
        self._jobs: dict[str, _Job] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"structured output backend {backend!r}: one of {BACKENDS}")
        self._backend = backend

    # --- compilation (worker threads) ---------------------------------------------------------

    def warm_up(self) -> None:
        """Builds the vocabularies in the background, so the first request need not wait."""
        for name in self._libraries():
            self._threads().submit(self._library_or_error, name)

    def _libraries(self) -> tuple[str, ...]:
        return {"auto": ("llguidance", "xgrammar"), "llguidance": ("llguidance",),
                "xgrammar": ("xgrammar",)}[self.backend]

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar-compile")
        return self._pool

    def _library_or_error(self, name: str) -> None:
        with contextlib.suppress(StructuredOutputError):  # each request will say it
            self._library(name)

    def _library(self, name: str) -> Backend:
        """A library's backend with its vocabulary of the model (built once; a failure is
        kept and raised to every request that needs it)."""
        with self._building[name]:  # one build per library; the others' go on beside it
            built = self._backends.get(name)
            if built is None:
                started = time.monotonic()
                try:
                    built = BUILDERS[name](self.tokenizer_path, self.vocab_size,
                                           self.eos_token_ids)
                    log.info("structured_output_vocabulary_built", backend=name,
                             tokens=self.vocab_size, seconds=round(time.monotonic() - started, 3))
                except Exception as exc:  # unreadable, or a tokenizer the library cannot take
                    built = StructuredOutputError(
                        f"{FIELD}: this engine cannot serve structured output: its tokenizer "
                        f"({self.tokenizer_path}) could not be read by {name}: "
                        f"{_quoted(str(exc))}")
                    log.warning("structured_output_unavailable", backend=name, error=str(built))
                with self._lock:
                    self._backends[name] = built
        if isinstance(built, StructuredOutputError):
            raise built
        return built

    def _build(self, spec: StructuredOutputSpec) -> Matcher:
        """The constraint's matcher in its start state, from the backend the engine's setting
        picks for it; raises StructuredOutputError."""
        schema = validate(spec)
        kind, text = spec.kind, spec.spec
        choice = "llguidance" if kind == "grammar" else self.backend
        try:
            if choice != "auto":
                return self._library(choice).compile(kind, text, schema)
            # auto: llguidance checks (and is the fallback); xgrammar serves what it can.
            checked = self._library("llguidance").compile(kind, text, schema)
        except StructuredOutputError:
            raise
        except Exception as exc:  # the library's own exceptions, for a bad specification
            raise StructuredOutputError(f"{field_of(spec)}: {_quoted(str(exc))}") from exc
        try:
            return self._library("xgrammar").compile(kind, text, schema)
        except Exception as exc:
            log.info("structured_output_on_llguidance", kind=kind, reason=_quoted(str(exc))[:200])
            return checked

    def _compile(self, key: tuple, spec: StructuredOutputSpec) -> Matcher:
        """Builds the matcher of a constraint and caches it, or the error."""
        try:
            started = time.monotonic()
            matcher = self._build(spec)
            log.info("structured_output_compiled", kind=spec.kind,
                     backend=type(matcher).__name__, seconds=round(time.monotonic() - started, 4))
            result: Matcher | StructuredOutputError = matcher
        except StructuredOutputError as exc:
            result = exc
        except Exception as exc:  # a bug: the request gets INTERNAL, the next one tries again
            result = StructuredOutputError(f"{FIELD}: {_quoted(str(exc))}", "INTERNAL")
        with self._lock:
            self._compiling.pop(key, None)
            # No entry for an engine that cannot read its tokenizer (the error is the same for
            # every constraint, and says so itself) nor for a bug (the next request retries).
            if not isinstance(result, StructuredOutputError) or not (
                    result.status == "INTERNAL"
                    or any(result is built for built in self._backends.values())):
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
        with self._lock:
            libraries = [b for b in self._backends.values() if not isinstance(b, Exception)]
        if len(libraries) == 1:
            libraries[0].fill(matchers, bitmask, range(len(matchers)))
            return bitmask
        for library in libraries:  # under auto a batch may hold matchers of both
            rows = [i for i, m in enumerate(matchers) if library.owns(m)]
            if rows:
                library.fill([matchers[i] for i in rows], bitmask, rows)
        return bitmask

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._wake_r.close()
        self._wake_w.close()


def accept(matcher: Matcher, token: int) -> StructuredOutputError | None:
    """The sequence drew `token`: None once its matcher has taken it; else why the request
    fails. llguidance may give up computing a mask when a constraint goes past its limits
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
