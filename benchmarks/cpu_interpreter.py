"""`--device cpu` for the kernel benchmarks: a smoke run in Triton's interpreter."""

import argparse
import os


def use_interpreter_on_cpu(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """With `--device cpu`, turns Triton's interpreter on (`--small` required: interpreted
    kernels are slow); call it before llmserve.kernels, and so triton and its decorators, is
    imported."""
    if args.device != "cpu":
        return
    if not args.small:
        parser.error("--device cpu runs in Triton's interpreter: add --small")
    os.environ["LLMSERVE_TRITON_ON_CPU"] = "1"
    os.environ["TRITON_INTERPRET"] = "1"
