"""`whistle evaluate`'s decoding aids and rare-word metrics end to end: the prompt ids that reach the
decoder (English-only and multilingual tokenizers), shallow fusion against plain beam search, the LM
built into the output folder, fusion weights chosen on a held-out dev split, term metrics counted by
hand, the CLI, and the configuration's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_tiny_teacher, write_clip
from test_evaluate import scripted_model

from stages.evaluate import run
from whistle_pipeline.cli import cli
from whistle_pipeline.config import ConfigError, load_config
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.fusion import DEFAULT_ALPHAS, lm_words
from whistle_pipeline.ngram import read_arpa


def babbler(path: Path, multilingual: bool = False) -> Path:
    """A tiny random Whisper that writes text tokens only (every special but the end token suppressed),
    so its beam search has words to choose between; multilingual ones get the language and task tables
    generate needs."""
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    make_tiny_teacher(path, multilingual=multilingual)
    model = WhisperForConditionalGeneration.from_pretrained(path)
    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    end = vocab["<|endoftext|>"]
    model.generation_config.suppress_tokens = list(range(end + 1, len(vocab)))
    if multilingual:
        model.generation_config.lang_to_id = {f"<|{code}|>": vocab[f"<|{code}|>"] for code in ("en", "de", "yue")}
        model.generation_config.task_to_id = {task: vocab[f"<|{task}|>"] for task in ("transcribe", "translate")}
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("aid-models")
    return {
        "english": babbler(root / "english"),
        "multilingual": babbler(root / "multilingual", multilingual=True),
        "hello": scripted_model(make_tiny_teacher(root / "teacher"), root / "hello", "hello world", end=True),
    }


# references for the scripted "hello world" model and the terms "there" and "world" (see test_term_metrics)
REFERENCES = {
    "a": "Hello world!",
    "b": "hello there world",
    "c": "Hello.",
    "d": "goodbye world",
    "e": "world",
    "f": "hello hello",
    "g": "there world",
    "h": "hello world world",
}


@pytest.fixture(scope="module")
def audio_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aid-set")
    with open(folder / "manifest.jsonl", "w") as handle:
        for k, (clip_id, text) in enumerate(REFERENCES.items()):
            write_clip(folder / f"{clip_id}.wav", 0.5 + 0.1 * k, 16000, seed=k)
            handle.write(json.dumps({"audio": f"{clip_id}.wav", "text": text, "id": clip_id}) + "\n")
    return folder / "manifest.jsonl"


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aid-texts")
    (folder / "target.txt").write_text(
        "The patient takes warfarin daily.\nWarfarin and apixaban.\nHello world, hello there.\n"
    )
    (folder / "source.txt").write_text("the patient takes it daily and\nhello world there\n")
    return folder


def evaluate(tmp_path, model_specs, audio_set, **settings):
    config = load_config(
        updates={
            "teacher": {"device": "cpu"},
            "data": {"id_column": "id"},
            "evaluate": {
                "models": model_specs,
                "sets": [f"known={audio_set}"],
                "output_dir": str(tmp_path / "eval"),
                "batch_size": 3,
                "max_new_tokens": 8,
                **settings,
            },
        }
    )
    result = run(config)
    return result, json.loads((Path(result.output_dir) / "results.json").read_text())


@pytest.fixture
def decoder_inputs(monkeypatch):
    """The input ids of every WhisperDecoder call while a test runs (transformers' decoder wrapped, so the
    ids that `run` passes to generate are seen without touching its code): a list of (B, T) id lists."""
    from transformers.models.whisper.modeling_whisper import WhisperDecoder

    calls = []
    forward = WhisperDecoder.forward

    def recording_forward(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].tolist())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(WhisperDecoder, "forward", recording_forward)
    return calls


def first_steps(calls) -> set[tuple[int, ...]]:
    """The rows of the first step of every generate call (later steps feed one token each)."""
    return {tuple(row) for ids in calls if len(ids[0]) > 1 for row in ids}


def hand_prompt(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids("<|startofprev|>")] + tokenizer(
        " " + text, add_special_tokens=False
    ).input_ids


@pytest.mark.parametrize("kind", ["english", "multilingual"])
def test_prompt_ids_reach_the_decoder_before_the_start_tokens(models, audio_set, tmp_path, kind, decoder_inputs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models[kind])
    ids = tokenizer.convert_tokens_to_ids
    start = [ids("<|startoftranscript|>")] + ([ids("<|en|>"), ids("<|transcribe|>")] if kind == "multilingual" else [])
    start += [ids("<|notimestamps|>")]
    result, saved = evaluate(tmp_path, [f"m={models[kind]}"], audio_set, prompt="warfarin and apixaban")
    assert [c.label for c in result.columns] == ["m", "m+prompt"]  # the default variants: plain + the aid set
    assert first_steps(decoder_inputs) == {tuple(start), tuple(hand_prompt(tokenizer, "warfarin and apixaban") + start)}
    assert saved["prompt"] == {"origin": "evaluate.prompt", "text": "warfarin and apixaban", "terms": []}
    prompt_column = next(c for c in saved["columns"] if c["label"] == "m+prompt")
    assert prompt_column["prompt_tokens"] == len(hand_prompt(tokenizer, "warfarin and apixaban")) - 1


def test_prompt_from_a_term_file_and_from_a_corpus(models, audio_set, texts, tmp_path, decoder_inputs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["english"])
    start = tuple(tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"]))
    term_file = tmp_path / "terms.txt"
    term_file.write_text("warfarin\napixaban\n")  # most important first: written last, next to the transcript
    evaluate(tmp_path / "file", [f"m={models['english']}"], audio_set, prompt_file=str(term_file), variants=["prompt"])
    assert first_steps(decoder_inputs) == {tuple(hand_prompt(tokenizer, "apixaban, warfarin")) + start}
    decoder_inputs.clear()

    # the words of target.txt that source.txt lacks (the tiny tokenizer's general vocabulary has no word of
    # these), most frequent first, ties alphabetical: warfarin 2, apixaban 1
    _, saved = evaluate(
        tmp_path / "corpus",
        [f"m={models['english']}"],
        audio_set,
        variants=["prompt"],
        prompt_from=str(texts / "target.txt"),
        exclude_from=str(texts / "source.txt"),
    )
    assert saved["prompt"]["terms"] == ["warfarin", "apixaban"]
    assert first_steps(decoder_inputs) == {tuple(hand_prompt(tokenizer, "apixaban, warfarin")) + start}


def test_a_long_prompt_is_cut_to_the_room_max_new_tokens_leaves(models, audio_set, tmp_path, decoder_inputs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["english"])
    words = "the quick brown fox jumps over the lazy dog " * 3
    # 64 decoder positions - 2 start tokens - 50 new tokens - <|startofprev|> = 11 prompt tokens
    _, saved = evaluate(
        tmp_path, [f"m={models['english']}"], audio_set, prompt=words, variants=["prompt"], max_new_tokens=50
    )
    (row,) = first_steps(decoder_inputs)
    prompt = list(row[:-2])
    assert prompt[0] == tokenizer.convert_tokens_to_ids("<|startofprev|>") and len(prompt) - 1 <= 11
    kept = tokenizer.decode(prompt[1:]).split()
    assert kept == words.split()[-len(kept) :]  # whole words, cut from the start
    assert saved["columns"][0]["prompt_tokens"] == len(prompt) - 1
    with pytest.raises(WhistleError, match="leaves no room for a prompt"):
        evaluate(
            tmp_path, [f"m={models['english']}"], audio_set, prompt="warfarin", variants=["prompt"], max_new_tokens=61
        )


def test_fusion_at_zero_weights_is_plain_beam_search_and_its_lm_lands_in_the_output(models, audio_set, texts, tmp_path):
    result, saved = evaluate(
        tmp_path,
        [f"m={models['english']}"],
        audio_set,
        lm=str(texts / "target.txt"),
        lm_alpha=0.0,
        lm_beta=0.0,
        num_beams=4,
        fusion_num_beams=4,
    )
    plain, fused = result.score("m", "known"), result.score("m+fusion", "known")
    assert [c.hypothesis for c in fused.clips] == [c.hypothesis for c in plain.clips]
    assert any(c.hypothesis for c in plain.clips)  # the babbler writes words: the equality says something
    arpa = Path(result.output_dir) / "domain-lm.arpa"
    assert saved["lm"]["path"] == str(arpa) and read_arpa(arpa).order == 3
    assert {"warfarin", "apixaban", "patient"} <= read_arpa(arpa).vocabulary
    assert [(c["label"], c["num_beams"], c["lm_alpha"]) for c in saved["columns"]] == [
        ("m", 4, None),
        ("m+fusion", 4, 0.0),
    ]
    for score in saved["scores"]:
        assert score["decode_seconds_per_clip"] > 0
        assert score["decode_seconds_per_clip"] == pytest.approx(score["decode_seconds"] / score["clips"], abs=1e-3)
    table = (Path(result.output_dir) / "table.md").read_text()
    assert "Decoding seconds per clip (generation only; m: 4 beams, m+fusion: 4 beams)" in table


def test_a_heavy_lm_steers_the_fusion_column(models, audio_set, tmp_path):
    corpus = tmp_path / "lm.txt"
    corpus.write_text("hello world\n" * 5)
    result, _ = evaluate(
        tmp_path,
        [f"m={models['english']}"],
        audio_set,
        lm=str(corpus),
        lm_alpha=10.0,
        lm_beta=5.0,
        lm_top_k=400,
        variants=["plain", "fusion"],
    )
    plain, fused = result.score("m", "known"), result.score("m+fusion", "known")
    assert any(set(c.hypothesis.split()) - {"hello", "world"} for c in plain.clips)
    assert all(set(lm_words(c.hypothesis)) <= {"hello", "world"} for c in fused.clips)


def test_auto_weights_are_chosen_on_clips_held_out_of_the_first_set(models, audio_set, texts, tmp_path):
    result, saved = evaluate(
        tmp_path,
        [f"m={models['english']}"],
        audio_set,
        lm=str(texts / "target.txt"),
        lm_alpha="auto",
        lm_beta=1.0,
        lm_dev_fraction=0.4,
        variants=["fusion"],
        fusion_num_beams=2,
    )
    fit = saved["fusion_fit"]
    dev = fit["dev"]["ids"]
    scored = [c.id for c in result.score("m+fusion", "known").clips]
    assert dev and scored and sorted(dev + scored) == sorted(REFERENCES)  # disjoint, together every clip
    grid = fit["columns"]["m+fusion"]["grid"]
    assert [(point["alpha"], point["beta"]) for point in grid] == [(alpha, 1.0) for alpha in DEFAULT_ALPHAS]
    best = min(grid, key=lambda point: point["dev_wer"])  # min keeps the first of equal WERs, as the fit does
    assert (fit["columns"]["m+fusion"]["alpha"], fit["columns"]["m+fusion"]["beta"]) == (best["alpha"], 1.0)
    assert saved["columns"][0]["lm_alpha"] == best["alpha"]


def test_term_metrics_are_counted_by_hand(models, audio_set, tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("there\nworld\n")
    result, saved = evaluate(tmp_path, [f"scripted={models['hello']}"], audio_set, terms=str(terms))
    score = result.score("scripted", "known")
    assert [c.hypothesis for c in score.clips] == ["hello world"] * len(REFERENCES)
    # per clip: (reference term occurrences, missed, inserted, term words, B errors, other words, U errors)
    # a hello world:         world recognised                                  (1, 0, 0, 1, 0, 1, 0)
    # b hello there world:   "there" deleted, world recognised                 (2, 1, 0, 2, 1, 1, 0)
    # c hello:               world inserted where none was said (B insertion)  (0, 0, 1, 0, 1, 1, 0)
    # d goodbye world:       goodbye -> hello, world recognised                (1, 0, 0, 1, 0, 1, 1)
    # e world:               hello inserted before it                          (1, 0, 0, 1, 0, 0, 1)
    # f hello hello:         hello -> world: a term written, none said          (0, 0, 1, 0, 0, 2, 1)
    # g there world:         there -> hello (missed), world recognised         (2, 1, 0, 2, 1, 0, 0)
    # h hello world world:   one world deleted (missed)                        (2, 1, 0, 2, 1, 1, 0)
    rates = saved["scores"][0]["terms"]
    assert (rates["reference_terms"], rates["missed"], rates["inserted"]) == (9, 3, 2)
    assert (rates["term_words"], rates["term_word_errors"], rates["other_words"], rates["other_word_errors"]) == (
        9,
        4,
        7,
        3,
    )
    assert rates["term_error_rate"] == pytest.approx(3 / 9) and rates["biased_wer"] == pytest.approx(4 / 9)
    assert rates["unbiased_wer"] == pytest.approx(3 / 7) and rates["insertion_rate"] == pytest.approx(2 / 9)
    assert rates["term_word_errors"] + rates["other_word_errors"] == saved["scores"][0]["word_errors"] == 7
    assert saved["terms"] == {"origin": str(terms), "terms": ["there", "world"]}
    assert "| known | 9 | 33.3 (2) 44.4 / 42.9 |" in (Path(result.output_dir) / "table.md").read_text()


def test_terms_derived_from_a_corpus(models, audio_set, texts, tmp_path):
    _, saved = evaluate(
        tmp_path,
        [f"scripted={models['hello']}"],
        audio_set,
        terms_from=str(texts / "target.txt"),
        exclude_from=str(texts / "source.txt"),
        max_terms=1,
    )
    assert saved["terms"]["terms"] == ["warfarin"]
    assert (
        saved["scores"][0]["terms"]["reference_terms"] == 0 and saved["scores"][0]["terms"]["term_error_rate"] is None
    )


def test_cli_with_prompt_and_terms(models, audio_set, tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("world\n")
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            f"scripted={models['hello']}",
            "--audio",
            str(audio_set),
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--max-new-tokens",
            "8",
            "--set",
            "data.id_column=id",
            "--prompt",
            "hello world",
            "--terms",
            str(terms),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| set | clips | scripted | scripted+prompt |" in result.output
    assert "Term error rate % (term insertions) B-WER % / U-WER % (1 term):" in result.output
    assert f"| {audio_set.name} | 8 | " in result.output
    assert json.loads((out / "results.json").read_text())["prompt"]["text"] == "hello world"

    bad = CliRunner().invoke(cli, ["evaluate", str(models["hello"]), "--audio", str(audio_set), "--lm-alpha", "lots"])
    assert bad.exit_code == 2 and "neither a number nor auto" in bad.output
    bad = CliRunner().invoke(
        cli, ["evaluate", str(models["hello"]), "--audio", str(audio_set), "--variants", "plain,promt"]
    )
    assert bad.exit_code == 1 and "unknown variant 'promt' (did you mean 'prompt'?)" in bad.output


def test_config_refuses_every_problem_at_once(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(
            updates={
                "evaluate": {
                    "variants": ["plain", "fusion", "fusion"],
                    "prompt": "x",
                    "prompt_from": "corpus.txt",
                    "prompt_file": str(tmp_path / "missing.txt"),
                    "lm_alpha": -1.0,
                    "lm_beta": "sometimes",
                    "terms": "t.txt",
                    "terms_from": str(tmp_path / "target.txt"),
                    "lm_top_k": 3,
                    "fusion_num_beams": 1,
                    "lm_order": 0,
                }
            }
        )
    problems = caught.value.problems
    expected = [
        "evaluate.lm_beta = 'sometimes' should be a finite number or one of 'auto'",
        "evaluate.lm_order = 0 is below its minimum 1",
        "evaluate.fusion_num_beams = 1 is below its minimum 2",
        "evaluate.variants lists 'fusion' twice",
        "evaluate.prompt, prompt_file and prompt_from each give the prompt: set only one",
        "evaluate.terms and terms_from each give the term list: set only one",
        "evaluate.variants asks for fusion: set evaluate.lm (an ARPA file or a text corpus)",
        'evaluate.lm_alpha = -1.0 must be "auto" or at least 0',
        f"evaluate.prompt_file = {str(tmp_path / 'missing.txt')!r}: no such file",
        "evaluate.terms = 't.txt': no such file",
        "evaluate.prompt_from = 'corpus.txt': no such file",
        f"evaluate.terms_from = {str(tmp_path / 'target.txt')!r}: no such file",
    ]
    assert sorted(problems) == sorted(expected)
    with pytest.raises(ConfigError, match="lm_top_k = 3 is below 2 x evaluate.fusion_num_beams = 8"):
        load_config(updates={"evaluate": {"lm_top_k": 3}})
    with pytest.raises(ConfigError, match="asks for a prompt"):
        load_config(updates={"evaluate": {"variants": ["prompt+fusion"], "lm": "hub/dataset"}})
    with pytest.raises(ConfigError, match="needs a dev split"):
        load_config(updates={"evaluate": {"lm": "hub/dataset", "lm_dev_fraction": 0.0}})
    with pytest.raises(ConfigError, match="exclude_from only filters"):
        load_config(updates={"evaluate": {"exclude_from": "hub/dataset"}})
    config = load_config(updates={"evaluate": {"lm": "hub/dataset", "lm_alpha": 1, "lm_beta": "auto"}})
    assert (config.evaluate.lm_alpha, config.evaluate.lm_beta) == (1.0, "auto")


def test_lm_dev_must_not_be_a_test_set_and_kenlm_binaries_are_refused(models, audio_set, texts, tmp_path):
    with pytest.raises(WhistleError, match="also a test set"):
        evaluate(
            tmp_path,
            [f"m={models['english']}"],
            audio_set,
            lm=str(texts / "target.txt"),
            lm_dev=f"dev={audio_set}",
            variants=["fusion"],
        )
    binary = tmp_path / "lm.bin"
    binary.write_bytes(b"mmap lm http://kheafield.com/code format version 5\0" + bytes(64))
    with pytest.raises(WhistleError, match="not an ARPA file"):
        evaluate(
            tmp_path,
            [f"m={models['english']}"],
            audio_set,
            lm=str(binary),
            variants=["fusion"],
            lm_alpha=0.5,
            lm_beta=0.0,
        )
