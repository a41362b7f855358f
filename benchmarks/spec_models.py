"""W8's model pair (docs/benchmarks.md): a Qwen3 target and a much smaller draft, trained on the
device from the Python standard library's own sources, saved as real HF checkpoint directories.

The corpus is every .py file under the running interpreter's stdlib (sysconfig's "stdlib" path,
site-packages and dist-packages left out), split by file: a file is held out when the first
8 hex digits of sha1(its path relative to the stdlib) mod 100 are below --heldout-percent. Both
parts are tokenized once with Qwen's real vocabulary (bench_checkpoint.py's tokenizer), each file
followed by <|endoftext|>. Training samples windows of --seq-len tokens at random offsets of the
training part.

- target: Qwen3ForCausalLM trained from scratch on next-token cross-entropy, fp32 master weights
  under bf16 autocast on CUDA, fused AdamW, linear warm-up then cosine decay over the time
  budget, stopped after --target-train-s seconds.
- draft: the same, much smaller, distilled from the trained target (KL from the target's
  next-token distribution to the draft's, which is what a draft's acceptance rewards), stopped
  after --draft-train-s seconds; plain cross-entropy with --no-distill.

Both are saved in bf16 with `save_pretrained`, the Qwen tokenizer files and a generation config
(bench_checkpoint's), and loaded by the engine's own loader. The held-out figures (target loss,
draft loss, how often the draft's top token is the target's) are measured on held-out windows.

Imports torch and transformers: speculative.py runs `prepare` in a child process, so the process
that measures the engine never holds GPU memory.
"""

import hashlib
import json
import math
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_checkpoint import CONFIG as BENCH_CONFIG
from bench_checkpoint import build_qwen_tokenizer, write_bench_checkpoint
from tokenizers import Tokenizer

from llmserve.engine_service.demo_model import write_tokenizer

ENDOFTEXT = 151643
GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                     "pad_token_id": 151643}
Log = Callable[[dict], None]


def print_log(event: dict) -> None:
    print(json.dumps(event), flush=True)


# --- shapes --------------------------------------------------------------------------------


def shape(layers: int, hidden: int, max_positions: int = 2048) -> dict:
    """A Qwen3 config (bench_checkpoint's qwen3-0.6b-shape, same vocabulary and special ids)
    with `layers` layers of width `hidden`: MLP 3 x hidden, a head per 64 of width (head
    dimension 128 from width 1024 up, as Qwen3-0.6B's 16 x 128, else 64; 16 below width 128),
    half as many KV heads, tied embeddings."""
    heads = max(2, hidden // 64)
    head_dim = 128 if hidden >= 1024 else 64 if hidden >= 128 else 16
    return {**BENCH_CONFIG, "num_hidden_layers": layers, "hidden_size": hidden,
            "intermediate_size": 3 * hidden, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2), "head_dim": head_dim,
            "max_position_embeddings": max_positions}


def parameter_count(cfg: dict) -> int:
    """Parameters of a Qwen3 config (tied embeddings counted once)."""
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    layer = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden + 2 * head_dim
    embeddings = cfg["vocab_size"] * hidden * (1 if cfg["tie_word_embeddings"] else 2)
    return cfg["num_hidden_layers"] * layer + embeddings + hidden


# --- corpus ----------------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path, max_files: int | None = None) -> list[Path]:
    """Every .py file of the stdlib, in the order of their path hashes (a fixed order that a
    --max-files cut samples evenly from)."""
    files = [p for p in root.rglob("*.py")
             if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
             and p.is_file()]
    files.sort(key=lambda p: path_hash(p, root))
    return files[:max_files] if max_files else files


def path_hash(path: Path, root: Path) -> int:
    return int(hashlib.sha1(path.relative_to(root).as_posix().encode()).hexdigest()[:8], 16)


def is_heldout(path: Path, root: Path, percent: int) -> bool:
    return path_hash(path, root) % 100 < percent


@dataclass
class Corpus:
    train: torch.Tensor  # every training file's tokens, each followed by <|endoftext|>
    heldout_files: list[list[int]]  # each held-out file's tokens
    stats: dict


def build_corpus(tokenizer: Tokenizer, heldout_percent: int, max_files: int | None) -> Corpus:
    """The stdlib split by file into training and held-out parts, tokenized once."""
    root = stdlib_root()
    files = stdlib_files(root, max_files)
    heldout = [p for p in files if is_heldout(p, root, heldout_percent)]
    if not heldout:  # a small --max-files cut may hold none out
        heldout = files[:1]
    train = [p for p in files if p not in set(heldout)]
    began = time.perf_counter()

    def encode(paths: list[Path]) -> list[list[int]]:
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    train_ids = encode(train)
    heldout_ids = encode(heldout)
    flat = [t for ids in train_ids for t in (*ids, ENDOFTEXT)]
    stats = {
        "python": sys.version.split()[0],
        "stdlib": str(root),
        "files": len(files),
        "train_files": len(train),
        "heldout_files": len(heldout),
        "train_tokens": len(flat),
        "heldout_tokens": sum(len(ids) for ids in heldout_ids),
        "heldout_rule": f"sha1(path relative to the stdlib)[:8] mod 100 < {heldout_percent}",
        "tokenize_s": round(time.perf_counter() - began, 2),
    }
    return Corpus(torch.tensor(flat, dtype=torch.long), heldout_ids, stats)


def heldout_windows(corpus: Corpus, length: int, count: int) -> list[list[int]]:
    """`count` windows of `length` tokens of held-out files: each file's non-overlapping
    windows [0, length), [length, 2 length), ..., taken round-robin over the files (in hash
    order), so consecutive prompts come from different files. Where no held-out file is that
    long (a small --max-files cut), windows of the held-out files one after another. The list
    cycles only when the held-out part holds fewer windows than asked for."""
    per_file = [[ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
                for ids in corpus.heldout_files]
    windows: list[list[int]] = []
    for depth in range(max((len(w) for w in per_file), default=0)):
        windows += [w[depth] for w in per_file if depth < len(w)]
    if not windows:
        flat = [t for ids in corpus.heldout_files for t in ids]
        windows = [flat[i:i + length] for i in range(0, len(flat) - length + 1, length)]
    if not windows:
        raise ValueError(f"the held-out files hold fewer than {length} tokens")
    return [windows[i % len(windows)] for i in range(count)]


def heldout_batch(corpus: Corpus, seq_len: int, count: int) -> torch.Tensor:
    """`count` held-out windows of seq_len + 1 tokens (their ends may cross into the next
    file), for the held-out figures."""
    flat = torch.tensor([t for ids in corpus.heldout_files for t in (*ids, ENDOFTEXT)])
    length = seq_len + 1
    count = max(1, min(count, len(flat) // length))
    if len(flat) < length:
        flat = flat.repeat(length // max(len(flat), 1) + 1)
    step = max(1, (len(flat) - length) // count)
    return torch.stack([flat[i * step:i * step + length] for i in range(count)])


# --- training --------------------------------------------------------------------------------


@dataclass
class TrainOptions:
    seconds: float
    lr: float
    batch_size: int  # sequences per optimizer step
    micro_batch: int  # sequences per forward/backward
    seq_len: int
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    log_every_s: float = 10.0
    seed: int = 0


def new_model(cfg: dict, device: torch.device) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # sdpa named: an older transformers defaults a model built from a config to eager attention.
    config = Qwen3Config(**{k: v for k, v in cfg.items()
                            if k not in ("architectures", "torch_dtype", "dtype", "model_type")},
                         attn_implementation="sdpa")
    return Qwen3ForCausalLM(config).to(device=device, dtype=torch.float32)


def _lr(options: TrainOptions, step: int, elapsed: float) -> float:
    """Linear warm-up over the first steps, then cosine to min_lr_ratio over the time budget."""
    warm = min(1.0, (step + 1) / max(options.warmup_steps, 1))
    progress = min(1.0, elapsed / max(options.seconds, 1e-9))
    cosine = options.min_lr_ratio + (1 - options.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * progress))
    return options.lr * warm * cosine


def _batches(tokens: torch.Tensor, options: TrainOptions, device: torch.device
             ) -> Callable[[], torch.Tensor]:
    """Random windows of seq_len + 1 tokens of the training part (seeded), on `device`."""
    generator = torch.Generator().manual_seed(options.seed)
    on_device = tokens.to(device)
    span = torch.arange(options.seq_len + 1, device=device)
    high = len(tokens) - options.seq_len - 1
    if high <= 0:
        raise ValueError(f"{len(tokens)} training tokens: too few for --seq-len {options.seq_len}")

    def next_batch() -> torch.Tensor:
        starts = torch.randint(0, high, (options.micro_batch,), generator=generator)
        return on_device[starts.to(device)[:, None] + span]

    return next_batch


def train(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor],
          tokens: torch.Tensor, options: TrainOptions, name: str, log: Log) -> dict:
    """Trains `model` until options.seconds have passed; loss_of(batch) is one micro-batch's
    mean loss. Logs step, loss, lr and tokens/s about every log_every_s seconds."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": options.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=options.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
    next_batch = _batches(tokens, options, device)
    accumulate = max(1, options.batch_size // options.micro_batch)
    tokens_per_step = accumulate * options.micro_batch * options.seq_len
    model.train()
    began = time.perf_counter()
    last_log, last_step, step, losses = began, 0, 0, []
    while True:
        elapsed = time.perf_counter() - began
        if elapsed >= options.seconds and step > 0:
            break
        lr = _lr(options, step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(accumulate):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_of(next_batch()) / accumulate
            loss.backward()
            total += float(loss.detach())  # synchronizes: the time budget is the GPU's
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(total)
        now = time.perf_counter()
        if now - last_log >= options.log_every_s or (now - began >= options.seconds):
            log({"event": "train", "model": name, "step": step,
                 "loss": round(statistics_mean(losses[last_step:]), 4), "lr": round(lr, 7),
                 "tokens_per_s": round((step - last_step) * tokens_per_step / (now - last_log)),
                 "elapsed_s": round(now - began, 1)})
            last_log, last_step = now, step
    seconds = time.perf_counter() - began
    del optimizer
    model.eval()
    return {"steps": step, "seconds": round(seconds, 1), "tokens": step * tokens_per_step,
            "tokens_per_s": round(step * tokens_per_step / seconds),
            "final_loss": round(statistics_mean(losses[-10:]), 4), "lr": options.lr,
            "batch_tokens": tokens_per_step, "seq_len": options.seq_len}


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def lm_loss(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Next-token cross-entropy of a window batch (inputs: all but the last token)."""

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    return loss_of


def distill_loss(draft: torch.nn.Module, teacher: torch.nn.Module
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """KL(teacher || draft) per token over the vocabulary, the teacher run without gradients."""

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        inputs = batch[:, :-1]
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=inputs, use_cache=False).logits.float(), -1)
        log_q = F.log_softmax(draft(input_ids=inputs, use_cache=False).logits.float(), -1)
        return F.kl_div(log_q.flatten(0, 1), target.flatten(0, 1), log_target=True,
                        reduction="batchmean")

    return loss_of


@torch.no_grad()
def heldout_figures(target: torch.nn.Module, draft: torch.nn.Module | None, batch: torch.Tensor,
                    micro_batch: int) -> dict:
    """Held-out next-token loss of each model, and how often the draft's top token is the
    target's (greedy agreement: the acceptance a greedy draft would see on held-out text)."""
    device = next(target.parameters()).device
    sums = {"target_loss": 0.0, "draft_loss": 0.0, "agreement": 0.0}
    count = 0
    for chunk in batch.to(device).split(micro_batch):
        inputs, labels = chunk[:, :-1], chunk[:, 1:].flatten()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            t_logits = target(input_ids=inputs, use_cache=False).logits.flatten(0, 1).float()
            sums["target_loss"] += float(F.cross_entropy(t_logits, labels, reduction="sum"))
            if draft is not None:
                d_logits = draft(input_ids=inputs, use_cache=False).logits.flatten(0, 1).float()
                sums["draft_loss"] += float(F.cross_entropy(d_logits, labels, reduction="sum"))
                sums["agreement"] += float((d_logits.argmax(-1) == t_logits.argmax(-1)).sum())
        count += labels.numel()
    figures = {"heldout_tokens": count, "target_loss": round(sums["target_loss"] / count, 4)}
    if draft is not None:
        figures["draft_loss"] = round(sums["draft_loss"] / count, 4)
        figures["draft_target_top1_agreement"] = round(sums["agreement"] / count, 4)
    return figures


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(model: torch.nn.Module, tokenizer: Tokenizer, out_dir: Path) -> Path:
    """A real HF directory: bf16 weights and config by save_pretrained, the Qwen tokenizer
    files, bench_checkpoint's generation config."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer(tokenizer, out_dir, model.config.max_position_embeddings)
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    return out_dir


# --- the whole preparation, in a child process -------------------------------------------------


def prepare(options: dict, result_path: str) -> None:
    """Corpus, prompts, target, draft (when asked), bench checkpoint (when asked): writes what
    speculative.py needs as JSON to `result_path`. `options` are speculative.py's (see there)."""
    log = print_log
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() and not options["cpu"] else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(options["seed"])
    began = time.perf_counter()
    tokenizer = build_qwen_tokenizer(BENCH_CONFIG["vocab_size"])
    corpus = build_corpus(tokenizer, options["heldout_percent"], options["max_files"])
    log({"event": "corpus", **corpus.stats})
    prompts = heldout_windows(corpus, options["prompt_tokens"], options["num_prompts"])
    out: dict = {"corpus": corpus.stats, "prompts": prompts, "device": device.type,
                 "phases_s": {"corpus_s": round(time.perf_counter() - began, 1)}}
    work = Path(options["work_dir"])
    seq_len = options["seq_len"]

    target_cfg = shape(options["target_layers"], options["target_hidden"])
    target = new_model(target_cfg, device)
    run = TrainOptions(options["target_train_s"], options["target_lr"], options["batch_size"],
                       options["micro_batch"], seq_len, options["warmup_steps"],
                       log_every_s=options["log_every_s"], seed=options["seed"])
    log({"event": "train_start", "model": "target", "parameters": parameter_count(target_cfg),
         "layers": options["target_layers"], "hidden": options["target_hidden"],
         "seconds": run.seconds})
    out["target"] = {"config": _shape_summary(target_cfg),
                     "training": train(target, lm_loss(target), corpus.train, run, "target", log)}
    teacher = target.to(torch.bfloat16)  # what is saved and served; the draft's teacher
    out["target"]["dir"] = str(save_checkpoint(teacher, tokenizer, work / "target"))
    out["phases_s"]["target_s"] = round(time.perf_counter() - began, 1)

    draft = None
    if options["train_draft"]:
        draft_cfg = shape(options["draft_layers"], options["draft_hidden"])
        draft = new_model(draft_cfg, device)
        run = TrainOptions(options["draft_train_s"], options["draft_lr"], options["batch_size"],
                           options["micro_batch"], seq_len, options["warmup_steps"],
                           log_every_s=options["log_every_s"], seed=options["seed"] + 1)
        loss_of = distill_loss(draft, teacher) if options["distill"] else lm_loss(draft)
        log({"event": "train_start", "model": "draft", "parameters": parameter_count(draft_cfg),
             "layers": options["draft_layers"], "hidden": options["draft_hidden"],
             "distill": options["distill"], "seconds": run.seconds})
        out["draft"] = {"config": _shape_summary(draft_cfg), "distill": options["distill"],
                        "training": train(draft, loss_of, corpus.train, run, "draft", log)}
        draft = draft.to(torch.bfloat16)
        out["draft"]["dir"] = str(save_checkpoint(draft, tokenizer, work / "draft"))
        out["phases_s"]["draft_s"] = round(time.perf_counter() - began, 1)
    out["heldout"] = heldout_figures(teacher, draft,
                                     heldout_batch(corpus, seq_len, options["heldout_windows"]),
                                     options["micro_batch"])
    log({"event": "heldout", **out["heldout"]})
    del teacher, target, draft
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if options["bench_model"]:
        bench = Path(options["bench_model"])
        if not (bench / "model.safetensors").is_file():
            write_bench_checkpoint(bench, device=device)
        out["phases_s"]["bench_checkpoint_s"] = round(time.perf_counter() - began, 1)
    Path(result_path).write_text(json.dumps(out))


def _shape_summary(cfg: dict) -> dict:
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
            "max_position_embeddings")
    return {k: cfg[k] for k in keys} | {"parameters": parameter_count(cfg)}


if __name__ == "__main__":  # python benchmarks/spec_models.py OPTIONS_JSON RESULT_JSON
    prepare(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
