"""A full disk (an fsspec filesystem that fails writes with ENOSPC after N bytes, bench/faults.py
`diskfull://`): the run stops with a StoreError naming the store and the cause, no complete shard is
damaged, and a rerun with space completes to the clean store. Failed writes leave nothing (object
stores, zarr's LocalStore) or the bytes that fitted (plain files without atomic writes)."""

from __future__ import annotations

import pytest
from conftest import load_bench

faults = load_bench("faults")


def written_bytes(path) -> int:
    """What precompute wrote (the cache/ folder is a reader's)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "cache" not in p.relative_to(path).parts)


@pytest.mark.timeout(300)  # a writer failure once hung precompute on a semaphore
@pytest.mark.parametrize(
    "where,partial",
    [(0.0, True), (0.004, True), (0.45, False), (0.995, False)],
    ids=["root-partial", "first-shard-partial", "mid-run-atomic", "run-record-atomic"],
)
def test_a_full_disk_stops_the_run_clearly_and_a_rerun_completes(fault_world, tmp_path, where, partial):
    world, clean, reference = fault_world
    limit = int(where * written_bytes(clean))
    trial = faults.disk_full_trial(world, tmp_path, limit, partial, reference)
    assert trial.ok, trial
    assert "the run fitted" not in trial.outcome, trial  # the limit struck


def test_a_file_system_without_locks_stops_with_the_fix_named(tmp_path, monkeypatch):
    """NFS without lockd, some FUSE mounts: flock fails with ENOLCK. The writer must say what is wrong and
    what to do, not raise a bare OSError (or, worse, go on writing without the two-runs-at-once guard)."""
    import errno
    import fcntl

    from conftest import store_spec

    from store import StoreError, StoreWriter

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    writer = StoreWriter.open(tmp_path / "s", store_spec())
    monkeypatch.setattr(fcntl, "flock", no_locks)  # the system call, as such a mount answers it
    with pytest.raises(StoreError, match=r"no working file locks .*No locks available.*one precompute per store"):
        writer.shard(0)
    assert not list((tmp_path / "s").glob("shards/00000/*"))  # nothing was written for the shard
