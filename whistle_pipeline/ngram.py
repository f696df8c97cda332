"""Word n-gram language models: an interpolated modified Kneser-Ney builder, ARPA files, two scorers.

KenLM (`pip install kenlm`, the `fusion` extra) only *queries* models; building one needs its `lmplz`
binary, which the pip package does not ship. So whistle builds small domain LMs itself and writes a
standard ARPA file that KenLM, SRILM or `ArpaScorer` all read.

The estimate (Chen & Goodman 1998, as KenLM's lmplz computes it). Each sentence is padded as
`<s> w_1 ... w_k </s>`. For order N:

- *adjusted counts* a(g): the raw count for N-grams and for n-grams starting with <s> (nothing can
  precede <s>); for every other lower-order n-gram, the number of distinct words seen just before it.
- *discounts* per order from the counts of adjusted counts t_k (n-grams with a(g) = k):
  Y = t_1 / (t_1 + 2 t_2), D_1 = 1 - 2Y t_2/t_1, D_2 = 2 - 3Y t_3/t_2, D_3+ = 3 - 4Y t_4/t_3. Where
  some t_k is 0 or a D_k falls outside (0, k] (tiny corpora), that order uses one discount for all
  counts: Y if 0 < Y < 1, else 0.5 (logged). `build_kneser_ney(..., discount=D)` fixes D everywhere.
- *probabilities*, for a context h of n-1 words and h' = h without its first word:
  p(w | h) = max(a(hw) - D(a(hw)), 0) / S(h) + g(h) p(w | h'),   S(h) = sum over x of a(hx),
  g(h) = (D_1 N_1(h) + D_2 N_2(h) + D_3+ N_3+(h)) / S(h),        N_k(h) = words x with a(hx) = k (3+: >= 3),
  and for unigrams p(w) = max(a(w) - D(a(w)), 0) / S + g / |V|, V = the words seen, </s> and <unk>
  (never <s>, which is never predicted: ARPA's -99). <unk> gets g / |V|: every unseen word's share.

The ARPA file stores log10 p(w | h) for every seen n-gram and log10 g(h) as the backoff weight of each
context h; a query backs off as usual: p(w | h) = g(h) p(w | h') when hw was not seen, which is the
interpolated formula above because g(h) p(w | h') is exactly what an unseen hw gets.

Cost: building is O(tokens x N) time and memory for the counts (fine for the tens of thousands of
domain sentences whistle fine-tunes on, not for web-scale text); a query is at most N dictionary look-ups
(`ArpaScorer`) or one KenLM call (`KenlmScorer`, about 10x faster).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from whistle_pipeline.errors import WhistleError

log = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
NEVER = -99.0  # ARPA's log10 probability for <s>, which is never predicted
Ngram = tuple[str, ...]


@dataclass
class NgramModel:
    """An n-gram LM as an ARPA file holds it. log10_probs[n - 1] maps each n-gram to log10 p(w | h);
    log10_backoffs[n - 1] maps each n-gram that is a context to log10 of its backoff weight."""

    order: int
    log10_probs: list[dict[Ngram, float]]
    log10_backoffs: list[dict[Ngram, float]]

    @property
    def vocabulary(self) -> frozenset[str]:
        return frozenset(gram[0] for gram in self.log10_probs[0])


def count_ngrams(sentences: Iterable[Sequence[str]], order: int) -> list[Counter]:
    """Raw counts of every 1..order-gram of the sentences padded with <s> and </s>; counts[n - 1] holds n-grams."""
    counts: list[Counter] = [Counter() for _ in range(order)]
    for words in sentences:
        padded = (BOS, *words, EOS)
        for n in range(1, order + 1):
            counts[n - 1].update(padded[i : i + n] for i in range(len(padded) - n + 1))
    return counts


def adjusted_counts(counts: list[Counter]) -> list[Counter]:
    """Kneser-Ney's counts: raw for the highest order and for n-grams starting with <s>, else the number
    of distinct left neighbours."""
    adjusted = [Counter() for _ in counts]
    adjusted[-1] = Counter(counts[-1])
    for n in range(len(counts) - 1, 0, -1):  # n-grams of order n from the (n + 1)-grams
        adjusted[n - 1].update({gram: count for gram, count in counts[n - 1].items() if gram[0] == BOS})
        adjusted[n - 1].update(gram[1:] for gram in counts[n])  # keys are distinct: one per left neighbour
    del adjusted[0][(BOS,)]  # <s> is never predicted
    return adjusted


def discounts(adjusted: Counter, order: int) -> tuple[float, float, float]:
    """(D_1, D_2, D_3+) from the counts of adjusted counts (modified Kneser-Ney), or one fallback discount."""
    t = Counter(count for count in adjusted.values() if count <= 4)
    if t[1] and t[2]:
        y = t[1] / (t[1] + 2 * t[2])
        if t[3] and t[4]:
            modified = (1 - 2 * y * t[2] / t[1], 2 - 3 * y * t[3] / t[2], 3 - 4 * y * t[4] / t[3])
            if all(0 < d <= k for k, d in enumerate(modified, 1)):
                return modified
        single = y if 0 < y < 1 else 0.5
    else:
        single = 0.5
    log.info(
        "order %d: counts of counts %s too few for modified Kneser-Ney; one discount %.3f",
        order,
        [t[k] for k in range(1, 5)],
        single,
    )
    return single, single, single


def _discount(count: int, ds: tuple[float, float, float]) -> float:
    return ds[min(count, 3) - 1]


def _backoff_mass(continuations: Iterable[int], ds: tuple[float, float, float]) -> float:
    """D_1 N_1 + D_2 N_2 + D_3+ N_3+ over the adjusted counts of one context's continuations."""
    return sum(_discount(count, ds) for count in continuations)


def build_kneser_ney(sentences: Iterable[Sequence[str]], order: int = 3, discount: float | None = None) -> NgramModel:
    """An interpolated modified Kneser-Ney model of word sentences (see the module docstring)."""
    if order < 1:
        raise WhistleError(f"an n-gram order must be at least 1, not {order}")
    adjusted = adjusted_counts(count_ngrams(sentences, order))
    if not adjusted[0]:
        raise WhistleError("no sentence to build a language model from")
    ds = [(discount,) * 3 if discount is not None else discounts(adjusted[n], n + 1) for n in range(order)]
    probs: list[dict[Ngram, float]] = [{} for _ in range(order)]
    backoffs: list[dict[Ngram, float]] = [{} for _ in range(order)]
    unigram = _unigram_probabilities(adjusted[0], ds[0])
    probs[0] = {(word,): math.log10(p) for word, p in unigram.items()} | {(BOS,): NEVER}
    lower = {(word,): p for word, p in unigram.items()}
    for n in range(2, order + 1):
        by_context: dict[Ngram, dict[str, int]] = defaultdict(dict)
        for gram, count in adjusted[n - 1].items():
            by_context[gram[:-1]][gram[-1]] = count
        current: dict[Ngram, float] = {}
        for context, continuations in by_context.items():
            total = sum(continuations.values())
            gamma = _backoff_mass(continuations.values(), ds[n - 1]) / total
            backoffs[n - 2][context] = math.log10(gamma)
            for word, count in continuations.items():
                current[context + (word,)] = (count - _discount(count, ds[n - 1])) / total + gamma * lower[
                    context[1:] + (word,)
                ]
        probs[n - 1] = {gram: math.log10(p) for gram, p in current.items()}
        lower = current
    return NgramModel(order, probs, backoffs)


def _unigram_probabilities(adjusted: Counter, ds: tuple[float, float, float]) -> dict[str, float]:
    """p(w) for every seen word and <unk>: discounted counts plus the freed mass spread over |V| words."""
    total = sum(adjusted.values())
    words = {gram[0]: count for gram, count in adjusted.items()}
    vocabulary = len(words) + (UNK not in words)
    uniform = _backoff_mass(words.values(), ds) / total / vocabulary
    probs = {word: (count - _discount(count, ds)) / total + uniform for word, count in words.items()}
    probs.setdefault(UNK, uniform)
    return probs


def write_arpa(model: NgramModel, path: str | Path) -> Path:
    """Write `model` as an ARPA text file (n-grams sorted, so equal models give equal files)."""
    path = Path(path)
    lines = ["", "\\data\\"] + [f"ngram {n}={len(grams)}" for n, grams in enumerate(model.log10_probs, 1)]
    for n, grams in enumerate(model.log10_probs, 1):
        lines += ["", f"\\{n}-grams:"]
        backoffs = model.log10_backoffs[n - 1]
        for gram in sorted(grams):
            line = f"{grams[gram]:.8g}\t{' '.join(gram)}"
            if gram in backoffs:
                line += f"\t{backoffs[gram]:.8g}"
            lines.append(line)
    lines += ["", "\\end\\", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def read_arpa(path: str | Path) -> NgramModel:
    """An ARPA file's n-grams, probabilities and backoff weights (log10)."""
    path = Path(path)
    probs: list[dict[Ngram, float]] = []
    backoffs: list[dict[Ngram, float]] = []
    section = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, 1):
                line = raw.strip()
                if line.startswith("\\") and line.endswith("-grams:"):
                    section = int(line[1:].split("-")[0])
                    probs.append({})
                    backoffs.append({})
                elif line == "\\end\\":
                    break
                elif section and line:
                    _read_entry(line, section, probs[-1], backoffs[-1], f"{path}:{number}")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise WhistleError(f"cannot read the ARPA language model {path}: {err}") from err
    if not any(probs):
        raise WhistleError(f"{path} holds no n-grams: it is not an ARPA language model")
    return NgramModel(len(probs), probs, backoffs)


def _read_entry(line: str, order: int, probs: dict, backoffs: dict, where: str) -> None:
    fields = line.split()
    if len(fields) not in (order + 1, order + 2):
        raise ValueError(
            f"{where}: a {order}-gram line needs a probability, {order} word(s) and an optional backoff, not {line!r}"
        )
    gram = tuple(fields[1 : order + 1])
    probs[gram] = float(fields[0])
    if len(fields) == order + 2:
        backoffs[gram] = float(fields[-1])


def _last(words: Sequence[str], count: int) -> Ngram:
    return tuple(words[max(0, len(words) - count) :]) if count > 0 else ()


class ArpaScorer:
    """Pure-Python queries of an `NgramModel` with ARPA backoff semantics (the fallback to KenLM)."""

    def __init__(self, model: NgramModel):
        if (UNK,) not in model.log10_probs[0]:
            raise WhistleError("the language model has no <unk> unigram: unknown words would have no probability")
        self.model = model
        self.order = model.order
        self.vocabulary = model.vocabulary

    def log10_prob(self, context: Sequence[str], word: str) -> float:
        """log10 p(word | the last order-1 words of context); <s> may open the context, unknown words are <unk>."""
        word = word if word in self.vocabulary else UNK
        context = tuple(w if w in self.vocabulary else UNK for w in _last(context, self.order - 1))
        backoff = 0.0
        while True:
            prob = self.model.log10_probs[len(context)].get(context + (word,))
            if prob is not None:
                return backoff + prob
            backoff += self.model.log10_backoffs[len(context) - 1].get(context, 0.0)
            context = context[1:]


class KenlmScorer:
    """The same queries through KenLM (the `fusion` extra): one C++ call per word."""

    def __init__(self, path: str | Path, vocabulary: frozenset[str], order: int):
        import kenlm  # optional: only with the fusion extra

        self.model = kenlm.Model(str(path))
        self.vocabulary = vocabulary
        self.order = order
        self._state = kenlm.State

    def log10_prob(self, context: Sequence[str], word: str) -> float:
        context = _last(context, self.order - 1)
        state, scratch = self._state(), self._state()
        if context and context[0] == BOS:
            self.model.BeginSentenceWrite(state)
            context = context[1:]
        else:
            self.model.NullContextWrite(state)
        for previous in context:
            self.model.BaseScore(state, previous, scratch)
            state, scratch = scratch, state
        return self.model.BaseScore(state, word, scratch)


def load_scorer(arpa_path: str | Path, backend: str = "auto") -> ArpaScorer | KenlmScorer:
    """A scorer for an ARPA file: "kenlm", "python", or "auto" (KenLM when installed, else Python)."""
    if backend not in ("auto", "kenlm", "python"):
        raise WhistleError(f"unknown LM backend {backend!r}: use auto, kenlm or python")
    model = read_arpa(arpa_path)
    if backend == "python":
        return ArpaScorer(model)
    try:
        return KenlmScorer(arpa_path, model.vocabulary, model.order)
    except ImportError:
        if backend == "kenlm":
            raise WhistleError("the kenlm backend needs the kenlm package: pip install 'whistle[fusion]'") from None
        log.info("kenlm is not installed: scoring %s with the pure-Python ARPA reader", arpa_path)
        return ArpaScorer(model)
