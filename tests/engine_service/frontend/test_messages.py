"""GetInfo and WatchLoad messages carry the seam's values, field by field."""

from llmserve.engine_service.frontend.messages import info_to_proto, load_to_proto
from llmserve.engine_service.seam import EngineInfo, LoadSnapshot


def test_get_info_is_the_engine_info() -> None:
    info = EngineInfo(
        model="qwen3", architecture="Qwen3ForCausalLM", vocab_size=151936, max_model_len=4096,
        block_size=16, num_blocks=900, max_num_seqs=64, max_num_batched_tokens=2048,
        block_hash_algorithm="xxh3_64", block_hash_seed=2**63 + 5, eos_token_ids=(1, 2),
        attention_backend="triton", dtype="bfloat16", tensor_parallel_size=2, device="cuda:0",
        max_tokens_default=256,
    )
    message = info_to_proto(info)
    assert len(message.DESCRIPTOR.fields) == 15
    for name in message.DESCRIPTOR.fields_by_name:
        sent = getattr(message, name)
        assert (tuple(sent) if name == "eos_token_ids" else sent) == getattr(info, name), name


def test_watch_load_is_the_load_snapshot() -> None:
    message = load_to_proto(LoadSnapshot(3, 1, 40, 100, 2**40, (0, 3, 1)))
    assert (message.num_running, message.num_waiting, message.num_free_blocks,
            message.num_total_blocks, message.queued_prefill_tokens) == (3, 1, 40, 100, 2**40)
    assert list(message.requests_per_priority) == [0, 3, 1]
