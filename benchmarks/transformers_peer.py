"""W1's peer baseline: Hugging Face transformers' own continuous batching on the same checkpoint.

As docs/benchmarks.md describes it: `model.continuous_batching_context_manager(...)`,
`add_request(ids, max_new_tokens=m, eos_token_id=-1)`, `attn_implementation="paged|sdpa"`,
do_sample with temperature 0.6. Requests stream, so with a deadline the tokens generated so far
are counted (the run is then partial, and says so). Any failure is returned as an error string.
"""

import time
import traceback

import torch

ATTN_IMPLEMENTATIONS = ("paged|sdpa", "sdpa")  # transformers drops the `paged|` prefix at 5.23


def _load(model_dir: str, device: str) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM

    errors = []
    for attn in ATTN_IMPLEMENTATIONS:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir,
                dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                attn_implementation=attn,
            )
            return model.to(device).eval(), attn
        except (ValueError, ImportError) as exc:  # this version rejects the spelling: next one
            errors.append(f"{attn}: {exc}")
    raise RuntimeError("; ".join(errors))


def _batching_config():
    """Keeps the attention W1 names: no switch to a flash-attn build that may be installed for
    our own flash_attn backend (releases before 5.23 never switch away from `paged|`)."""
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        return None
    try:
        return ContinuousBatchingConfig(auto_switch_to_flash=False)
    except TypeError:
        return ContinuousBatchingConfig()


def _drain(manager, request_ids: list[str], deadline: float | None) -> tuple[dict[str, int], int]:
    """Collects results until every request finished (or the deadline); (tokens, finished)."""
    tokens = dict.fromkeys(request_ids, 0)
    finished: set[str] = set()
    while len(finished) < len(request_ids):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        result = manager.get_result(timeout=0.5)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("transformers' generation thread stopped")
            continue
        if result.error:
            raise RuntimeError(f"request {result.request_id}: {result.error}")
        tokens[result.request_id] = max(tokens[result.request_id], len(result.generated_tokens))
        if result.is_finished():
            finished.add(result.request_id)
    return tokens, len(finished)


def run_transformers_peer(
    model_dir: str,
    prompts: list[list[int]],
    max_tokens: list[int],
    warmup_prompt: list[int],
    deadline_s: float | None = None,
) -> dict:
    """Generates W1's requests with transformers; figures, or {"error": ...} on any failure."""
    try:
        import transformers
        from transformers import GenerationConfig

        device = "cuda" if torch.cuda.is_available() else "cpu"
        started = time.perf_counter()
        model, attn = _load(model_dir, device)
        # top_k 0 / top_p 1: plain temperature sampling, as W1 asks (transformers' default
        # generation config would add top-k 50).
        generation = GenerationConfig(
            do_sample=True,
            temperature=0.6,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max(max_tokens),
            eos_token_id=-1,
            pad_token_id=0,
        )
        with model.continuous_batching_context_manager(
            generation_config=generation,
            continuous_batching_config=_batching_config(),
            block=True,
            timeout=30,
        ) as manager:
            load_s = time.perf_counter() - started
            warm = manager.add_request(warmup_prompt, max_new_tokens=16, eos_token_id=-1)
            _drain(manager, [warm], None)
            begin = time.perf_counter()
            ids = [
                manager.add_request(p, max_new_tokens=m, eos_token_id=-1, streaming=True)
                for p, m in zip(prompts, max_tokens, strict=True)
            ]
            tokens, finished = _drain(
                manager, ids, None if deadline_s is None else begin + deadline_s
            )
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - begin
        generated = sum(tokens.values())
        return {
            "tok_per_s": round(generated / elapsed, 2),
            "wall_s": round(elapsed, 3),
            "generated_tokens": generated,
            "requests_finished": finished,
            "requests": len(prompts),
            "partial": finished < len(prompts),
            "deadline_s": deadline_s,
            "attn_implementation": attn,
            "load_and_warmup_s": round(load_s, 2),
            "transformers": transformers.__version__,
        }
    except Exception as exc:  # the peer must never cost us our own figures
        return {
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
