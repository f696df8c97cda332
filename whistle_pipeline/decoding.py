"""The decoding aids `whistle evaluate` puts beside each model: decoder prompts, shallow fusion with a
domain n-gram LM, and the domain terms both can be derived from (also the term metrics' list).

    variants = resolve_variants(config.evaluate)             # e.g. ["plain", "prompt", "fusion"]
    aids, record = prepare_aids(config, variants, models[0].tokenizer, output_dir)
    columns = build_columns(models, variants, aids, config.evaluate, {"tiny+fusion": (0.25, 1.0)})

A *variant* is one way of decoding, applied to every model, each its own column:

    plain           MODEL                 evaluate.num_beams (1 = greedy)
    prompt          MODEL+prompt          the prompt as Whisper's prompt_ids, evaluate.num_beams
    fusion          MODEL+fusion          beam search (evaluate.fusion_num_beams) + `fusion.ShallowFusion`
    prompt+fusion   MODEL+prompt+fusion   both

Domain terms (`derive_terms`): the words of a text corpus that the model's *general vocabulary* and an
optional exclusion corpus (the source text) lack, most frequent first (`prompting.domain_terms`). The
general vocabulary is every word Whisper's tokenizer writes as one token after a space: byte-level BPE
gives the frequent words of Whisper's training text one piece each (about 33,000 in GPT-2's vocabulary),
while rare words such as drug names take several. It is read from the first model's tokenizer, so every
column gets the same terms.

Prompt budget. transformers refuses a prompt whose length plus the start tokens plus max_new_tokens passes
the decoder's positions (448), and Whisper saw at most 223 prompt tokens; `prompt_room` gives the smaller
of the two, and a longer prompt is cut from its start (a term list loses its least important terms), with
a logged warning. A max_new_tokens that leaves no room is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whistle_pipeline.config import EvaluateConfig, PipelineConfig
from whistle_pipeline.corpus import is_held_out, read_corpus
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.fusion import (
    DEFAULT_ALPHAS,
    DEFAULT_BETAS,
    SPACE_PIECE,
    FusionFit,
    ShallowFusion,
    build_domain_lm,
    fit_alpha_beta,
)
from whistle_pipeline.ngram import load_scorer
from whistle_pipeline.prompting import (
    domain_terms,
    prompt_budget,
    prompt_from_terms,
    prompt_ids,
)
from whistle_pipeline.sources import Clip
from whistle_pipeline.text import text_tokens
from whistle_pipeline.transcribe import Column, Decoding, LoadedModel, start_tokens

log = logging.getLogger(__name__)

MAX_TERM_WORDS = 4  # a prompt file whose lines are all this short (and end no sentence) is a term list
SENTENCE_ENDS = (".", "!", "?")
LM_FILE = "domain-lm.arpa"  # where an LM built from a corpus goes, in the output folder
ARPA_HEADER = "\\data\\"
DEV_SEED = 0  # the hash seed that holds dev clips out of the first set


def resolve_variants(settings: EvaluateConfig) -> list[str]:
    """evaluate.variants, or (when empty) plain plus each aid that is configured on its own."""
    if not settings.variants:
        return ["plain"] + ["prompt"] * settings.prompt_given + ["fusion"] * bool(settings.lm)
    if settings.prompt_given and not any("prompt" in v for v in settings.variants):
        log.warning("a prompt is set, but no variant in evaluate.variants uses it: no column is prompted")
    if settings.lm and not any("fusion" in v for v in settings.variants):
        log.warning("evaluate.lm is set, but no variant in evaluate.variants uses fusion: it is not read")
    return list(settings.variants)


def column_label(model_label: str, variant: str) -> str:
    return model_label if variant == "plain" else f"{model_label}+{variant}"


# ---- domain terms and prompts ---------------------------------------------------------------------


def general_vocabulary(tokenizer: Any) -> list[str]:
    """The words `tokenizer` writes as a single token after a space (see the module docstring)."""
    pieces = [piece for piece in tokenizer.get_vocab() if piece.startswith(SPACE_PIECE) and len(piece) > 1]
    return [tokenizer.convert_tokens_to_string([piece]).strip() for piece in pieces]


def read_text_rows(path: str, config: PipelineConfig) -> list[str]:
    """The sentences of a text corpus, read as finetune.text is (its text column and split)."""
    settings = config.finetune
    corpus = read_corpus(
        path, text_column=settings.text_column, language=config.data.language, split=settings.text_split
    )
    log.info("read %s", corpus.summary())
    return [row.text for row in corpus.rows]


def derive_terms(path: str, tokenizer: Any, config: PipelineConfig, max_terms: int | None = None) -> list[str]:
    """Domain terms of the corpus at `path`: its words that the tokenizer's general vocabulary and the
    evaluate.exclude_from corpus lack, most frequent first, at most `max_terms` (None: all)."""
    settings = config.evaluate
    excluded = read_text_rows(settings.exclude_from, config) if settings.exclude_from else []
    terms = domain_terms(
        read_text_rows(path, config), general_vocabulary(tokenizer), excluded, max_terms, config.data.language
    )
    if not terms:
        raise WhistleError(
            f"{path} has no word that {settings.exclude_from or 'the general vocabulary'} lacks: "
            "no domain term to derive"
        )
    return terms


def read_lines(path: str) -> list[str]:
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise WhistleError(f"cannot read {path}: {err}") from err


@dataclass(frozen=True)
class PromptSource:
    """A prompt as free text or as terms (most important first), and where it came from."""

    origin: str
    text: str = ""
    terms: tuple[str, ...] = ()

    def ids(self, tokenizer: Any, budget: int) -> list[int]:
        """<|startofprev|> + at most `budget` text tokens (`prompting.prompt_ids` / `prompt_from_terms`)."""
        if self.terms:
            return prompt_from_terms(tokenizer, self.terms, budget)
        if len(text_tokens(tokenizer, self.text)) > budget:
            log.warning(
                "the prompt (%s) is longer than the %d tokens that fit: its first words are cut", self.origin, budget
            )
        return prompt_ids(tokenizer, self.text, budget)


def prompt_source(config: PipelineConfig, tokenizer: Any) -> PromptSource | None:
    """The configured prompt (evaluate.prompt, prompt_file or prompt_from), or None."""
    settings = config.evaluate
    if settings.prompt:
        return PromptSource(origin="evaluate.prompt", text=settings.prompt)
    if settings.prompt_from:
        terms = derive_terms(settings.prompt_from, tokenizer, config)
        return PromptSource(origin=f"{len(terms)} terms derived from {settings.prompt_from}", terms=tuple(terms))
    if settings.prompt_file:
        lines = read_lines(settings.prompt_file)
        if len(lines) > 1 and all(
            len(line.split()) <= MAX_TERM_WORDS and not line.endswith(SENTENCE_ENDS) for line in lines
        ):
            return PromptSource(origin=f"term list {settings.prompt_file}", terms=tuple(lines))
        return PromptSource(origin=f"text of {settings.prompt_file}", text=" ".join(lines))
    return None


def term_list(config: PipelineConfig, tokenizer: Any) -> tuple[str, list[str]] | None:
    """(origin, terms) for the term metrics (evaluate.terms or terms_from), or None."""
    settings = config.evaluate
    if settings.terms:
        terms = [line for line in read_lines(settings.terms) if not line.startswith("#")]
        if not terms:
            raise WhistleError(f"evaluate.terms = {settings.terms}: the file lists no term")
        return settings.terms, terms
    if settings.terms_from:
        return (
            f"derived from {settings.terms_from}",
            derive_terms(settings.terms_from, tokenizer, config, settings.max_terms or None),
        )
    return None


def prompt_room(model: LoadedModel, max_new_tokens: int) -> int:
    """Text tokens a prompt may have for `model`: Whisper's budget, or less where max_new_tokens needs the
    positions (transformers refuses prompt + start tokens + max_new_tokens > max_target_positions)."""
    positions = model.model.config.max_target_positions
    room = positions - start_tokens(model) - max_new_tokens - 1  # 1: <|startofprev|>
    if room < 1:
        raise WhistleError(
            f"evaluate.max_new_tokens = {max_new_tokens} leaves no room for a prompt in "
            f"{model.named.label}'s {positions} decoder positions: lower it"
        )
    budget = prompt_budget(positions)
    if room < budget:
        log.info(
            "%s: prompts get at most %d tokens (not %d), leaving %d positions for the transcript",
            model.named.label,
            room,
            budget,
            max_new_tokens,
        )
    return min(room, budget)


# ---- shallow fusion -------------------------------------------------------------------------------


def is_arpa(path: str) -> bool:
    """Whether the file at `path` is an ARPA LM (its first non-empty line is \\data\\)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                return line.strip() == ARPA_HEADER
    return False


def domain_lm(config: PipelineConfig, output_dir: Path) -> tuple[Path, str]:
    """(ARPA path, how it was made): evaluate.lm itself if it is an ARPA file, else an LM of order
    evaluate.lm_order built from the corpus evaluate.lm names, written to output_dir/domain-lm.arpa."""
    settings = config.evaluate
    if Path(settings.lm).is_file() and is_arpa(settings.lm):
        return Path(settings.lm), "given"
    if Path(settings.lm).suffix.lower() in (".arpa", ".bin", ".binary", ".klm"):
        raise WhistleError(
            f"evaluate.lm = {settings.lm}: not an ARPA file. Fusion needs the LM's word list, "
            "which a KenLM binary does not give back: use the ARPA file it was built from"
        )
    texts = read_text_rows(settings.lm, config)
    path = build_domain_lm(texts, output_dir / LM_FILE, settings.lm_order, config.data.language)
    log.info("built a %d-gram LM of %d sentences of %s: %s", settings.lm_order, len(texts), settings.lm, path)
    return path, f"built from {settings.lm} (order {settings.lm_order})"


@dataclass
class Aids:
    """The prompt, the LM scorer and the normaliser's language the columns share."""

    prompt: PromptSource | None
    scorer: Any  # ngram.ArpaScorer or KenlmScorer; None without fusion
    language: str
    _prompt_ids: dict[str, tuple[int, ...]] = field(default_factory=dict, init=False, repr=False)  # by model label

    def prompt_ids(self, model: LoadedModel, max_new_tokens: int) -> tuple[int, ...]:
        """The prompt in `model`'s tokens, cut to the room it has (built once per model)."""
        if model.named.label not in self._prompt_ids:
            budget = prompt_room(model, max_new_tokens)
            self._prompt_ids[model.named.label] = tuple(self.prompt.ids(model.tokenizer, budget))
        return self._prompt_ids[model.named.label]


def prepare_aids(
    config: PipelineConfig, variants: Sequence[str], tokenizer: Any, output_dir: Path
) -> tuple[Aids, dict[str, Any]]:
    """The aids the variants need, and a record of them for results.json."""
    record: dict[str, Any] = {}
    prompt = prompt_source(config, tokenizer) if any("prompt" in v for v in variants) else None
    scorer = None
    if prompt is not None:
        record["prompt"] = {"origin": prompt.origin, "text": prompt.text, "terms": list(prompt.terms)}
    if any("fusion" in v for v in variants):
        path, made = domain_lm(config, output_dir)
        scorer = load_scorer(path)
        record["lm"] = {
            "path": str(path),
            "made": made,
            "order": scorer.order,
            "backend": type(scorer).__name__,
            "words": len(scorer.vocabulary),
        }
    return Aids(prompt=prompt, scorer=scorer, language=config.data.language), record


def fusion_top_k(settings: EvaluateConfig) -> int:
    return settings.lm_top_k or 2 * settings.fusion_num_beams


def decoding(
    model: LoadedModel, variant: str, aids: Aids, settings: EvaluateConfig, weights: tuple[float, float] = (0.0, 0.0)
) -> Decoding:
    """How `model` decodes in `variant`; `weights` (alpha, beta) for the fusion variants."""
    prompt = ()
    if "prompt" in variant:
        prompt = aids.prompt_ids(model, settings.max_new_tokens)
    if "fusion" not in variant:
        return Decoding(num_beams=settings.num_beams, prompt_ids=prompt)
    fusion = ShallowFusion(
        aids.scorer,
        model.tokenizer,
        alpha=weights[0],
        beta=weights[1],
        language=aids.language,
        top_k=fusion_top_k(settings),
    )
    return Decoding(num_beams=settings.fusion_num_beams, prompt_ids=prompt, logits_processors=(fusion,))


def build_columns(
    models: Sequence[LoadedModel],
    variants: Sequence[str],
    aids: Aids,
    settings: EvaluateConfig,
    weights: dict[str, tuple[float, float]],
) -> list[Column]:
    """One column per model and variant, models outer: MODEL, MODEL+prompt, ...; `weights`: (alpha, beta)
    by label, for each fusion column."""
    columns = []
    for model in models:
        for variant in variants:
            label = column_label(model.named.label, variant)
            pair = weights[label] if "fusion" in variant else (0.0, 0.0)
            columns.append(Column(label=label, model=model, decoding=decoding(model, variant, aids, settings, pair)))
    return columns


# ---- alpha and beta on a dev split ----------------------------------------------------------------


def dev_split(clips: Sequence[Clip], fraction: float) -> tuple[list[Clip], list[Clip]]:
    """(kept, dev): `fraction` of the clips by a stable hash of their ids, so a rerun holds out the same."""
    kept, dev = [], []
    for clip in clips:
        (dev if is_held_out(clip.id, fraction, DEV_SEED) else kept).append(clip)
    return kept, dev


def weight_grid(settings: EvaluateConfig) -> list[tuple[float, float]]:
    """The (alpha, beta) pairs to try: the default grid for an "auto" weight, the number itself otherwise."""
    alphas = DEFAULT_ALPHAS if settings.lm_alpha == "auto" else (settings.lm_alpha,)
    betas = DEFAULT_BETAS if settings.lm_beta == "auto" else (settings.lm_beta,)
    return [(alpha, beta) for alpha in alphas for beta in betas]


def grid_columns(
    models: Sequence[LoadedModel], variants: Sequence[str], aids: Aids, settings: EvaluateConfig
) -> dict[str, dict[tuple[float, float], Column]]:
    """Per fusion column label: a column for each (alpha, beta) of the grid, to decode the dev split with."""
    grids: dict[str, dict[tuple[float, float], Column]] = {}
    for model in models:
        for variant in (v for v in variants if "fusion" in v):
            label = column_label(model.named.label, variant)
            grids[label] = {
                pair: Column(
                    label=f"{label}@{pair[0]:g},{pair[1]:g}",
                    model=model,
                    decoding=decoding(model, variant, aids, settings, pair),
                )
                for pair in weight_grid(settings)
            }
    return grids


def pick_weights(
    grids: dict[str, dict[tuple[float, float], Column]], wer_of: Callable[[str], float]
) -> dict[str, FusionFit]:
    """Per fusion column: the grid's (alpha, beta) with the lowest dev WER (`wer_of(grid column label)`)."""
    fits = {}
    for label, grid in grids.items():
        alphas = list(dict.fromkeys(alpha for alpha, _ in grid))
        betas = list(dict.fromkeys(beta for _, beta in grid))
        fits[label] = fit_alpha_beta(lambda alpha, beta, g=grid: wer_of(g[(alpha, beta)].label), alphas, betas)
        log.info("%s: alpha %g, beta %g (dev WER %.3f)", label, fits[label].alpha, fits[label].beta, fits[label].wer)
    return fits
