"""The host-side block-table mirror follows what changed of each sequence's block list."""

from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.runner.block_table import BlockTableMirror
from llmserve.engine_service.seam import EngineRequest


def test_block_table_mirror_tracks_growth_replacement_and_absence() -> None:
    mirror = BlockTableMirror(max_seqs=2, max_pages=4)
    a = Sequence(EngineRequest("a", [1]), 0, 0)
    b = Sequence(EngineRequest("b", [1]), 1, 0)
    a.block_ids, b.block_ids = [3], [4, 5]
    rows = mirror.rows([a, b])
    a.block_ids.append(9)  # grows in place
    b.block_ids = [6]  # replaced (preempted and readmitted)
    rows = mirror.rows([b, a])
    assert mirror.table[rows[0], :1].tolist() == [6]
    assert mirror.table[rows[1], :2].tolist() == [3, 9]
    c = Sequence(EngineRequest("c", [1]), 2, 0)
    c.block_ids = [8, 1, 2]
    rows = mirror.rows([c, a])  # b is absent: its row is free again
    assert mirror.table[rows[0], :3].tolist() == [8, 1, 2]
    assert mirror.table[rows[1], :2].tolist() == [3, 9]
