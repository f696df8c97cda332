"""Security rules, checked on the code and on hostile files: nothing whistle reads can run code.

(a) the source of whistle_pipeline/, stages/ and store/ (parsed with ast, so comments and strings do
    not count): no pickle-family import, torch.load only with weights_only=True, no allow_pickle=True,
    no trust_remote_code=True, no eval/exec, and every model from_pretrained with use_safetensors=True;
(b) a store whose attributes, run records or arrays carry a pickle payload: read as data, or refused
    with a StoreError, never unpickled;
(c) a TLE or Whisper folder holding only a pickled pytorch_model.bin: refused with a WhistleError
    naming the folder, never unpickled (even torch's own loader, the fallback, refuses it);
(d) checkpoints are safetensors + JSON only, and resume from them exactly.

The payload is a real pickle whose __reduce__ would create a marker file; every test asserts the
marker never appears.
"""

from __future__ import annotations

import ast
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_teacher, store_spec, synthetic_utterances, write_synthetic_store

from store import StoreError, StoreReader, inspect_store
from whistle_pipeline.errors import WhistleError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("whistle_pipeline", "stages", "store")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "pickletools"}
NOT_MODELS = {
    "AutoTokenizer",
    "AutoProcessor",
    "WhisperConfig",
    "WhisperFeatureExtractor",
    "WhisperProcessor",
    "WhisperTokenizer",
    "WhisperTokenizerFast",
    "GenerationConfig",
    "TeacherGeometry",
    "AutoConfig",
    "cls",
}


class Payload:
    """Unpickling this creates `marker` (what an attacker's file would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weight": Payload(marker)})


# --- (a) the source --------------------------------------------------------------------------------


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def source_violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"{where}:{node.lineno} imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}:{node.lineno} imports from {node.module}")
    for call in _calls(tree):
        name = _dotted(call.func)
        if name == "torch.load" and not _is_true(_keyword(call, "weights_only")):
            found.append(f"{where}:{call.lineno} torch.load without weights_only=True")
        if _is_true(_keyword(call, "allow_pickle")):
            found.append(f"{where}:{call.lineno} {name}(allow_pickle=True)")
        if _is_true(_keyword(call, "trust_remote_code")):
            found.append(f"{where}:{call.lineno} {name}(trust_remote_code=True)")
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            found.append(f"{where}:{call.lineno} {name}()")
        if (
            name.endswith(".from_pretrained")
            and name.split(".")[-2] not in NOT_MODELS
            and not _is_true(_keyword(call, "use_safetensors"))
        ):
            found.append(f"{where}:{call.lineno} {name} without use_safetensors=True")
    return found


def test_source_follows_the_security_rules():
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 20  # the scan sees the packages
    violations = [v for path in files for v in source_violations(path)]
    assert violations == []


def test_the_scan_catches_each_rule(tmp_path):
    """The checker itself: each forbidden form is reported, a comment or string mentioning it is not."""
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import pickle\nfrom joblib import load\nimport torch, numpy as np\n"
        "torch.load('x.pt')\ntorch.load('x.pt', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n"
        "WhisperForConditionalGeneration.from_pretrained('m')\nAutoTokenizer.from_pretrained('m')\n"
        "load_dataset('x', trust_remote_code=True)\neval('1')\n"
        "# torch.load('y') in a comment\ntext = 'import pickle; torch.load(z)'\n"
        "torch.load('ok.pt', weights_only=True)\nTLEModel.from_pretrained('t', use_safetensors=True)\n"
    )
    found = source_violations(bad)
    assert [v.split(" ", 1)[0].rsplit(":", 1)[1] for v in found] == ["1", "2", "4", "5", "6", "7", "9", "10"], found


# --- (b) stores --------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    spec = store_spec(shard_size=3, chunk_frames=64)
    url = tmp_path / "store"
    write_synthetic_store(url, spec, synthetic_utterances(spec, 6, seed=1))  # shards 0 and 1
    return url


def _edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_pickle_payloads_in_store_json_are_read_as_plain_text(store, tmp_path):
    marker = tmp_path / "MARKER"
    payload = evil_pickle(marker).decode("latin-1")  # a pickle smuggled in as text
    _edit_json(store / "zarr.json", lambda d: d["attributes"]["whistle"]["teacher"].update(name_or_path=payload))
    _edit_json(
        store / "shards" / "00000" / "zarr.json",
        lambda d: d["attributes"]["rejects"].append({"id": payload, "reason": f"bad audio: {payload}"}),
    )
    record = {"__reduce__": payload, "py/object": "os.system", "args": ["touch " + str(marker)]}
    (store / "precompute.json").write_text(json.dumps(record))

    reader = StoreReader(str(store))
    assert reader.teacher.name_or_path == payload
    assert reader.record("precompute.json") == record
    assert reader.shard_attrs(0)["rejects"][-1]["id"] == payload
    assert [u.id for u in reader.iter_shard(0)] == ["utt0000", "utt0001", "utt0002"]
    report = inspect_store(store, check=True)
    assert report.complete_shards == 2 and payload[:10] in report.to_text()
    assert not marker.exists()


def test_a_run_record_that_is_a_pickle_is_refused(store, tmp_path):
    marker = tmp_path / "MARKER"
    (store / "precompute.json").write_bytes(evil_pickle(marker))
    with pytest.raises(StoreError, match="precompute.json .*not JSON"):
        StoreReader(str(store)).record("precompute.json")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["v3-pickle-codec", "v3-object-dtype", "v2-pickle-array"])
def test_an_array_that_asks_for_unpickling_is_refused(store, tmp_path, how):
    marker = tmp_path / "MARKER"
    ids = store / "shards" / "00000" / "ids"
    if how == "v2-pickle-array":  # a Zarr v2 object array with the numcodecs pickle codec, in place of ids
        shutil.rmtree(ids)
        ids.mkdir()
        (ids / ".zarray").write_text(
            json.dumps(
                {
                    "zarr_format": 2,
                    "shape": [3],
                    "chunks": [3],
                    "dtype": "|O",
                    "compressor": None,
                    "fill_value": None,
                    "filters": [{"id": "pickle"}],
                    "order": "C",
                    "dimension_separator": ".",
                }
            )
        )
        (ids / "0").write_bytes(pickle.dumps(np.array([Payload(marker)] * 3, dtype=object)))
    else:

        def change(document):
            if how == "v3-pickle-codec":
                document["codecs"] = [{"name": "numcodecs.pickle", "configuration": {}}]
            else:
                document["data_type"] = "object"

        _edit_json(ids / "zarr.json", change)
        for chunk in (ids / "c").rglob("*"):
            if chunk.is_file():
                chunk.write_bytes(pickle.dumps(np.array([Payload(marker)] * 3, dtype=object)))
    reader = StoreReader(str(store))
    with pytest.raises(StoreError, match="shard 00000 .* is damaged"):
        list(reader.iter_shard(0))
    faults = inspect_store(store, check=True).faults
    assert [f.shard for f in faults] == ["00000"]
    assert [u.id for u in reader.iter_shard(1)] == ["utt0003", "utt0004", "utt0005"]  # the other shard reads
    assert not marker.exists()


# --- (c) model folders holding a pickle ------------------------------------------------------------


@pytest.fixture(scope="module")
def pickled_whisper(tmp_path_factory):
    """A complete Whisper folder (config, tokenizer, extractor) whose weights are only a hostile pickle."""
    folder = make_tiny_teacher(tmp_path_factory.mktemp("pickled-whisper") / "teacher")
    (folder / "model.safetensors").unlink()
    marker = folder.parent / "MARKER"
    (folder / "pytorch_model.bin").write_bytes(evil_pickle(marker))
    return folder, marker


def test_whisper_folders_holding_only_a_pickle_are_refused_by_every_loader(pickled_whisper):
    from whistle_pipeline.decoder import load_frozen_teacher
    from whistle_pipeline.teacher import load_encoder, load_teacher
    from whistle_pipeline.transcribe import Named, load_model

    folder, marker = pickled_whisper
    loaders = {
        "precompute's encoder": lambda: load_encoder(str(folder), "main", "cpu", torch.float32, "eager"),
        "train-tle's teacher": lambda: load_frozen_teacher(str(folder), "main", "cpu", torch.float32),
        "finetune's teacher": lambda: load_teacher(str(folder), "main", "full", "cpu", torch.float32),
        "evaluate's model": lambda: load_model(
            Named(label="adapted", path=str(folder)), "main", "cpu", "float32", "eager"
        ),
    }
    for what, load in loaders.items():
        with pytest.raises(WhistleError, match="model.safetensors") as caught:
            load()
        assert str(folder) in str(caught.value), what
    assert not marker.exists()


def test_a_tle_folder_holding_only_a_pickle_is_refused(tmp_path):
    from test_tle import tiny_tle

    from stages.finetune_data import load_tle
    from store import TeacherInfo

    folder = tmp_path / "tle"
    tiny_tle().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    (folder / "pytorch_model.bin").write_bytes(evil_pickle(marker))
    teacher = TeacherInfo("t", "main", 8, 80, 16000, 320, 50, 30)
    with pytest.raises(WhistleError, match=f"cannot load the TLE from '{re.escape(str(folder))}'.*model.safetensors"):
        load_tle(str(folder), teacher, "cpu")
    # the second line of defence, had a loader asked for the pickle: torch's restricted unpickler refuses it
    with pytest.raises(pickle.UnpicklingError):
        torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert not marker.exists()


# --- (d) checkpoints ---------------------------------------------------------------------------------


def _trained(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    settings = type("Settings", (), dict(weight_decay=0.01, learning_rate=1e-2, warmup_steps=2, steps=10))
    from stages.training import build_optimizer

    optimizer, scheduler = build_optimizer(model, settings)
    return model, optimizer, scheduler


def test_checkpoints_are_safetensors_and_json_and_resume_exactly(tmp_path):
    from accelerate import Accelerator
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from stages.training import latest_checkpoint, load_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = _trained(0)
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    def write_weights(folder):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))

    save_checkpoint(accelerator, tmp_path, 3, {"position": 7}, write_weights, optimizer, scheduler, keep=1)
    folder = latest_checkpoint(tmp_path)
    for path in folder.iterdir():  # every file parses as what its name says: no pickle, no torch.save zip
        assert path.suffix in (".safetensors", ".json") or path.name == "COMPLETE", path
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                assert list(handle.keys())
        else:
            json.loads(path.read_text())

    expected = torch.randn(1)  # the RNG draw that follows the checkpoint
    resumed, resumed_optimizer, resumed_scheduler = _trained(1)  # other weights and a fresh optimiser
    torch.manual_seed(123)
    state = load_checkpoint(accelerator, folder, resumed_optimizer, resumed_scheduler, "train_tle")
    resumed.load_state_dict(load_file(str(folder / "model.safetensors")))
    assert state == {"step": 3, "position": 7}
    assert torch.equal(torch.randn(1), expected)
    assert resumed_scheduler.state_dict() == scheduler.state_dict()
    batch = torch.randn(5, 4)
    for net, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        net(batch).square().mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # same weights, same Adam moments and step counts


# --- (d) model folders holding non-finite weights -----------------------------------------------------


def _poison(weights_file, names: list[str]) -> None:
    """Set the first value of each named tensor of a safetensors file to NaN."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights_file))
    for name in names:
        tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(weights_file), metadata={"format": "pt"})


def test_whisper_folders_with_nan_weights_are_refused_by_every_loader_naming_the_count(tmp_path):
    from whistle_pipeline.decoder import load_frozen_teacher
    from whistle_pipeline.teacher import load_encoder, load_teacher
    from whistle_pipeline.transcribe import Named, load_model

    folder = make_tiny_teacher(tmp_path / "teacher")
    _poison(folder / "model.safetensors", ["model.encoder.layers.0.fc1.weight", "model.decoder.layers.1.fc2.bias"])
    loaders = {  # what each loads: the encoder, the decoder (train-tle drops the encoder), or both
        "precompute's encoder": (
            lambda: load_encoder(str(folder), "main", "cpu", torch.float32, "eager"),
            "1",
            "fc1.weight",
        ),
        "train-tle's teacher": (
            lambda: load_frozen_teacher(str(folder), "main", "cpu", torch.float32),
            "1",
            "fc2.bias",
        ),
        "finetune's teacher": (
            lambda: load_teacher(str(folder), "main", "full", "cpu", torch.float32),
            "2",
            "fc1.weight",
        ),
        "evaluate's model": (
            lambda: load_model(Named(label="adapted", path=str(folder)), "main", "cpu", "float32", "eager"),
            "2",
            "fc1.weight",
        ),
    }
    for what, (load, bad, named) in loaders.items():
        with pytest.raises(
            WhistleError,
            match=f"{re.escape(str(folder))}.* has non-finite weights: {bad} of its "
            r"\d+ tensors hold inf/nan",
        ) as caught:
            load()
        assert named in str(caught.value), what


def test_a_tle_with_nan_weights_is_refused(tmp_path):
    from test_tle import tiny_tle

    from stages.finetune_data import load_tle
    from store import TeacherInfo

    folder = tmp_path / "tle"
    tiny_tle().save_pretrained(folder)
    _poison(folder / "model.safetensors", ["prior.weight", "prior.bias", "text_norm.weight"])
    teacher = TeacherInfo("t", "main", 8, 80, 16000, 320, 50, 30)
    with pytest.raises(WhistleError, match=f"the TLE in {re.escape(str(folder))} has non-finite weights: 3 of its"):
        load_tle(str(folder), teacher, "cpu")
