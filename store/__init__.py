"""The whistle feature store: teacher states in a Zarr v3 group (format: see store/format.py).

A leaf package: it depends on zarr, numcodecs and numpy only. The torch dataset lives in
`store.dataset` and is not imported here, so that reading a store never imports torch.
"""

from store.format import FORMAT_VERSION, StoreError
from store.inspect import Fault, StoreReport, inspect_store
from store.reader import StoreReader, Utterance
from store.shard_writer import ShardRecord, ShardWriter
from store.spec import StoreSpec, TeacherInfo
from store.writer import StoreWriter

__all__ = [
    "FORMAT_VERSION",
    "Fault",
    "ShardRecord",
    "ShardWriter",
    "StoreError",
    "StoreReader",
    "StoreReport",
    "StoreSpec",
    "StoreWriter",
    "TeacherInfo",
    "Utterance",
    "inspect_store",
]
