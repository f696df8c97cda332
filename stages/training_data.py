"""What the training stages read: endless epochs over a store's DataLoader, the stores to train on (checked
against the teacher), their held-out items, and the damaged shards left out under skip_damaged."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from store import StoreReader
from store.dataset import FeatureDataset
from store.reader import DamagedShardError
from store.spec import TeacherInfo
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.teacher import check_teacher

log = logging.getLogger(__name__)

# --- data --------------------------------------------------------------------------------------------


def endless_epochs(
    dataset: Any,
    seed: int,
    epoch: int,
    skip: int,
    *,
    batch_size: int | None,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[int, int, Any]]:
    """(epoch, items read this epoch, item) forever from a DataLoader over `dataset`: a new epoch starts when
    this rank's share runs out. Resuming at a data position, the first epoch starts after its first `skip`
    items (or batches), which are not read: the dataset seeks there (FeatureDataset.set_epoch). `dataset` is
    a FeatureDataset (or anything with its set_epoch and url); pin_memory: the DataLoader's (batches in
    page-locked memory, for a GPU)."""
    while True:
        dataset.set_epoch(epoch, skip, batch_size=batch_size, num_workers=num_workers)
        # its own generator, so starting workers never draws from the global RNG (exact resume)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed + epoch),
        )
        seen = skip
        for seen, item in enumerate(loader, start=skip + 1):
            yield epoch, seen, item
        if seen == 0:
            raise WhistleError(
                f"this process got no training utterances from {dataset.url}: the store has fewer "
                "usable utterances than processes x workers, or everything is held out"
            )
        skip, epoch = 0, epoch + 1


# --- stores --------------------------------------------------------------------------------------------


def open_store(url: str, key: str, teacher: TeacherInfo) -> StoreReader:
    """A store of teacher states to train on (`key` names the setting that gave it); refuses one without a
    complete shard, or of another teacher geometry than `teacher`'s."""
    reader = StoreReader(url)
    if not reader.shards():
        incomplete = len(reader.incomplete_shards())
        raise WhistleError(
            f"{key} {url} has no complete shards ({incomplete} incomplete): run `whistle precompute` on it first"
            + (" and let it finish (a rerun completes the missing shards)" if incomplete else "")
        )
    check_teacher(
        reader.teacher,
        teacher,
        f"{key} {url}",
        "Use the teacher that made the store (teacher.name_or_path), or precompute the store with this one.",
    )
    return reader


def held_out_items(url: str, keep: Callable[[str], bool], size: int, skip_damaged: bool) -> list[dict[str, Any]]:
    """The first `size` utterances of a store that `keep` accepts, in store order (FeatureDataset items)."""
    dataset = FeatureDataset(url, shuffle=False, keep=keep, rank=0, world_size=1, skip_damaged=skip_damaged)
    items = []
    for item in dataset:
        items.append(item)
        if len(items) == size:
            break
    return items


@dataclass(frozen=True)
class DamagedShard:
    """A complete shard that cannot be read back, left out of training under skip_damaged."""

    store: str
    shard: int
    utterances: int  # all of the shard's utterances are left out
    reason: str


class WithoutIds:
    """FeatureDataset `keep` that also drops the utterances of damaged shards (picklable for workers):
    a shard damaged midway would otherwise give its first utterances and skip the rest."""

    def __init__(self, keep: Callable[[str], bool], dropped: frozenset[str]):
        self.keep, self.dropped = keep, dropped

    def __call__(self, utt_id: str) -> bool:
        return utt_id not in self.dropped and self.keep(utt_id)


def damaged_shards(accelerator: Any, url: str, scan_dir: Path) -> tuple[list[DamagedShard], frozenset[str]]:
    """Read every complete shard of a store once (rank r takes shards r, r + W, ...) and return the damaged
    ones and the utterance ids they still show (empty when their ids are unreadable).

    Each rank's findings go through a JSON file in `scan_dir`, so every rank returns the same list. A shard
    damaged after this scan is still skipped by FeatureDataset(skip_damaged=True), with an error logged.
    """
    reader = StoreReader(url)
    rank, world = accelerator.process_index, accelerator.num_processes
    found = []
    for shard in reader.shards()[rank::world]:
        try:
            for _ in reader.iter_shard(shard):
                pass
        except DamagedShardError as err:
            try:
                ids = reader.index(shard).ids
            except DamagedShardError:
                ids = []
            found.append(
                {"shard": shard, "utterances": reader.shard_attrs(shard)["n"], "reason": err.detail, "ids": ids}
            )
    scan_dir.mkdir(parents=True, exist_ok=True)
    name = f"rank{rank}.json"
    (scan_dir / f"{name}.partial").write_text(json.dumps(found))
    (scan_dir / f"{name}.partial").replace(scan_dir / name)
    accelerator.wait_for_everyone()
    records = [r for k in range(world) for r in json.loads((scan_dir / f"rank{k}.json").read_text())]
    accelerator.wait_for_everyone()  # every rank has read the files before the next scan replaces them
    damaged = sorted(
        (DamagedShard(reader.url, r["shard"], r["utterances"], r["reason"]) for r in records), key=lambda d: d.shard
    )
    for shard in damaged:
        log.error(
            "skipping damaged shard %05d of store %s (%d utterances): %s",
            shard.shard,
            shard.store,
            shard.utterances,
            shard.reason,
        )
    if damaged:
        log.warning(
            "training without %d damaged shard(s) of %s: %d of %d utterances left out",
            len(damaged),
            reader.url,
            sum(d.utterances for d in damaged),
            len(reader),
        )
    return damaged, frozenset(i for r in records for i in r["ids"])


def damage_summary(damaged: list[DamagedShard]) -> str:
    """One line for a stage summary: how much data the run left out, and the repair."""
    utterances = sum(d.utterances for d in damaged)
    names = ", ".join(f"{d.shard:05d}" for d in damaged[:5]) + (", ..." if len(damaged) > 5 else "")
    stores = sorted({d.store for d in damaged})
    return (
        f"  skipped {len(damaged)} damaged shard(s) ({utterances} utterances) of {', '.join(stores)}: {names} "
        f"(first: {damaged[0].reason}); delete them and run `whistle precompute` on the store again to "
        "train on all of it"
    )
