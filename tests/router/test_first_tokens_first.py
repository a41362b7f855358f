"""The router relays a new stream's first token before running streams' next ones."""

from llmserve.router.engine_link import first_tokens_first
from llmserve.v1 import engine_service_pb2 as pb


def _message(*stream_ids: int) -> pb.GenerateStreamsResponse:
    message = pb.GenerateStreamsResponse()
    for stream_id in stream_ids:
        message.updates.add(stream_id=stream_id).response.token_ids.append(100 + stream_id)
    return message


def test_unanswered_streams_go_first_in_their_own_order() -> None:
    unanswered = {4, 2, 9}
    updates = first_tokens_first(_message(1, 2, 3, 4, 5).updates, unanswered)
    assert [u.stream_id for u in updates] == [2, 4, 1, 3, 5]
    assert [u.response.token_ids[0] for u in updates] == [102, 104, 101, 103, 105]
    assert unanswered == {9}  # answered streams leave the set; 9 is still waiting


def test_nothing_moves_once_every_stream_was_answered() -> None:
    message = _message(3, 1, 2)
    unanswered = {1}
    assert [u.stream_id for u in first_tokens_first(message.updates, unanswered)] == [1, 3, 2]
    assert [u.stream_id for u in first_tokens_first(message.updates, unanswered)] == [3, 1, 2]
    assert unanswered == set()
