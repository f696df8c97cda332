"""FeatureDataset: exactly-once across ranks x DataLoader workers, shuffling, length grouping, pad_batch."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import store_spec, synthetic_utterances, write_synthetic_store
from torch.utils.data import DataLoader
from zarr.storage import LocalStore

from store.dataset import FeatureDataset, pad_batch, round_robin_position
from store.reader import DamagedShardError


def make_store(tmp_path, n_utterances, shard_size, seed=0):
    spec = store_spec(shard_size=shard_size, chunk_frames=128)
    utts = synthetic_utterances(spec, n_utterances, seed=seed)
    write_synthetic_store(tmp_path / "s", spec, utts)
    return tmp_path / "s", utts


def ids_of_epoch(url, epoch, world_size=2, num_workers=2, **kwargs):
    """Every id each rank's real DataLoader (worker processes) yields in one epoch, per rank."""
    per_rank = []
    for rank in range(world_size):
        dataset = FeatureDataset(url, rank=rank, world_size=world_size, **kwargs)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
        per_rank.append([item["id"] for item in loader])
    return per_rank


def odd_rows(utt_id: str) -> bool:
    return int(utt_id[3:]) % 2 == 1


# 5 shards of 6 (the last has 4) for 4 consumers: uneven; 1 shard for 4 consumers: fewer shards than consumers.
@pytest.mark.parametrize("n_utterances,shard_size", [(28, 6), (7, 8)])
def test_every_utterance_exactly_once_per_epoch_over_2_ranks_x_2_workers(tmp_path, n_utterances, shard_size):
    url, utts = make_store(tmp_path, n_utterances, shard_size)
    all_ids = Counter(u["id"] for u in utts)
    orders = []
    for epoch in (0, 1):
        per_rank = ids_of_epoch(url, epoch, shuffle_buffer=4)
        assert Counter(per_rank[0] + per_rank[1]) == all_ids
        assert per_rank[0] and per_rank[1]
        orders.append(per_rank[0] + per_rank[1])
    if n_utterances > shard_size:
        assert orders[0] != orders[1]  # a new shard order and shuffle each epoch
    assert ids_of_epoch(url, 1, shuffle_buffer=4)[0] == ids_of_epoch(url, 1, shuffle_buffer=4)[0]  # seeded
    kept = ids_of_epoch(url, 0, keep=odd_rows)
    assert Counter(kept[0] + kept[1]) == Counter(i for i in all_ids if odd_rows(i))


def test_work_split_is_rank_major_and_covers_every_utterance(tmp_path):
    url, _ = make_store(tmp_path, 28, 6)
    dataset = FeatureDataset(url, shuffle=False)
    # rank 0 owns consumers 0-1 (its two workers), rank 1 consumers 2-3.
    assert dataset.assigned_units(0, 2, 0, 2) == [(0, 0, 6), (4, 0, 4)]
    assert dataset.assigned_units(0, 2, 1, 2) == [(1, 0, 6)]
    assert dataset.assigned_units(1, 2, 0, 2) == [(2, 0, 6)]
    assert dataset.assigned_units(1, 2, 1, 2) == [(3, 0, 6)]
    few = FeatureDataset(make_store(tmp_path / "few", 7, 8)[0], shuffle=False)
    assert few.units(4, 0) == [(0, 0, 2), (0, 2, 4), (0, 4, 5), (0, 5, 7)]


def test_shuffle_buffer_bounds_how_far_items_move(tmp_path):
    url, utts = make_store(tmp_path, 12, 12)
    stored_order = [u["id"] for u in utts]
    in_place = [item["id"] for item in FeatureDataset(url, shuffle_buffer=1)]
    assert in_place == stored_order  # a buffer of one cannot reorder within a shard
    shuffled = [item["id"] for item in FeatureDataset(url, shuffle_buffer=4)]
    assert shuffled != stored_order and sorted(shuffled) == sorted(stored_order)
    # An item leaves the buffer at the earliest when the item 4 places after it arrives.
    assert all(shuffled.index(i) >= stored_order.index(i) - 4 for i in stored_order)


def test_length_grouping_sorts_pools(tmp_path):
    url, utts = make_store(tmp_path, 24, 6)
    items = list(FeatureDataset(url, shuffle_buffer=8, length_bucket=8, seed=3))
    lengths = [item["n_frames"] for item in items]
    assert sorted(item["id"] for item in items) == sorted(u["id"] for u in utts)
    assert lengths[0:8] == sorted(lengths[0:8]) and lengths[8:16] == sorted(lengths[8:16], reverse=True)
    assert lengths[16:24] == sorted(lengths[16:24])


def loader_ids(dataset, epoch, taken=0, batch_size=None, num_workers=2):
    """The ids a DataLoader over `dataset` gives in `epoch`, resumed after its first `taken` outputs."""
    dataset.set_epoch(epoch, taken, batch_size=batch_size, num_workers=num_workers)
    collate = None if batch_size is None else pad_batch
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    return [item["id"] if batch_size is None else tuple(item["ids"]) for item in loader]


def test_round_robin_position_skips_the_streams_that_ended():
    lengths = np.array([1, 3, 2])  # a DataLoader takes a1 b1 c1 b2 c2 b3
    positions = [round_robin_position(lengths, n) for n in range(7)]
    assert [counts.tolist() for counts, _ in positions] == [
        [0, 0, 0],
        [1, 0, 0],
        [1, 1, 0],
        [1, 1, 1],
        [1, 2, 1],
        [1, 2, 2],
        [1, 3, 2],
    ]
    assert [following for _, following in positions] == [0, 1, 2, 1, 2, 1, 0]
    with pytest.raises(ValueError, match="7 outputs"):
        round_robin_position(lengths, 7)


# 2 workers over shards of 6 and 6 + 4 (held-out rows dropped): the streams end at different times.
@pytest.mark.parametrize("batch_size", [None, 2])
def test_a_resumed_epoch_is_the_rest_of_the_uninterrupted_one(tmp_path, batch_size):
    url, _ = make_store(tmp_path, 16, 6)
    dataset = FeatureDataset(url, seed=5, shuffle_buffer=3, length_bucket=4, keep=odd_rows, rank=0, world_size=1)
    whole = loader_ids(dataset, 1, batch_size=batch_size)
    for taken in range(len(whole) + 1):
        assert loader_ids(dataset, 1, taken, batch_size=batch_size) == whole[taken:], taken
    single = loader_ids(dataset, 1, batch_size=batch_size, num_workers=0)  # one stream, read in the process
    assert loader_ids(dataset, 1, 3, batch_size=batch_size, num_workers=0) == single[3:]


class CountingStore(LocalStore):
    """A local zarr store that records which shards' states objects are read."""

    def __init__(self, root, shards_read):
        super().__init__(root, read_only=True)
        self.shards_read = shards_read

    async def get(self, key, prototype, byte_range=None):
        if "/states/c" in key:  # the states' chunks, not their metadata
            self.shards_read.add(int(key.split("/")[1]))
        return await super().get(key, prototype, byte_range)


def test_resuming_reads_no_state_it_passes(tmp_path):
    """Seeking past 4 of 5 shards reads the states of the shards it yields from, not those before."""
    url, _ = make_store(tmp_path, 30, 6)
    shards_read: set[int] = set()
    dataset = FeatureDataset(CountingStore(url, shards_read), seed=1, shuffle_buffer=2, rank=0, world_size=1)
    dataset.set_epoch(0)
    whole = list(dataset)
    assert shards_read == {0, 1, 2, 3, 4}
    shards_read.clear()
    dataset.set_epoch(0, 24)
    rest = list(dataset)
    assert [item["id"] for item in rest] == [item["id"] for item in whole[24:]]
    shard_of = {f"utt{i:04d}": i // 6 for i in range(30)}
    assert shards_read == {shard_of[item["id"]] for item in rest}  # the last shard and a straggler or two
    assert len(shards_read) < 5


def test_items_and_pad_batch(tmp_path):
    url, utts = make_store(tmp_path, 6, 6)
    by_id = {u["id"]: u for u in utts}
    items = list(FeatureDataset(url, shuffle=False))
    item = items[2]
    truth = by_id[item["id"]]
    assert item["states"].dtype == torch.float16 and item["n_frames"] == truth["speech_frames"]
    np.testing.assert_array_equal(item["states"].numpy(), truth["window"][: truth["speech_frames"]])
    assert item["text"] == truth["text"] and item["language"] == truth["language"]
    batch = pad_batch(items[:3])
    lengths = [it["n_frames"] for it in items[:3]]
    assert batch["states"].shape == (3, max(lengths), 32) and batch["states"].dtype == torch.float32
    assert batch["lengths"].tolist() == lengths and batch["ids"] == [it["id"] for it in items[:3]]
    assert torch.equal(batch["states"][1, : lengths[1]], items[1]["states"].float())
    assert batch["states"][1, lengths[1] :].abs().sum() == 0
    half = DataLoader(
        FeatureDataset(url, shuffle=False), batch_size=3, collate_fn=functools.partial(pad_batch, dtype=torch.float16)
    )
    first = next(iter(half))  # through a DataLoader: the partial is what users pass as collate_fn
    assert first["states"].dtype == torch.float16 and torch.equal(first["states"].float(), batch["states"])
    with pytest.raises(ValueError, match="float32 or torch.float16"):
        pad_batch(items[:3], dtype=torch.bfloat16)  # would round the stored values


def test_rank_and_world_size_come_from_torch_distributed(tmp_path):
    url, utts = make_store(tmp_path, 12, 3)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert sorted(item["id"] for item in FeatureDataset(url)) == sorted(u["id"] for u in utts)
    finally:
        torch.distributed.destroy_process_group()
    with pytest.raises(ValueError, match="both rank and world_size"):
        FeatureDataset(url, rank=1)


def test_a_damaged_shard_fails_the_iteration_or_is_skipped_when_asked(tmp_path, caplog):
    url, utts = make_store(tmp_path, 18, 6)
    (url / "shards/00001/speech_frames/c/0").unlink()
    with pytest.raises(DamagedShardError, match="shard 00001 .* objects missing from the store: speech_frames"):
        list(FeatureDataset(url))  # by default the data never shrinks silently
    with caplog.at_level("ERROR", logger="store.dataset"):
        ids = sorted(item["id"] for item in FeatureDataset(url, skip_damaged=True))
    assert ids == sorted(u["id"] for i, u in enumerate(utts) if not 6 <= i < 12)
    assert "shard 00001" in caplog.text and "speech_frames" in caplog.text
    dataset = FeatureDataset(url, skip_damaged=True, shuffle_buffer=4, rank=0, world_size=1)
    whole = loader_ids(dataset, 0)  # resuming counts what the damaged shard no longer gives
    assert all(loader_ids(dataset, 0, taken) == whole[taken:] for taken in (1, 5, 9))
