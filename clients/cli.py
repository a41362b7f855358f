"""`llmserve`: the command-line client. Streams completions to the terminal.

    llmserve generate "Once upon a time" --max-tokens 64
    llmserve generate "Hi!" --chat --json
    llmserve tokenize "Hello"
    llmserve info
    llmserve health

The target defaults to $LLMSERVE_TARGET, else localhost:50051; the bearer token to
$LLMSERVE_TOKEN. `--tls-ca ca.crt` (or `--tls` for the system's CAs) speaks TLS, with
`--tls-cert`/`--tls-key` as a client certificate. A failed call prints
`error: <CODE>: <details>` and exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from llmserve.clients._base import DEFAULT_TARGET
from llmserve.clients.chunk import Completion
from llmserve.clients.client import LLMClient
from llmserve.clients.request import PRIORITIES

T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI with `argv` (default: `sys.argv[1:]`); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        credentials = _channel_credentials(args)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        with LLMClient(args.target, channel_credentials=credentials, token=args.token) as client:
            return args.run(client, args)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Leaving the `with` block closed the channel, which cancelled the call.
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): point stdout at /dev/null so the interpreter's
        # final flush does not complain about it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _off_main_thread(produce: Callable[[], Iterable[T]]) -> Iterator[T]:
    """Yields the items of `produce()`, which a thread of its own calls and iterates: every gRPC
    call runs there, never in the main thread.

    Ctrl-C raises KeyboardInterrupt in the main thread at whatever line it is on. In gRPC's wait
    for a response that line can be just after `threading.Condition.wait` released its lock and
    before it takes it back; the call then dies with "RuntimeError: cannot release un-acquired
    lock" and a traceback instead of exiting 130. Here the main thread waits on a SimpleQueue
    (C code: nothing left half done). Items queue without bound if stdout stalls; a stream is
    bounded by its max_tokens.
    """
    items: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def pump() -> None:
        try:
            for item in produce():
                items.put((True, item))
        except BaseException as exc:  # raised again in the main thread
            items.put((False, exc))
        else:
            items.put((False, None))

    threading.Thread(target=pump, name="llmserve-call", daemon=True).start()
    while True:
        is_item, value = items.get()
        if not is_item:
            if value is not None:
                raise value
            return
        yield value


def _channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from the --tls* flags, or None for plaintext."""
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise OSError("--tls-cert and --tls-key go together")

    def read(path: Path | None) -> bytes | None:
        return None if path is None else path.read_bytes()

    # No CA file: gRPC verifies the server against the system's root CAs.
    return grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))


# `generate` options whose argparse names are also `LLMClient.generate` keywords.
_GENERATE_OPTIONS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "n",
    "stop",
    "ignore_eos",
    "logprobs",
    "prompt_logprobs",
    "speculative_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "truncate_prompt_tokens",
    "priority",
    "tenant",
    "request_id",
)


def _logit_bias(text: str) -> tuple[int, float]:
    """`ID=BIAS`, e.g. `50256=-100`."""
    token_id, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token_id), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ID=BIAS, e.g. 50256=-100, got {text!r}"
        ) from None


def _structured_output(args: argparse.Namespace) -> dict[str, Any]:
    """--json-schema FILE, --json-object, --regex, --grammar FILE, --choice (repeatable)."""
    given: dict[str, Any] = {}
    if args.json_schema is not None:
        given["json_schema"] = args.json_schema.read_text()
    if args.json_object:
        given["json_object"] = True
    if args.regex is not None:
        given["regex"] = args.regex
    if args.grammar is not None:
        given["grammar"] = args.grammar.read_text()
    if args.choice:
        given["choice"] = args.choice
    return given


def _prompt_or_messages(args: argparse.Namespace) -> dict[str, Any]:
    if args.chat:
        return {"messages": [{"role": "user", "content": args.prompt}]}
    return {"prompt": args.prompt}


def _generate(client: LLMClient, args: argparse.Namespace) -> int:
    last = None
    params = {name: getattr(args, name) for name in _GENERATE_OPTIONS}
    params["logit_bias"] = dict(args.logit_bias or [])
    params.update(_structured_output(args))
    chunks = _off_main_thread(
        lambda: client.generate(timeout=args.timeout, **_prompt_or_messages(args), **params)
    )
    if args.json:
        for chunk in chunks:
            print(json.dumps(dataclasses.asdict(chunk)), flush=True)
            last = chunk
    elif (args.n or 1) > 1:
        # The samples' chunks arrive interleaved: each sample is printed whole, labelled.
        collected = list(chunks)
        for sample in Completion.from_chunks(collected).samples:
            print(f"--- sample {sample.index} ({sample.finish_reason}) ---\n{sample.text}")
        last = collected[-1] if collected else None
    else:
        for chunk in chunks:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last = chunk
        print()
    if args.show_usage and last is not None and last.usage is not None:
        u = last.usage
        print(
            f"finish_reason={last.finish_reason} prompt_tokens={u.prompt_tokens} "
            f"completion_tokens={u.completion_tokens} "
            f"cached_prompt_tokens={u.cached_prompt_tokens}"
            + (f" speculative_proposed_tokens={u.speculative_proposed_tokens} "
               f"speculative_accepted_tokens={u.speculative_accepted_tokens}"
               if u.speculative_proposed_tokens else ""),
            file=sys.stderr,
        )
    return 0


def _tokenize(client: LLMClient, args: argparse.Namespace) -> int:
    (token_ids,) = _off_main_thread(
        lambda: [client.tokenize(**_prompt_or_messages(args), timeout=args.timeout)]
    )
    print(json.dumps(token_ids))
    return 0


def _info(client: LLMClient, args: argparse.Namespace) -> int:
    (info,) = _off_main_thread(lambda: [client.model_info(timeout=args.timeout)])
    print(json.dumps(info, indent=2))
    return 0


def _health(client: LLMClient, args: argparse.Namespace) -> int:
    (status,) = _off_main_thread(lambda: [client.health(args.service, timeout=args.timeout)])
    print(status)
    return 0 if status == "SERVING" else 1


def _parser() -> argparse.ArgumentParser:
    # Built per call so the environment defaults are read when main() runs, not at import.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("LLMSERVE_TARGET", DEFAULT_TARGET),
        help="router address (default: $LLMSERVE_TARGET or %(default)s)",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("LLMSERVE_TOKEN"),
        help="bearer token (default: $LLMSERVE_TOKEN)",
    )
    common.add_argument("--timeout", type=float, help="deadline in seconds")
    common.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs")
    common.add_argument("--tls-ca", type=Path, help="use TLS, trusting this CA (PEM)")
    common.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS")
    common.add_argument("--tls-key", type=Path, help="private key of --tls-cert")

    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="stream a completion")
    gen.set_defaults(run=_generate)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send PROMPT as one user message")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float, help="0 = greedy")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--n", type=int, metavar="N",
                     help="N samples of the prompt, each printed once complete, labelled")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--include-stop-str-in-output", action="store_true",
                     help="end the text with the stop string that ended it")
    # Unset unless given, so the server's default (skip them) applies.
    gen.add_argument("--keep-special-tokens", dest="skip_special_tokens",
                     action="store_false", default=None,
                     help="show special tokens (end-of-sequence, chat markers) in the text")
    gen.add_argument("--truncate-prompt-tokens", type=int, metavar="N",
                     help="keep only the prompt's last N tokens (a longer prompt is not refused)")
    gen.add_argument("--logprobs", type=int, help="alternatives per token (shown with --json)")
    gen.add_argument("--prompt-logprobs", type=int, metavar="K",
                     help="each prompt token's log-probability and K alternatives, on the first "
                          "chunk (shown with --json)")
    gen.add_argument("--speculative-tokens", type=int, metavar="N",
                     help="draft tokens per step an engine running speculative decoding may "
                          "propose for this request, 0-16 (0 = none; default: the engine's); "
                          "the output is the same either way")
    gen.add_argument("--presence-penalty", type=float, default=0.0,
                     help="in [-2, 2]: minus this once for each token the output holds")
    gen.add_argument("--frequency-penalty", type=float, default=0.0,
                     help="in [-2, 2]: minus this per time the output holds a token")
    gen.add_argument("--repetition-penalty", type=float,
                     help="in (0, 2]: scales down tokens of the prompt and output (1 = off)")
    gen.add_argument("--logit-bias", type=_logit_bias, action="append", metavar="ID=BIAS",
                     help="add BIAS in [-100, 100] to token ID's logit (repeatable; the last "
                     "one for an ID wins)")
    gen.add_argument("--min-tokens", type=int, default=0,
                     help="no end-of-sequence or stop before this many tokens")
    structured = gen.add_argument_group(
        "structured output", "constrain the output (at most one; docs/structured-output.md)")
    only_one = structured.add_mutually_exclusive_group()
    only_one.add_argument("--json-schema", type=Path, metavar="FILE",
                          help="one JSON value valid under the JSON schema in FILE")
    only_one.add_argument("--json-object", action="store_true", help="any one JSON object")
    only_one.add_argument("--regex", help="text that fully matches this regular expression")
    only_one.add_argument("--grammar", type=Path, metavar="FILE",
                          help="a sentence of the Lark grammar in FILE (start rule `start`)")
    only_one.add_argument("--choice", action="append", metavar="TEXT",
                          help="exactly one of these strings (repeatable)")
    gen.add_argument("--priority", choices=list(PRIORITIES), default="standard")
    gen.add_argument("--tenant", default="")
    gen.add_argument("--request-id", default="")
    gen.add_argument("--json", action="store_true", help="print each chunk as a JSON line")
    gen.add_argument(
        "--show-usage", action="store_true",
        help="print finish reason and usage to stderr (with the speculative decoding counts when "
             "the engine speculated)"
    )

    tok = sub.add_parser("tokenize", parents=[common], help="print a prompt's token ids")
    tok.set_defaults(run=_tokenize)
    tok.add_argument("prompt")
    tok.add_argument("--chat", action="store_true", help="tokenize PROMPT as one user message")

    info = sub.add_parser("info", parents=[common], help="describe the served model")
    info.set_defaults(run=_info)

    health = sub.add_parser("health", parents=[common], help="exit 0 only if SERVING")
    health.set_defaults(run=_health)
    health.add_argument("--service", default="", help="service name to check (default: server)")
    return parser
