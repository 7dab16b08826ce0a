"""Document streams: one document per row, in order, memory reset exactly at document boundaries."""

import numpy as np
import pytest
import torch

from longmem import LongMemError
from longmem.data.streams import IGNORE, DocumentStreams


def docs(lengths):
    return [np.arange(1000 * i, 1000 * i + n, dtype=np.int32) for i, n in enumerate(lengths)]


def test_each_row_reads_whole_documents_in_order_and_resets_at_boundaries():
    s = DocumentStreams(docs([10, 7, 25, 4]), batch_size=2, segment_length=4, loop=False)
    seen = {0: [], 1: []}
    resets = {0: 0, 1: 0}
    for batch in s:
        for b in range(2):
            if b in batch.reset:
                resets[b] += 1
                seen[b].append([])
            if batch.doc_index[b] >= 0:
                seen[b][-1].extend(batch.input_ids[b][batch.targets[b] != IGNORE].tolist())
                # targets are the next tokens of the inputs
                valid = batch.targets[b] != IGNORE
                assert torch.equal(batch.targets[b][valid], batch.input_ids[b][valid] + 1)
    read = sorted(tuple(d) for row in seen.values() for d in row)
    expected = sorted(tuple(d[:-1].tolist()) for d in docs([10, 7, 25, 4]))
    assert read == expected  # every token but the last of each document is an input with a target
    assert resets[0] + resets[1] == 4


def test_every_token_but_the_first_is_predicted_once():
    d = docs([13])
    s = DocumentStreams(d, batch_size=1, segment_length=4, loop=False)
    predicted = []
    for batch in s:
        t = batch.targets[0]
        predicted += t[t != IGNORE].tolist()
    assert predicted == d[0][1:].tolist()


def test_ranks_own_disjoint_rows():
    d = docs([9] * 8)
    firsts = []
    for rank in range(2):
        s = DocumentStreams(d, batch_size=2, segment_length=4, loop=True, seed=1, rank=rank, world_size=2)
        firsts.append({int(i) for i in s.next_batch().doc_index})
    assert not firsts[0] & firsts[1]


def test_state_round_trip_continues_identically():
    d = docs([9, 17, 5, 30])
    a = DocumentStreams(d, batch_size=2, segment_length=4, seed=3)
    for _ in range(5):
        a.next_batch()
    b = DocumentStreams(d, batch_size=2, segment_length=4, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(12):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.input_ids, y.input_ids) and x.reset == y.reset


def test_replay_gives_the_segments_already_read():
    d = docs([30])
    s = DocumentStreams(d, batch_size=1, segment_length=4, seed=0)
    read = [s.next_batch().input_ids for _ in range(3)]
    replay = s.replay_segments(0)
    assert len(replay) == 3 and all(torch.equal(x, y) for x, y in zip(read, replay))


def test_no_usable_document_is_an_error():
    with pytest.raises(LongMemError):
        DocumentStreams([np.zeros(1, dtype=np.int32)], batch_size=1, segment_length=4)
