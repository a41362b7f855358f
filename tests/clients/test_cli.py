"""The `llmserve` CLI: in-process through `main()`, and as the installed console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from llmserve.clients.cli import main
from llmserve.v1 import common_pb2, generate_service_pb2

# The console script sits beside the interpreter running the tests (the venv's bin/).
LLMSERVE = Path(sys.executable).parent / "llmserve"


def test_generate_streams_text_and_sends_the_options(router, capsys) -> None:
    argv = ["generate", "Once", "--target", router.target, "--max-tokens", "5"]
    argv += ["--temperature", "0", "--top-p", "0.5", "--top-k", "3", "--min-p", "0.25"]
    argv += ["--seed", "9", "--stop", "a", "--stop", "b", "--ignore-eos", "--priority", "batch"]
    argv += ["--tenant", "t1", "--request-id", "rq", "--timeout", "5", "--token", "tok"]
    assert main(argv) == 0
    assert capsys.readouterr() == ("Hello, world!\n", "")
    seen = router.seen[-1]
    request = seen.request
    assert request.prompt == "Once"
    assert request.stopping.max_tokens == 5 and request.stopping.ignore_eos
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0
    assert (request.sampling.top_p, request.sampling.top_k, request.sampling.min_p) == (
        0.5,
        3,
        0.25,
    )
    assert request.sampling.seed == 9 and not request.sampling.HasField("logprobs")
    assert not request.sampling.HasField("prompt_logprobs")
    assert list(request.stop) == ["a", "b"]
    assert request.priority == common_pb2.PRIORITY_BATCH
    assert (request.tenant, request.request_id) == ("t1", "rq")
    assert seen.metadata["authorization"] == "Bearer tok"
    assert seen.time_remaining is not None and seen.time_remaining < 5.1


def test_generate_sends_penalties_logit_bias_and_min_tokens(router, capsys) -> None:
    argv = ["generate", "Once", "--target", router.target, "--presence-penalty", "0.5"]
    argv += ["--frequency-penalty", "-1.5", "--repetition-penalty", "1.25", "--min-tokens", "3"]
    argv += ["--logit-bias", "50=-100", "--logit-bias", "7=2.5"]
    assert main(argv) == 0
    request = router.seen[-1].request
    sampling = request.sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.5)
    assert sampling.repetition_penalty == 1.25
    assert [(b.token_id, b.bias) for b in sampling.logit_bias] == [(50, -100.0), (7, 2.5)]
    assert request.stopping.min_tokens == 3
    # Left out, repetition_penalty stays unset (the server's default, 1 = off).
    assert main(["generate", "Once", "--target", router.target]) == 0
    assert not router.seen[-1].request.sampling.HasField("repetition_penalty")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", "Once", "--logit-bias", "50"])
    assert "expected ID=BIAS" in capsys.readouterr().err


def test_generate_sends_text_and_truncation_options(router, capsys) -> None:
    argv = ["generate", "Once", "--target", router.target]
    assert main([*argv, "--include-stop-str-in-output", "--keep-special-tokens",
                 "--truncate-prompt-tokens", "12"]) == 0
    request = router.seen[-1].request
    assert request.include_stop_str_in_output
    assert request.HasField("skip_special_tokens") and not request.skip_special_tokens
    assert request.truncate_prompt_tokens == 12
    # Left out, both optional fields stay unset (the server's defaults).
    assert main(argv) == 0
    request = router.seen[-1].request
    assert not request.include_stop_str_in_output
    assert not request.HasField("skip_special_tokens")
    assert not request.HasField("truncate_prompt_tokens")
    capsys.readouterr()


def test_generate_chat_json_and_usage(router, capsys) -> None:
    argv = ["generate", "Hi there", "--target", router.target, "--chat", "--json"]
    assert main([*argv, "--show-usage", "--logprobs", "2", "--prompt-logprobs", "0"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["text"] for line in lines] == ["Hello", ", world", "!"]
    assert lines[0]["logprobs"][0]["top"][1] == [13048, -1.25, "Hi"]
    assert lines[-1]["finish_reason"] == "stop"
    assert lines[-1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "cached_prompt_tokens": 2,
        "speculative_proposed_tokens": 0,
        "speculative_accepted_tokens": 0,
    }
    assert err == "finish_reason=stop prompt_tokens=3 completion_tokens=4 cached_prompt_tokens=2\n"
    request = router.seen[-1].request
    assert [(m.role, m.content) for m in request.messages] == [("user", "Hi there")]
    assert request.prompt == "" and request.sampling.logprobs == 2
    assert request.sampling.HasField("prompt_logprobs") and request.sampling.prompt_logprobs == 0


def test_generate_sends_speculative_tokens_and_shows_the_speculative_counts(
    router, capsys
) -> None:
    router.responses = [generate_service_pb2.GenerateResponse(
        text="Hi", token_ids=[1, 2], finish_reason=common_pb2.FINISH_REASON_LENGTH,
        usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2,
                               speculative_proposed_tokens=6, speculative_accepted_tokens=4))]
    argv = ["generate", "Once", "--target", router.target]
    assert main([*argv, "--speculative-tokens", "0", "--show-usage"]) == 0
    out, err = capsys.readouterr()
    assert out == "Hi\n"
    assert err == ("finish_reason=length prompt_tokens=3 completion_tokens=2 "
                   "cached_prompt_tokens=0 speculative_proposed_tokens=6 "
                   "speculative_accepted_tokens=4\n")
    sampling = router.seen[-1].request.sampling
    assert sampling.HasField("speculative_tokens") and sampling.speculative_tokens == 0
    assert main([*argv, "--speculative-tokens", "16"]) == 0
    assert router.seen[-1].request.sampling.speculative_tokens == 16
    # Left out, the field stays unset (the engine's default).
    assert main(argv) == 0
    assert not router.seen[-1].request.sampling.HasField("speculative_tokens")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, "--speculative-tokens", "four"])
    assert "--speculative-tokens" in capsys.readouterr().err


def test_generate_prints_each_of_n_samples_whole_and_labelled(router, capsys) -> None:
    pb = generate_service_pb2
    router.responses = [
        pb.GenerateResponse(text="Hel", token_ids=[1]),
        pb.GenerateResponse(text="Bye", token_ids=[2], index=1),
        pb.GenerateResponse(text="lo", token_ids=[3], finish_reason=common_pb2.FINISH_REASON_STOP),
        pb.GenerateResponse(text="!", token_ids=[4], index=1,
                            finish_reason=common_pb2.FINISH_REASON_LENGTH,
                            usage=common_pb2.Usage(prompt_tokens=2, completion_tokens=4)),
    ]
    assert main(["generate", "Hi", "--target", router.target, "--n", "2", "--show-usage"]) == 0
    out, err = capsys.readouterr()
    assert out == "--- sample 0 (stop) ---\nHello\n--- sample 1 (length) ---\nBye!\n"
    assert "completion_tokens=4" in err
    assert router.seen[-1].request.sampling.n == 2


def test_target_and_token_from_the_environment(router, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LLMSERVE_TARGET", router.target)
    monkeypatch.setenv("LLMSERVE_TOKEN", "from-env")
    assert main(["generate", "x"]) == 0
    assert capsys.readouterr().out == "Hello, world!\n"
    assert router.seen[-1].metadata["authorization"] == "Bearer from-env"


def test_tokenize_info_and_health(router, capsys) -> None:
    target = ["--target", router.target]
    assert main(["tokenize", "hi", *target]) == 0
    assert json.loads(capsys.readouterr().out) == [104, 105]
    assert main(["tokenize", "yo", "--chat", *target]) == 0
    assert json.loads(capsys.readouterr().out) == [ord(c) for c in "<user>yo"]
    assert main(["info", *target]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "tiny-qwen3"
    assert main(["health", *target]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert main(["health", "--service", "llmserve.v1.GenerateService", *target]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"


def test_rpc_error_prints_code_and_details_and_exits_1(router, capsys) -> None:
    router.error = (grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1], got 2")
    assert main(["generate", "x", "--target", router.target, "--top-p", "2"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: INVALID_ARGUMENT: top_p must be in (0, 1], got 2\n"


def test_ctrl_c_exits_130_quietly_and_cancels_the_call(router, capsys, monkeypatch) -> None:
    router.endless = True

    class InterruptingStdout:
        def write(self, text: str) -> int:
            raise KeyboardInterrupt

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", InterruptingStdout())
    assert main(["generate", "x", "--target", router.target]) == 130
    assert capsys.readouterr().err == ""
    assert router.stream_ended.wait(2)


def test_console_script_streams_and_reports_errors(router) -> None:
    assert LLMSERVE.exists(), f"{LLMSERVE} missing: run `pip install -e .` to install it"
    env = {**os.environ, "LLMSERVE_TARGET": router.target}
    ok = subprocess.run(
        [LLMSERVE, "generate", "hi"], capture_output=True, text=True, env=env, timeout=30
    )
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "Hello, world!\n", "")
    router.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "shed")
    bad = subprocess.run(
        [LLMSERVE, "generate", "hi"], capture_output=True, text=True, env=env, timeout=30
    )
    assert (bad.returncode, bad.stdout, bad.stderr) == (1, "", "error: RESOURCE_EXHAUSTED: shed\n")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery is POSIX")
def test_console_script_sigint_exits_130(router) -> None:
    router.endless = True
    with subprocess.Popen(
        [LLMSERVE, "generate", "hi", "--target", router.target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stdout.read(3) == b"xxx"  # streaming has begun
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert (proc.returncode, err) == (130, b"")
    assert router.stream_ended.wait(2)


# Runs the CLI with SIGINT raised at the Nth function call or return of its main thread once
# three chunks are out: a real signal is handled at such points, so a sweep over N hits each
# line a Ctrl-C can interrupt (within gRPC's wait for a response too, when that ran there).
SIGINT_AT_CALL_N = """
import os, signal, sys
from llmserve.clients.cli import main
target, writes, calls = int(sys.argv.pop(1)), [], []
def profile(frame, event, arg):
    if len(writes) < 3:
        if event == "c_call" and arg == sys.stdout.write:
            writes.append(1)
    else:
        calls.append(1)
        if len(calls) == target:
            sys.setprofile(None)
            os.kill(os.getpid(), signal.SIGINT)
sys.setprofile(profile)
sys.exit(main())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery is POSIX")
def test_sigint_anywhere_in_the_stream_exits_130(router) -> None:
    router.endless = True
    # One chunk's handling took 62 calls and returns when gRPC waited in the main thread.
    for n in range(1, 65):
        router.stream_ended.clear()
        done = subprocess.run(
            [sys.executable, "-c", SIGINT_AT_CALL_N, str(n), "generate", "hi"],
            capture_output=True,
            timeout=30,
            env={**os.environ, "LLMSERVE_TARGET": router.target},
        )
        assert (done.returncode, done.stderr.decode()) == (130, ""), f"SIGINT at call {n}"
        assert done.stdout.startswith(b"xxx")
        assert router.stream_ended.wait(5)
