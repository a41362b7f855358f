"""min_tokens, logit_bias and the penalties against plain torch written from their definitions,
on random logits; the device-side counts against the sequences' tokens as steps go by."""

import random
from dataclasses import dataclass, field

import pytest
import torch

from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.runner.logits_processors import MIN_SLOTS, LogitsProcessors
from llmserve.engine_service.runner.sampler import Sampler, SamplingBatch
from llmserve.engine_service.seam import EngineRequest, SamplingOptions
from llmserve.kernels.penalties import COUNT_MASK, PROMPT_BIT

VOCAB = 64
EOS = (2, 3)


@dataclass(eq=False)
class Seq:
    """The part of the core's Sequence the processors read."""

    sampling: SamplingOptions
    token_ids: list[int]
    num_prompt_tokens: int
    pending: list[int] = field(default_factory=list)  # drawn, not read by the host yet
    num_resumed_output_tokens: int = 0

    @property
    def num_pending_tokens(self) -> int:
        return len(self.pending)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + len(self.pending)


def reference(logits: torch.Tensor, seq: Seq) -> torch.Tensor:
    """One row, straight from the definitions, in vLLM's order."""
    o = seq.sampling
    row = logits.clone().double()
    all_tokens = seq.token_ids + seq.pending
    prompt, output = all_tokens[: seq.num_prompt_tokens], all_tokens[seq.num_prompt_tokens :]
    if len(output) < o.min_tokens:
        for token in (*o.stop_token_ids, *(() if o.ignore_eos else EOS)):
            row[token] = float("-inf")
    for token, bias in o.logit_bias:
        row[token] += bias
    for token in set(prompt) | set(output):
        row[token] = (row[token] / o.repetition_penalty if row[token] > 0
                      else row[token] * o.repetition_penalty)
    for token in set(output):
        row[token] -= o.frequency_penalty * output.count(token)
        row[token] -= o.presence_penalty
    return row


def random_options(rng: random.Random) -> SamplingOptions:
    kind = rng.choice(["none", "penalties", "bias", "min_tokens", "all"])
    if kind == "none":
        return SamplingOptions(stop_token_ids=(5,))
    penalties = kind in ("penalties", "all")
    return SamplingOptions(
        presence_penalty=rng.uniform(-2, 2) if penalties else 0.0,
        frequency_penalty=rng.uniform(-2, 2) if penalties else 0.0,
        repetition_penalty=rng.uniform(0.1, 2) if penalties else 1.0,
        logit_bias=tuple((t, rng.uniform(-100, 100)) for t in rng.sample(range(VOCAB), 5))
        if kind in ("bias", "all") else (),
        min_tokens=rng.randrange(1, 6) if kind in ("min_tokens", "all") else 0,
        stop_token_ids=tuple(rng.sample(range(VOCAB), 2)),
        ignore_eos=rng.random() < 0.3,
    )


def random_seq(rng: random.Random, options: SamplingOptions) -> Seq:
    # Few distinct tokens, so tokens repeat and prompt and output share some.
    prompt = [rng.randrange(0, 20) for _ in range(rng.randrange(1, 12))]
    output = [rng.randrange(0, 20) for _ in range(rng.randrange(0, 6))]
    return Seq(options, prompt + output, len(prompt))


def check_step(processors: LogitsProcessors, seqs: list[Seq], logits: torch.Tensor) -> None:
    original = logits.clone()
    processing = processors.prepare(seqs)
    asks = [s.sampling.processes_logits for s in seqs]
    if not any(asks):
        assert processing is None
        return
    assert processing is not None
    out = processing.apply(logits)
    assert torch.equal(logits, original), "the model's logits stay as they were"
    for r, seq in enumerate(seqs):
        torch.testing.assert_close(out[r].double(), reference(original[r], seq),
                                   rtol=1e-5, atol=1e-4, msg=f"row {r}: {seq.sampling}")


@pytest.mark.parametrize("seed", range(5))
def test_processors_match_their_definitions_on_random_logits(seed: int) -> None:
    rng = random.Random(seed)
    processors = LogitsProcessors(VOCAB, EOS, torch.device("cpu"))
    seqs = [random_seq(rng, random_options(rng)) for _ in range(12)]
    check_step(processors, seqs, torch.randn(len(seqs), VOCAB) * 5)


def test_counts_follow_drawn_tokens_pending_ones_included() -> None:
    """Steps draw tokens the host reads one step late (async scheduling): the counts on the
    device include the pending one; a finished sequence's slot is refilled for the next."""
    rng = random.Random(7)
    processors = LogitsProcessors(VOCAB, EOS, torch.device("cpu"))
    penalized = SamplingOptions(presence_penalty=0.5, frequency_penalty=0.3,
                                repetition_penalty=1.3, min_tokens=3)
    seqs = [random_seq(rng, penalized) for _ in range(3)]
    plain = random_seq(rng, SamplingOptions())
    for step in range(12):
        batch = [*seqs, plain]
        logits = torch.randn(len(batch), VOCAB) * 3
        check_step(processors, batch, logits)
        processing = processors.prepare(batch)
        assert processing is not None
        drawn = torch.randint(0, 20, (len(batch),))
        processing.record(drawn)
        for seq, token in zip(batch, drawn.tolist(), strict=True):
            seq.token_ids += seq.pending  # the previous step's token is read now
            seq.pending = [token]
        if step == 5:  # the first one finishes; a new sequence takes its slot
            processors.release(seqs[0])
            seqs[0].token_ids += seqs[0].pending
            seqs[0] = random_seq(rng, penalized)
    state = processors.state
    for seq in seqs:
        packed = state.counts[state.slot(seq)]
        tokens = seq.token_ids + seq.pending
        output = tokens[seq.num_prompt_tokens :]
        expected = [output.count(t) for t in range(VOCAB)]
        assert (packed & COUNT_MASK).tolist() == expected
        assert ((packed & PROMPT_BIT) != 0).tolist() == [
            t in tokens[: seq.num_prompt_tokens] for t in range(VOCAB)
        ]
    assert state.num_held == 3


def test_table_grows_and_keeps_what_it_holds() -> None:
    rng = random.Random(1)
    processors = LogitsProcessors(VOCAB, EOS, torch.device("cpu"))
    options = [SamplingOptions(frequency_penalty=1.0),
               SamplingOptions(logit_bias=tuple((t, 1.0) for t in range(40)))]
    seqs = [random_seq(rng, options[i % 2]) for i in range(3 * MIN_SLOTS)]
    for n in range(1, len(seqs) + 1, 5):  # a few more sequences each step
        check_step(processors, seqs[:n], torch.randn(n, VOCAB))
    assert processors.state.capacity == 4 * MIN_SLOTS
    assert processors.state.bias_width == 64
    check_step(processors, seqs, torch.randn(len(seqs), VOCAB))
    # Bounded by max_num_seqs: doubling stops there.
    bounded = LogitsProcessors(VOCAB, EOS, torch.device("cpu"), max_slots=MIN_SLOTS + 3)
    check_step(bounded, seqs[: MIN_SLOTS + 3], torch.randn(MIN_SLOTS + 3, VOCAB))
    assert bounded.state.capacity == MIN_SLOTS + 3


def test_sampler_draws_after_processing_and_reports_raw_logprobs() -> None:
    """logit_bias +100 makes greedy and sampled rows draw that token; the log-probabilities
    stay the model's."""
    processors = LogitsProcessors(VOCAB, EOS, torch.device("cpu"))
    options = [SamplingOptions(temperature=0.0, logit_bias=((17, 100.0),), logprobs=1),
               SamplingOptions(temperature=1.0, top_p=0.9, logit_bias=((33, 100.0),)),
               SamplingOptions(temperature=0.0, logprobs=1)]
    seqs = [Seq(o, [1, 2, 3], 3) for o in options]
    logits = torch.randn(3, VOCAB)
    batch = SamplingBatch(
        temperature=torch.tensor([o.temperature for o in options]),
        top_p=torch.tensor([o.top_p for o in options]),
        top_k=torch.zeros(3, dtype=torch.int64), min_p=torch.zeros(3),
        seeds=torch.tensor([1, 2, 3]), positions=torch.tensor([3, 3, 3]),
        num_logprobs=[o.logprobs for o in options], all_greedy=False, any_greedy=True,
        filtered=True, processing=processors.prepare(seqs))
    tokens, logprobs = Sampler()(logits, batch)
    assert tokens[:2] == [17, 33]
    assert tokens[2] == int(logits[2].argmax())
    raw = torch.log_softmax(logits, dim=-1)
    assert logprobs[0] is not None and abs(logprobs[0].logprob - float(raw[0, 17])) < 1e-5


def test_rows_after_draft_tokens_count_them_and_only_kept_tokens_are_recorded() -> None:
    """Speculative decoding's rows: the row after j draft tokens is processed as if they were
    output already (penalties, min_tokens), each row against its own definition, and the
    slot's counts are as before once the step is applied; the rows of a draft are left out of
    the step's record, and its kept tokens are counted after."""
    vocab, eos = 40, 0
    options = SamplingOptions(presence_penalty=0.5, frequency_penalty=0.7,
                              repetition_penalty=1.3, logit_bias=((4, 1.5),), min_tokens=4)
    prompt, output, draft = [1, 2, 3], [5, 6], [6, 5, 9]

    def sequence(tokens: list[int]) -> Sequence:
        seq = Sequence(EngineRequest("s", prompt, options), 0, 0)
        seq.token_ids += tokens
        return seq

    processors = LogitsProcessors(vocab, (eos,), torch.device("cpu"))
    seq = sequence(output)
    other = sequence([7])  # a row without a draft beside them
    rows = [seq] * (len(draft) + 1) + [other]
    drafts = [(j, draft) for j in range(len(draft) + 1)] + [(0, [])]
    logits = torch.randn(len(rows), vocab)
    processing = processors.prepare(rows, drafts)
    before = processors.state.counts.clone()
    got = processing.apply(logits)
    assert torch.equal(processors.state.counts, before)
    for j in range(len(draft) + 1):
        alone = LogitsProcessors(vocab, (eos,), torch.device("cpu"))
        want = alone.prepare([sequence(output + draft[:j])]).apply(logits[j : j + 1])
        torch.testing.assert_close(got[j : j + 1], want)
    drawn = torch.tensor([6, 5, 2, 8, 11])
    processing.record(drawn)
    slot = processors.state.held(other)
    assert processors.state.counts[slot, 11] - before[slot, 11] == 1  # the plain row counted
    assert torch.equal(processors.state.counts[processors.state.held(seq)],
                       before[processors.state.held(seq)])  # the draft's rows not yet
    processors.record_kept(seq, [6, 5, 2])
    assert (processors.state.counts[processors.state.held(seq), [6, 5, 2]]
            - before[processors.state.held(seq), [6, 5, 2]]).tolist() == [1, 1, 1]
