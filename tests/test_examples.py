"""The committed example corpora: sizes, reproducible training text, free-form test sets kept apart."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_maker():
    spec = importlib.util.spec_from_file_location("make_corpora", EXAMPLES / "make_corpora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_corpora_sizes_and_consistency():
    maker = load_maker()
    assert maker.check() == []
    sizes = {f"{d}/{s}": len(lines(EXAMPLES / d / f"{s}.txt")) for d in ("source", "target") for s in ("train", "test")}
    assert sizes["source/train"] >= 3000 and sizes["target/train"] >= 1500
    assert sizes["source/test"] >= 100 and sizes["target/test"] >= 100


def test_target_test_sentences_do_not_follow_the_templates():
    """No test sentence is one the templates could produce with any values of their word lists."""
    maker = load_maker()
    drugs = maker.DRUGS
    values = {
        "drug": [d[0] for d in drugs],
        "drug2": [d[0] for d in drugs],
        "dose": [x for d in drugs for x in d[1]],
        "freq": [d[2] for d in drugs],
        "route": [d[3] for d in drugs],
        "condition": maker.CONDITIONS,
        "side_effect": maker.SIDE_EFFECTS,
        "lab": maker.LABS,
        "patient": maker.PATIENTS,
        "clinician": maker.CLINICIANS,
        "duration": maker.DURATIONS,
    }
    slots = {
        name: "(?:" + "|".join(re.escape(v) for v in sorted(set(vs), key=len, reverse=True)) + ")"
        for name, vs in values.items()
    }
    patterns = [
        re.compile("^" + re.sub(r"\\\{(\w+)\\\}", lambda m: slots[m.group(1)], re.escape(t)) + "$", re.IGNORECASE)
        for t in maker.TARGET_TEMPLATES
    ]
    assert patterns[0].match("Mr Okafor takes metoprolol 25 milligrams twice daily.")
    test = lines(EXAMPLES / "target" / "test.txt")
    assert [s for s in test if any(p.match(s) for p in patterns)] == []
    # every drug in the training word lists is spoken in the training text
    train = " ".join(lines(EXAMPLES / "target" / "train.txt")).lower()
    assert all(drug in train for drug, *_ in maker.DRUGS)


def test_vocabulary_keeps_whole_words_then_pieces_in_id_order_without_drug_names(tmp_path):
    import json

    maker = load_maker()
    vocab = {"Ġthe": 5, "Ġmetoprolol": 6, "Ġhospital": 9, "Ġa": 2, "ĠMcC": 3, "ing": 1, "x": 4, "Ġcat": 7, "ro": 8}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"vocab": vocab}}), encoding="utf-8")
    assert maker.vocabulary(path) == ["the", "cat", "hospital", "-ing", "-ro"]
    assert lines(EXAMPLES / "source" / "vocabulary.txt")[:3] == ["the", "and", "that"]
