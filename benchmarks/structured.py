"""W7 `structured` (docs/benchmarks.md): W1's requests, each constrained by one of four JSON
schemas, against the same requests without schemas, in one process on one engine.

Request i carries schema i mod 4 of w7_schemas.json, at temperature 0.6 without ignore_eos and
with W1's length as its max_tokens cap: an output ends (`stop`) once its JSON is complete. Three
timed runs, each with its prompts' first token shifted by its index so none hits the prefix
cache of another: (1) with schemas; (2) without, each request's max_tokens the length its
constrained output had, with ignore_eos, so both runs generate the same tokens in the same
batches and their ratio is what the constraint costs; (3) without, at W1's caps without
ignore_eos (a random model seldom draws end-of-sequence, so these run to about W1's lengths).
Every `stop` output of (1) must parse and validate with `jsonschema`; `length` ones are cut
short and not checked.

    python benchmarks/structured.py --model /tmp/qwen3-0.6b-shape
    python benchmarks/structured.py --model "$(llmserve-demo-model)" --limit 4 \\
        --max-tokens-cap 300                                                  # CPU smoke run
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jsonschema
import torch
from result_file import RESULTS_DIR, device_name, write_result
from tokenizers import Tokenizer
from w1_draws import fold_into_vocab, salted, w1_requests, warmup_prompts
from w1_engine import add_engine_arguments, build_llm, engine_parameters, implementation_tag

from llmserve.engine_service.core.generation import Generation
from llmserve.engine_service.core.structured_output import StructuredOutputs
from llmserve.engine_service.llm import LLM
from llmserve.engine_service.seam import (
    EngineRequest,
    FinishReason,
    SamplingOptions,
    StructuredOutputSpec,
)

SCHEMAS = Path(__file__).resolve().with_name("w7_schemas.json")
TEMPERATURE = 0.6
INVALID_EXAMPLES = 3  # kept in the JSON, to see what went wrong


def json_schema(schema: dict, indent: int | None = None) -> StructuredOutputSpec:
    return StructuredOutputSpec("json_schema", json.dumps(schema, indent=indent))


def timed(llm: LLM, prompts: list[list[int]], sampling: list[SamplingOptions],
          args: argparse.Namespace) -> tuple[list[Generation], float]:
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    synchronize()
    began = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=not args.no_progress)
    synchronize()
    return outputs, time.perf_counter() - began


def run_figures(outputs: list[Generation], wall_s: float) -> dict:
    generated = sum(len(o.token_ids) for o in outputs)
    return {
        "tok_per_s": round(generated / wall_s, 2),
        "wall_s": round(wall_s, 3),
        "generated_tokens": generated,
        "stop": sum(o.finish_reason is FinishReason.STOP for o in outputs),
        "length": sum(o.finish_reason is FinishReason.LENGTH for o in outputs),
        "errors": sum(o.error is not None for o in outputs),
    }


def timing_masks(structured: StructuredOutputs) -> tuple[list[tuple[int, float]], Callable]:
    """Wraps the core's mask filling to time it; returns the (rows, seconds) list it appends
    to, and the function that undoes the wrap."""
    fills: list[tuple[int, float]] = []
    fill = structured.fill_bitmask

    def timed_fill(matchers: list) -> torch.Tensor:
        began = time.perf_counter()
        bitmask = fill(matchers)
        fills.append((len(matchers), time.perf_counter() - began))
        return bitmask

    structured.fill_bitmask = timed_fill  # type: ignore[method-assign]
    return fills, lambda: delattr(structured, "fill_bitmask")


def mask_figures(fills: list[tuple[int, float]]) -> dict:
    seconds = [s for _, s in fills] or [0.0]
    return {
        "steps": len(fills),
        "rows": sum(rows for rows, _ in fills),
        "total_s": round(sum(seconds), 4),
        "median_ms": round(statistics.median(seconds) * 1e3, 4),
        "max_ms": round(max(seconds) * 1e3, 4),
    }


def validity(outputs: list[Generation], names: list[str], schemas: dict[str, dict],
             decode: Callable[[list[int]], str]) -> tuple[dict, list[str]]:
    """Per schema: requests, `stop` outputs, those that parse and validate, mean tokens; and a
    few invalid outputs."""
    per_schema = {n: {"requests": 0, "stop": 0, "valid": 0, "tokens": 0} for n in schemas}
    invalid = []
    validators = {n: jsonschema.Draft202012Validator(s) for n, s in schemas.items()}
    for output, name in zip(outputs, names, strict=True):
        counts = per_schema[name]
        counts["requests"] += 1
        counts["tokens"] += len(output.token_ids)
        if output.finish_reason is not FinishReason.STOP:
            continue
        counts["stop"] += 1
        text = decode(output.token_ids)
        try:
            validators[name].validate(json.loads(text))
            counts["valid"] += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            if len(invalid) < INVALID_EXAMPLES:
                invalid.append(f"{name}: {str(exc)[:200]}: {text[:300]}")
    for counts in per_schema.values():
        counts["mean_tokens"] = round(counts.pop("tokens") / max(counts["requests"], 1), 1)
    return per_schema, invalid


def compile_ms(structured: StructuredOutputs, spec: StructuredOutputSpec) -> float:
    """Submit to ready through the core's own compiler and grammar cache, in milliseconds."""
    began = time.perf_counter()
    structured.submit(EngineRequest("compile-probe", [0], SamplingOptions(structured_output=spec)))
    while True:
        ready, refused = structured.poll()
        if refused:
            raise RuntimeError(refused[0][1])
        if ready:
            return round((time.perf_counter() - began) * 1e3, 3)
        structured.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    add_engine_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="only the first N requests")
    parser.add_argument("--max-tokens-cap", type=int, default=None,
                        help="cap every request's max_tokens (a quick CPU run)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    schemas = json.loads(SCHEMAS.read_text())
    prompts, caps = w1_requests()
    prompts, caps = prompts[: args.limit], caps[: args.limit]
    caps = [min(c, args.max_tokens_cap or c) for c in caps]
    names = [list(schemas)[i % len(schemas)] for i in range(len(prompts))]
    specs = {n: json_schema(s) for n, s in schemas.items()}

    started = time.perf_counter()
    llm = build_llm(args)
    start_s = time.perf_counter() - started
    vocab = llm.info.vocab_size
    folded = vocab <= 10000  # a small smoke-test model
    prompts = fold_into_vocab(prompts, vocab)
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    warm = time.perf_counter()
    # Builds the grammar vocabulary and the mask threads too, with a schema W7 does not use.
    llm.generate(
        warmup_prompts(vocab) * 2,
        [SamplingOptions(temperature=TEMPERATURE, max_tokens=16, ignore_eos=True)] * 2
        + [SamplingOptions(temperature=TEMPERATURE, max_tokens=16,
                           structured_output=StructuredOutputSpec("json_object", ""))] * 2,
        use_tqdm=False,
    )
    warm_s = time.perf_counter() - warm

    fills, unwrap = timing_masks(llm.core.structured)
    constrained, wall_s = timed(llm, salted(prompts, 0, vocab), [
        SamplingOptions(temperature=TEMPERATURE, max_tokens=c, structured_output=specs[n])
        for c, n in zip(caps, names, strict=True)
    ], args)
    unwrap()
    structured = run_figures(constrained, wall_s)
    same_lengths, wall_s = timed(llm, salted(prompts, 1, vocab), [
        SamplingOptions(temperature=TEMPERATURE, max_tokens=max(1, len(o.token_ids)),
                        ignore_eos=True)
        for o in constrained
    ], args)
    unconstrained = run_figures(same_lengths, wall_s)
    same_caps, wall_s = timed(llm, salted(prompts, 2, vocab), [
        SamplingOptions(temperature=TEMPERATURE, max_tokens=c) for c in caps
    ], args)
    unconstrained_same_caps = run_figures(same_caps, wall_s)
    per_schema, invalid = validity(constrained, names, schemas, tokenizer.decode)
    # Re-serialized with indentation: the same grammar under a text the timed run did not
    # cache, so the first submit compiles and the second hits the cache.
    compile_times = {
        n: {"first_ms": compile_ms(llm.core.structured, json_schema(s, indent=1)),
            "cached_ms": compile_ms(llm.core.structured, json_schema(s, indent=1))}
        for n, s in schemas.items()
    }

    valid = sum(c["valid"] for c in per_schema.values())
    figures = {
        "tok_per_s": structured["tok_per_s"],
        "unconstrained_tok_per_s": unconstrained["tok_per_s"],
        "ratio": round(structured["tok_per_s"] / unconstrained["tok_per_s"], 4),
        "unconstrained_same_caps_tok_per_s": unconstrained_same_caps["tok_per_s"],
        "ratio_same_caps": round(
            structured["tok_per_s"] / unconstrained_same_caps["tok_per_s"], 4),
        "stop": structured["stop"],
        "length": structured["length"],
        "valid": valid,
        "valid_of_stop": round(valid / structured["stop"], 4) if structured["stop"] else None,
        "runs": {
            "structured": structured,
            "unconstrained": unconstrained,
            "unconstrained_same_caps": unconstrained_same_caps,
        },
        "per_schema": per_schema,
        "invalid_examples": invalid,
        "mask_fill": mask_figures(fills),
        "compile_ms": compile_times,
        "engine_start_s": round(start_s, 2),
        "warmup_s": round(warm_s, 2),
        "attention_backend": llm.info.attention_backend,
        "dtype": llm.info.dtype,
        "num_kv_blocks": llm.info.num_blocks,
    }
    parameters = {
        "impl": implementation_tag(args, llm.info.attention_backend),
        "model": args.model.name,
        "requests": len(prompts),
        "limit": args.limit,
        "max_tokens_cap": args.max_tokens_cap,
        "max_tokens_total": sum(caps),
        "schemas": list(schemas),
        "temperature": TEMPERATURE,
        "ignore_eos": False,
        **engine_parameters(args),
        "prompt_ids_folded_into_vocab": folded,
        "prompt_salt": "run k shifts each prompt's first token by k (mod vocab)",
        "torch": torch.__version__,
    }
    path = write_result("W7", parameters, figures, out_dir=args.out)
    print(summary(figures))
    llm.close()
    print(f"wrote {path}")


def summary(f: dict) -> str:
    return (
        f"W7 on {device_name()}: {f['tok_per_s']:,.0f} tok/s with schemas, "
        f"{f['unconstrained_tok_per_s']:,.0f} without (x{f['ratio']:.3f}; at W1's caps "
        f"{f['unconstrained_same_caps_tok_per_s']:,.0f}); {f['stop']} stop, {f['length']} "
        f"length; valid {f['valid']}/{f['stop']}"
    )


if __name__ == "__main__":
    main()
