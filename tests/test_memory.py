"""The memory bank: chunking, FIFO, search backends, isolation, persistence."""

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from longmem import LongMemError, MemoryBank


def bank(B=2, Hkv=2, Dh=8, csz=4, M=64, kc=3, backend="faiss", **kw):
    return MemoryBank(B, Hkv, Dh, chunk_size=csz, memory_size=M, topk_chunks=kc, backend=backend, **kw)


def stream(B=2, Hkv=2, T=10, Dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hkv, T, Dh, generator=g), torch.randn(B, Hkv, T, Dh, generator=g)


def test_partial_chunks_wait_and_are_never_dropped():
    m = bank(csz=4)
    k, v = stream(T=3)
    m.add(k, v)
    assert (m.num_tokens(0), m.num_pending(0)) == (0, 3)
    k2, v2 = stream(T=3, seed=1)
    m.add(k2, v2)
    assert (m.num_tokens(0), m.num_pending(0)) == (4, 2)
    keys, values = m.chronological(0)  # (Hkv, N, csz, Dh)
    expected_k = torch.cat([k, k2], dim=2)[0, :, :4]
    assert_close(keys.reshape(2, 4, 8), expected_k)
    assert_close(values.reshape(2, 4, 8), torch.cat([v, v2], dim=2)[0, :, :4])


@pytest.mark.parametrize("T", [4, 6, 20, 100])
def test_fifo_holds_exactly_memory_size_and_evicts_the_oldest(T):
    m = bank(M=32, csz=4)
    ks, vs = [], []
    for s in range(7):
        k, v = stream(T=T, seed=s)
        m.add(k, v)
        ks.append(k), vs.append(v)
    total = 7 * T
    whole = (total // 4) * 4
    assert m.num_tokens(1) == min(32, whole)
    assert m.num_pending(1) == total - whole
    allk = torch.cat(ks, dim=2)[1, :, :whole]
    keys, _ = m.chronological(1)
    assert_close(keys.reshape(2, -1, 8), allk[:, -min(32, whole):])  # the newest tokens, oldest first


def test_rows_are_isolated_and_reset_only_forgets_the_given_rows():
    m = bank()
    k, v = stream(T=12)
    m.add(k, v)
    m.reset(rows=[0])
    assert m.num_tokens(0) == 0 and m.num_tokens(1) == 12
    q = torch.randn(2, 2, 5, 8)
    r = m.search(q)
    assert not r.mask[0].any() and r.mask[1].all()
    # row 1 only ever sees its own tokens
    stored = set(map(tuple, k[1].reshape(-1, 8).tolist()))
    assert all(tuple(x) in stored for x in r.keys[1].reshape(-1, 8).tolist())


def _brute_force(m, queries, row, head):
    """Reference: chunk means from the chronological tokens, ranked by numpy inner products."""
    keys, _ = m.chronological(row)
    means = keys[head].double().mean(dim=1).numpy()  # (N, Dh)
    scores = queries.double().numpy() @ means.T
    return np.argsort(-scores, axis=1, kind="stable")[:, : m.topk_chunks], means


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_search_is_exact_top_k_over_chunk_means(backend):
    m = bank(M=32, csz=4, kc=3, backend=backend)
    for s in range(5):  # wraps the ring
        m.add(*stream(T=9, seed=s))
    q = torch.randn(2, 2, 6, 8)
    slots, _ = m.search_chunks(q)
    for row in range(2):
        keys, _ = m.chronological(row)
        for h in range(2):
            ref, means = _brute_force(m, q[row, h], row, h)
            got = m.chunk_keys[row, h, slots[row, h]].double().numpy()  # (Q, kc, Dh)
            assert np.allclose(got, means[ref], atol=1e-6)


def test_k_c_comes_from_the_reader_unless_the_memory_has_its_own():
    """A memory built without k_c (a model's) returns what each search asks for; one built with k_c keeps it."""
    own, none = bank(kc=3), bank(kc=None)
    for s in range(4):
        k, v = stream(T=11, seed=s)
        own.add(k, v), none.add(k, v)
    q = torch.randn(2, 2, 5, 8)
    assert torch.equal(none.search(q, topk_chunks=3).keys, own.search(q).keys)
    assert torch.equal(own.search(q, topk_chunks=1).keys, own.search(q).keys)  # the memory's own k_c wins
    assert none.search(q, topk_chunks=1).keys.shape[-2] == 4  # K = k_c * csz
    with pytest.raises(LongMemError, match="needs k_c"):
        none.search(q)


def test_faiss_and_torch_backends_return_identical_chunks():
    a, b = bank(M=64, kc=5, backend="faiss"), bank(M=64, kc=5, backend="torch")
    for s in range(6):
        k, v = stream(T=11, seed=s)
        a.add(k, v), b.add(k, v)
    a.reset(rows=[0]); b.reset(rows=[0])
    a.add(*stream(T=9, seed=9)); b.add(*stream(T=9, seed=9))  # row 0 has fewer chunks than k_c
    q = torch.randn(2, 4, 7, 8)  # 4 query heads over 2 key/value heads
    ra, rb = a.search(q), b.search(q)
    assert torch.equal(ra.chunks, rb.chunks)
    assert torch.equal(ra.mask, rb.mask)
    assert torch.equal(ra.keys, rb.keys) and torch.equal(ra.values, rb.values)


@pytest.mark.parametrize("steps", [1, 2, 5, 9])  # fewer chunks than k_c, not full, full, wrapped more than once
def test_next_chunks_returns_the_chunk_written_after_each_retrieved_one(steps):
    m = bank(M=32, csz=4, kc=3)
    for s in range(steps):
        m.add(*stream(T=7, seed=s))
    q = torch.randn(2, 2, 5, 8)
    plain, both = m.search(q), m.search(q, next_chunks=True)
    assert both.keys.shape == (2, 2, 5, 2 * 3 * 4, 8)
    assert torch.equal(both.keys[..., :12, :], plain.keys) and torch.equal(both.mask[..., :12], plain.mask)
    for row in range(2):
        keys, values = m.chronological(row)  # (Hkv, N, csz, Dh), oldest first
        N = keys.shape[1]
        for h in range(2):
            for t in range(5):
                for j in range(3):
                    slot = int(plain.chunks[row, h, t, j])
                    if slot < 0:  # nothing retrieved: no successor either
                        assert not both.mask[row, h, t, 12 + 4 * j: 16 + 4 * j].any()
                        continue
                    hits = [n for n in range(N) if torch.equal(keys[h, n], m.keys[row, h, slot])]
                    assert len(hits) == 1
                    got = both.keys[row, h, t, 12 + 4 * j: 16 + 4 * j]
                    retrieved = {int(c) for c in plain.chunks[row, h, t] if c >= 0}
                    if hits[0] == N - 1:  # the newest chunk has no successor: masked
                        assert not both.mask[row, h, t, 12 + 4 * j: 16 + 4 * j].any()
                    elif torch.equal(both.chunks[row, h, t, 3 + j], torch.tensor(-1)) and any(
                            torch.equal(keys[h, hits[0] + 1], m.keys[row, h, r]) for r in retrieved):
                        # the successor is itself among the retrieved chunks: taken once, not twice
                        assert not both.mask[row, h, t, 12 + 4 * j: 16 + 4 * j].any()
                    else:
                        assert both.mask[row, h, t, 12 + 4 * j: 16 + 4 * j].all()
                        assert torch.equal(got, keys[h, hits[0] + 1])
                        assert torch.equal(both.values[row, h, t, 12 + 4 * j: 16 + 4 * j], values[h, hits[0] + 1])


def test_a_successor_that_is_also_retrieved_is_not_counted_twice():
    """Two stored chunks and k_c = 2: both are retrieved, and the first one's successor is the second."""
    m = bank(B=1, M=32, csz=4, kc=2)
    m.add(*stream(B=1, T=8, seed=0))  # exactly 2 chunks
    got = m.search(torch.randn(1, 2, 3, 8), next_chunks=True)
    for h in range(2):
        for t in range(3):
            valid = got.keys[0, h, t][got.mask[0, h, t]]  # (tokens, Dh)
            assert valid.shape[0] == 8  # 2 chunks x 4 tokens, each once
            assert torch.unique(valid, dim=0).shape[0] == 8


def test_missing_results_are_masked():
    m = bank(kc=4, csz=2)
    m.add(*stream(T=4))  # two chunks per row, four asked for
    r = m.search(torch.randn(2, 2, 3, 8))
    assert r.mask.shape == (2, 2, 3, 8)
    assert r.mask[..., :4].all() and not r.mask[..., 4:].any()
    assert (r.chunks[..., 2:] == -1).all()


def test_empty_memory_returns_an_all_false_mask():
    r = bank().search(torch.randn(2, 2, 3, 8))
    assert not r.mask.any()


def test_save_load_round_trip_is_identical(tmp_path):
    m = bank(M=32, info={"fingerprint": "abc", "memory_layer": 3})
    for s in range(5):
        m.add(*stream(T=7, seed=s))
    m.rows[1].sources.append("book.txt")
    m.save(tmp_path / "mem.safetensors")
    n = MemoryBank.load(tmp_path / "mem.safetensors", expect={"fingerprint": "abc"})
    for row in range(2):
        assert (n.num_tokens(row), n.num_pending(row)) == (m.num_tokens(row), m.num_pending(row))
        for x, y in zip(n.chronological(row), m.chronological(row)):
            assert torch.equal(x, y)
    q = torch.randn(2, 2, 5, 8)
    assert torch.equal(n.search(q).keys, m.search(q).keys)
    assert n.rows[1].sources == ["book.txt"]
    # the next write continues exactly where the original would
    k, v = stream(T=3, seed=42)
    m.add(k, v), n.add(k, v)
    assert torch.equal(n.chronological(0)[0], m.chronological(0)[0])


def test_load_refuses_a_memory_of_another_model(tmp_path):
    m = bank(info={"fingerprint": "abc"})
    m.save(tmp_path / "m.safetensors")
    with pytest.raises(LongMemError, match="another model"):
        MemoryBank.load(tmp_path / "m.safetensors", expect={"fingerprint": "xyz"})


def test_load_detects_damaged_files(tmp_path):
    m = bank()
    m.add(*stream(T=16))
    p = tmp_path / "m.safetensors"
    m.save(p)
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LongMemError):
        MemoryBank.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a memory")
    with pytest.raises(LongMemError):
        MemoryBank.load(tmp_path / "junk.safetensors")
    with pytest.raises(LongMemError, match="no memory file"):
        MemoryBank.load(tmp_path / "missing.safetensors")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(LongMemError, match="multiple of chunk_size"):
        bank(M=30, csz=4)
    with pytest.raises(LongMemError, match="backend"):
        bank(backend="annoy")
    m = bank()
    with pytest.raises(LongMemError, match="shape"):
        m.add(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8))
    with pytest.raises(LongMemError, match="queries"):
        m.search(torch.randn(2, 3, 4, 8))
    with pytest.raises(LongMemError, match="row"):
        m.num_tokens(5)


def test_storage_keeps_the_given_dtype():
    m = bank(dtype=torch.bfloat16)
    m.add(*stream(T=8))
    assert m.keys.dtype == torch.bfloat16 and m.chunk_keys.dtype == torch.float32  # the search index is fp32
    assert m.search(torch.randn(2, 2, 3, 8)).keys.dtype == torch.bfloat16


def test_a_flipped_bit_is_detected(tmp_path):
    m = bank()
    m.add(*stream(T=16))
    p = tmp_path / "m.safetensors"
    m.save(p)
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(LongMemError, match="damaged"):
        MemoryBank.load(tmp_path / "flip.safetensors")


# -- the approximate (ivf) index ---------------------------------------------------------------------


def _ivf_pair(nprobe, M=4096, nlist=4, writes=14, T=100):
    """A flat and an ivf memory fed the same stream, past the ivf training size and around the FIFO ring."""
    flat, ivf = bank(M=M, kc=5), bank(M=M, kc=5, index="ivf", nlist=nlist, nprobe=nprobe)
    assert ivf.ivf_min_chunks == 39 * nlist
    for s in range(writes):
        k, v = stream(T=T, seed=s)
        flat.add(k, v), ivf.add(k, v)
        ivf.search(torch.randn(2, 2, 1, 8))  # builds the index as soon as a row is large enough, then keeps it in step
    return flat, ivf


def test_ivf_scanning_every_cluster_is_exact_through_writes_and_evictions():
    flat, ivf = _ivf_pair(nprobe=4)  # 14 writes of 25 chunks, trained at 175 (>= 156), no eviction
    flat2, ivf2 = _ivf_pair(nprobe=4, M=800, writes=20)  # 500 chunks into a 200-chunk ring: evictions after training
    for f, i in ((flat, ivf), (flat2, ivf2)):
        assert set(i._ivf) == {0, 1} and all(idx.ntotal == i.rows[0].count for idx in i._ivf[0])
        q = torch.randn(2, 4, 9, 8)
        a, b = f.search(q), i.search(q)
        assert torch.equal(a.chunks, b.chunks) and torch.equal(a.keys, b.keys)


def test_ivf_with_few_probes_is_approximate_and_below_its_training_size_is_exact():
    flat, ivf = _ivf_pair(nprobe=1, nlist=8, writes=16)
    q = torch.randn(2, 2, 64, 8)
    a, b = flat.search_chunks(q)[0], ivf.search_chunks(q)[0]
    found = (b >= 0)
    # every result is a real stored chunk and the scan is genuinely partial: some top-5 sets differ from the exact one
    assert found.any() and not torch.equal(a, b)
    recall = np.mean([len(set(x.tolist()) & set(y.tolist())) / 5 for x, y in zip(a.view(-1, 5), b.view(-1, 5))])
    assert 0.2 < recall < 1.0
    small_flat, small_ivf = bank(M=4096, kc=5), bank(M=4096, kc=5, index="ivf", nlist=8, nprobe=1)
    for s in range(2):
        small_flat.add(*stream(T=100, seed=s)), small_ivf.add(*stream(T=100, seed=s))
    assert torch.equal(small_flat.search(q.repeat(1, 2, 1, 1)).keys, small_ivf.search(q.repeat(1, 2, 1, 1)).keys)
    assert small_ivf._ivf == {}  # 50 chunks < 39 * 8: still exact


def test_ivf_memory_save_load_retrieves_the_same_and_reset_forgets_the_index(tmp_path):
    _, ivf = _ivf_pair(nprobe=2, M=800, writes=20)
    ivf.save(tmp_path / "m.safetensors")
    back = MemoryBank.load(tmp_path / "m.safetensors")
    assert (back.index, back.nlist, back.nprobe) == ("ivf", 4, 2)
    assert set(back.centroids) == {0, 1} and torch.equal(back.centroids[1], ivf.centroids[1])
    q = torch.randn(2, 2, 16, 8)
    assert torch.equal(back.search(q).keys, ivf.search(q).keys)
    k, v = stream(T=40, seed=99)  # writes after the reload keep both in step
    back.add(k, v), ivf.add(k, v)
    assert torch.equal(back.search(q).keys, ivf.search(q).keys)
    ivf.reset(rows=[0])
    assert 0 not in ivf._ivf and 0 not in ivf.centroids and 1 in ivf._ivf


def test_ivf_needs_faiss_and_valid_sizes():
    with pytest.raises(LongMemError, match="ivf index runs on faiss"):
        bank(backend="torch", index="ivf")
    for kw in ({"index": "hnsw"}, {"index": "ivf", "nlist": 0}, {"index": "ivf", "nprobe": -1}):
        with pytest.raises(LongMemError):
            bank(**kw)


def test_cosine_metric_ranks_by_the_unit_length_chunk_mean_and_survives_save_load(tmp_path):
    m = bank(M=64, kc=3, metric="cosine")
    for s in range(3):
        m.add(*stream(T=10, seed=s))
    # a huge-norm chunk wins every inner-product search but not a cosine one
    big = torch.zeros(2, 2, 4, 8)
    big[..., 0] = 1e3
    m.add(big, big)
    q = torch.randn(2, 2, 5, 8)
    slots, _ = m.search_chunks(q)
    for row in range(2):
        keys, _ = m.chronological(row)  # (Hkv, N, csz, Dh): stored raw, the search index is normalised
        means = torch.nn.functional.normalize(keys.float().mean(2), dim=-1)
        ref = torch.einsum("hqd,hnd->hqn", q[row], means).topk(3, dim=-1).indices
        start = m.rows[row].head if m.rows[row].count == m.max_chunks else 0
        got = (slots[row] - start) % m.max_chunks  # ring slot -> chronological index
        assert torch.equal(got.sort(-1).values, ref.sort(-1).values)
    assert torch.allclose(m.chunk_keys[0, :, : m.rows[0].count].norm(dim=-1), torch.ones(1))
    assert m.chronological(0)[0].abs().max() == 1e3  # retrieved tokens keep their raw keys
    m.save(tmp_path / "m.safetensors")
    back = MemoryBank.load(tmp_path / "m.safetensors")
    assert back.metric == "cosine" and torch.equal(back.search(q).keys, m.search(q).keys)
    with pytest.raises(LongMemError, match="metric must be one of"):
        bank(metric="l2")


def test_every_single_bit_flip_and_truncation_is_refused_or_harmless(tmp_path):
    """Each byte of a saved memory gets one flipped bit (a different bit per byte), and the file is cut at every
    length: each damaged file is refused with a one-line error, or (a flip the format cannot see, like JSON
    padding) loads exactly the original memory, header included."""
    m = bank(B=1, M=32, info={"fingerprint": "abc"})
    m.add(*stream(B=1, T=13))
    m.rows[0].sources.append({"file": "a.txt", "tokens": 13})
    p = tmp_path / "m.safetensors"
    m.save(p)
    data = p.read_bytes()
    refused = harmless = 0

    def check(blob):
        nonlocal refused, harmless
        (tmp_path / "bad.safetensors").write_bytes(blob)
        try:
            back = MemoryBank.load(tmp_path / "bad.safetensors")
        except LongMemError as e:
            assert "\n" not in str(e)
            refused += 1
            return
        assert back.header() == m.header() and torch.equal(back.chronological(0)[0], m.chronological(0)[0])
        assert torch.equal(back.chronological(0)[1], m.chronological(0)[1])
        harmless += 1

    for i in range(len(data)):
        check(data[:i] + bytes([data[i] ^ (1 << (i % 8))]) + data[i + 1:])
    for n in range(0, len(data), 7):
        check(data[:n])
    print(f"memory file of {len(data)} bytes: {refused} damaged copies refused, {harmless} harmless")
    assert harmless < len(data) // 20  # only bits the format ignores (e.g. JSON padding in the safetensors header)


def test_a_memory_written_before_the_header_checksum_still_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from longmem.memory import _checksum

    m = bank(B=1, M=32)
    m.add(*stream(B=1, T=9))
    m.save(tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["longmem"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del header["checksum_scope"]
    header["sha256"] = _checksum(tensors)  # the earlier scope: tensors only
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"longmem": json.dumps(header)})
    old = MemoryBank.load(tmp_path / "old.safetensors")
    assert torch.equal(old.chronological(0)[0], m.chronological(0)[0])
