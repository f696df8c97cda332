"""The library surface documented in the README resolves to the real objects."""

import subprocess
import sys

import whistle_pipeline


def test_every_export_resolves():
    for name in whistle_pipeline.__all__:
        assert getattr(whistle_pipeline, name) is not None, name
    from store.reader import StoreReader
    from whistle_pipeline.tle import TLEModel

    assert whistle_pipeline.TLEModel is TLEModel
    assert whistle_pipeline.StoreReader is StoreReader


def test_import_is_cheap():
    code = (
        "import sys, whistle_pipeline; print(sorted(m for m in ('torch', 'transformers', 'zarr') if m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )
