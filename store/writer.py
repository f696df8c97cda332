"""Writing a feature store: `StoreWriter` opens or creates it, `ShardWriter` fills one shard.

    writer = StoreWriter.open("whistle-store", spec)
    for k in my_shards:                         # k % world_size == rank
        if k in writer.complete_shards():
            continue                            # resume: complete shards are kept
        shard = writer.shard(k)                 # drops an incomplete shard k left by a crash
        for row in rows_of_shard(k):
            shard.add(row.id, row.text, row.language, row.duration, speech_states, tail=tail_states)
        record = shard.close()                  # may run on a thread pool: Blosc releases the GIL

How a shard buffers and writes its arrays: store/shard_writer.py.

Two runs on one store. `shard(k)` first *claims* shard k: on a local store, an OS lock
(fcntl.flock) on STORE/locks/<k>, held until the shard is closed and released by the OS when the
process dies. So a shard another live process is writing is never touched (`claim` says False,
`shard` raises ShardBusy), and an incomplete shard whose lock is free was left by a crash and is
redone. Object stores (s3://, gs://, memory://) have no such lock: one run at a time there.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.errors import ContainsGroupError
from zarr.storage import LocalStore

try:
    import fcntl
except ImportError:  # not POSIX: no shard locks (one run at a time per store)
    fcntl = None

from store.format import (
    ATTRS_KEY,
    SHARDS_GROUP,
    StoreError,
    is_empty,
    open_root,
    open_zarr_store,
    read_json,
    read_shard_attrs,
    run_sync,
    shard_attrs,
    shard_name,
    url_text,
    version_stamp,
    write_json,
)
from store.shard_writer import NON_FINITE_REASON, ShardRecord, ShardWriter
from store.spec import StoreSpec

# ShardWriter and its names are part of the writing API, importable from here as before.
__all__ = ["NON_FINITE_REASON", "ShardBusy", "ShardRecord", "ShardWriter", "StoreWriter"]

log = logging.getLogger(__name__)

RECORD_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.json$")
ROOT_WAIT_TRIES = 20  # x 0.1 s: how long to wait for a root zarr.json another process is writing
LOCKS_DIR = "locks"  # STORE/locks/<shard name>: the OS lock of a shard being written (local stores)


class ShardBusy(StoreError):
    """Another live process is writing this shard, or completed it since this one looked."""


class StoreWriter:
    """One process's handle on a store it adds shards to (see `open`)."""

    def __init__(self, store: Store, root: zarr.Group, spec: StoreSpec, url: str) -> None:
        self.store = store
        self.root = root
        self.spec = spec  # the store's own spec (its codec wins over a requested one on reopen)
        self.url = url
        self._claims: dict[int, Any] = {}  # shard index -> its open lock file (local stores)

    @classmethod
    def open(cls, url: str | os.PathLike | Store, spec: StoreSpec, overwrite: bool = False) -> StoreWriter:
        """Create the store at `url`, or open the existing one if its spec agrees with `spec`.

        Refuses (StoreError) a store whose teacher, frame policy, margin, shard size, dataset
        fingerprint or augmentation differ, listing each difference. `overwrite=True` deletes an
        existing whistle store first (only one process may do that); anything that is not a
        whistle store is never deleted.
        """
        text = url_text(url)
        problems = spec.problems()
        if problems:
            raise StoreError(f"cannot write store {text}, its spec is invalid:\n  - " + "\n  - ".join(problems))
        store = open_zarr_store(url, read_only=False)
        try:
            if overwrite and not is_empty(store):
                try:
                    open_root(store, text)
                except StoreError as err:
                    raise StoreError(
                        f"{err}. overwrite only replaces whistle stores: nothing was deleted; choose another store path"
                    ) from err
                log.info("overwrite: deleting the existing store %s", text)
                run_sync(store.clear())
            root, spec = cls._create_or_reopen(store, spec, text)
            try:
                root.require_group(SHARDS_GROUP)
            except ContainsGroupError:
                pass  # another rank created it between require_group's check and its write
            except ValueError:  # its zarr.json was cut short (a full disk on a store without atomic writes)
                run_sync(store.delete(f"{SHARDS_GROUP}/zarr.json"))
                root.require_group(SHARDS_GROUP)
        except OSError as err:  # a full disk, no permission, a lost mount
            raise StoreError(
                f"cannot write store {text}: {err}. Free space or fix the path, then run again "
                "(complete shards are kept)"
            ) from err
        return cls(store, root, spec, text)

    @staticmethod
    def _create_or_reopen(store: Store, spec: StoreSpec, url: str) -> tuple[zarr.Group, StoreSpec]:
        """Reopen the store if its root exists, else create it; safe when all ranks do it at once."""
        for _ in range(ROOT_WAIT_TRIES):
            names = run_sync(_top_level(store))
            leftovers = [name for name in names if name.endswith(".partial")]
            if set(names) == {"zarr.json", *leftovers} and _unreadable(store, "zarr.json"):
                # a creation whose one write was cut short (a full disk on a store without atomic writes)
                log.warning(
                    "%s holds only the damaged zarr.json of a creation that did not finish: creating it again", url
                )
                run_sync(store.clear())
                return StoreWriter._create(store, spec, url)
            if "zarr.json" in names:
                return StoreWriter._reopen(store, spec, url)
            if not names:
                return StoreWriter._create(store, spec, url)
            if len(leftovers) != len(names):
                break
            time.sleep(0.1)  # LocalStore writes zarr.json as zarr.<uuid>.partial and renames it a moment later
        else:  # only temporary files, for ROOT_WAIT_TRIES x 0.1 s: left by a creation that was killed
            log.warning("%s holds only temporary files of a creation that did not finish: creating it again", url)
            for name in leftovers:
                run_sync(store.delete(name))
            return StoreWriter._create(store, spec, url)
        raise StoreError(
            f"{url} is not empty and is not a whistle store (no zarr.json at its top); "
            "choose a new or empty path for the store"
        )

    @staticmethod
    def _create(store: Store, spec: StoreSpec, url: str) -> tuple[zarr.Group, StoreSpec]:
        attrs = {**spec.to_attrs(), **version_stamp("created"), **version_stamp("updated")}
        try:
            # The attributes go into the group's first and only zarr.json write, so another rank
            # opening the store at the same moment never sees a group without them.
            root = zarr.create_group(store, attributes={ATTRS_KEY: attrs}, overwrite=False)
        except ContainsGroupError:
            return StoreWriter._reopen(store, spec, url)  # another rank created it just now
        log.info("created store %s (format %d, %s frames)", url, attrs["format"], spec.frames)
        return root, spec

    @staticmethod
    def _reopen(store: Store, spec: StoreSpec, url: str) -> tuple[zarr.Group, StoreSpec]:
        root, attrs = open_root(store, url)
        stored = StoreSpec.from_attrs(attrs, url)
        differences = stored.differences(spec)
        if differences:
            raise StoreError(
                f"store {url} was written with a different spec:\n  - "
                + "\n  - ".join(differences)
                + "\nUse a new store path, or --overwrite to replace this store."
            )
        for name in ("codec", "compression_level", "bitround_keepbits", "chunk_frames"):
            if getattr(stored, name) != getattr(spec, name):
                log.warning(
                    "store %s keeps its %s=%r (requested %r applies to new stores only)",
                    url,
                    name,
                    getattr(stored, name),
                    getattr(spec, name),
                )
        root.update_attributes({ATTRS_KEY: {**attrs, **version_stamp("updated")}})
        return root, stored

    def complete_shards(self) -> set[int]:
        """Indices of the shards marked complete (they are skipped on resume)."""
        return {index for index, attrs in shard_attrs(self.root).items() if attrs.get("complete") is True}

    @property
    def locks(self) -> bool:
        """Whether claims are exclusive across processes (an OS lock per shard: local stores on POSIX)."""
        return fcntl is not None and isinstance(self.store, LocalStore)

    def claim(self, index: int) -> bool:
        """Take shard `index` for this process (idempotent); False when another live process is writing
        it or it is complete. The claim lasts until its ShardWriter closes or this process ends."""
        if index in self._claims:
            return True
        handle = None
        if self.locks:
            folder = os.path.join(str(self.store.root), LOCKS_DIR)
            os.makedirs(folder, exist_ok=True)
            handle = open(os.path.join(folder, shard_name(index)), "a")  # noqa: SIM115 — held until release()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            except OSError as err:
                handle.close()
                if err.errno != errno.ENOLCK:
                    raise
                raise StoreError(
                    f"cannot lock {handle.name}: the file system of store {self.url} has no working file locks "
                    f"({err.strerror}). Mount it with locking (NFSv4, or NFSv3 with lockd; Lustre/GPFS with flock), "
                    "or write the store to a local disk or an object store URL and run one precompute per store "
                    "at a time"
                ) from err
        self._claims[index] = handle
        if self._is_complete(index):  # completed by another run since this one listed the shards
            self.release(index)
            return False
        return True

    def release(self, index: int, complete: bool = False) -> None:
        """Give up the claim on shard `index` (ShardWriter does this when it closes or fails)."""
        handle = self._claims.pop(index, None)
        if handle is None:
            return
        if complete:  # no one writes it again: whoever locks the old or a new file next sees it complete
            os.unlink(handle.name)
        handle.close()  # closing the file releases the lock

    def _is_complete(self, index: int) -> bool:
        attrs = read_shard_attrs(self.store, index)
        return attrs is not None and attrs.get("complete") is True

    def shard(self, index: int) -> ShardWriter:
        """A writer for shard `index`, replacing an incomplete shard `index` left by an earlier run.

        Raises ShardBusy when another live process holds the shard (see `claim`)."""
        name = shard_name(index)
        if not self.claim(index):
            state = (
                "is already complete; skip it (see StoreWriter.complete_shards())"
                if self._is_complete(index)
                else "is being written by another process; skip it"
            )
            raise ShardBusy(f"shard {name} of store {self.url} {state}")
        if read_shard_attrs(self.store, index) is not None:  # this shard only: no store listing
            # incomplete (claim checked), and no live process holds it: left by a crashed run
            log.info("deleting incomplete shard %s of %s (it will be written again)", name, self.url)
            run_sync(self.store.delete_dir(f"{SHARDS_GROUP}/{name}"))
        try:
            return ShardWriter(self, index)
        except OSError as err:
            self.release(index)
            raise StoreError(
                f"starting shard {name} of store {self.url} failed ({err}); free space or fix the "
                "store, then run again (complete shards are kept)"
            ) from err

    def write_record(self, name: str, data: dict[str, Any]) -> None:
        """Store a JSON run record (e.g. "precompute.json") in the store root, replacing an older one."""
        if not RECORD_NAME.match(name) or name == "zarr.json":
            raise ValueError(f"record name must look like 'precompute.json' (letters, digits, ._-), got {name!r}")
        try:
            write_json(self.store, name, data)
        except OSError as err:
            raise StoreError(
                f"writing the run record {name} of store {self.url} failed ({err}); the shards are "
                "written: free space and run again to rewrite it"
            ) from err


def _unreadable(store: Store, key: str) -> bool:
    try:
        read_json(store, key)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return True
    return False


async def _top_level(store: Store) -> list[str]:
    try:
        return [name async for name in store.list_dir("")]
    except FileNotFoundError:
        return []
