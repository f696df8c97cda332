"""The pronunciation front end: each Whisper token of a transcript, with how its word is spoken (IPA).

A TLE learns how letters sound from the paired speech it was trained on; a domain's names (drugs,
species, places) are exactly the words that speech lacks, and their spelling is a poor guide to their
sound. A grapheme-to-phoneme (G2P) backend says how they sound; this module aligns its phonemes to the
TLE's tokens (whistle_pipeline.text: ``tokenizer(" " + text)`` + <|endoftext|>)::

    front_end = PronunciationFrontEnd()                    # eSpeak NG through phonemizer
    batch = encode_texts(tokenizer, specials, texts, languages, max_positions)
    spoken = front_end.encode_batch(tokenizer, batch.tle_tokens, batch.tle_mask, batch.languages)
    spoken.phonemes                                        # (B, L, P) phoneme ids of each token's word

    " acetaminophen" -> " acet" "amin" "ophen": each piece gets the whole word's "ˈæsɪtˌæmɪnˌɑːfən",
                        and its piece index 0, 1, 2 of 3

Decisions, and why:
- Whole-word phonemes on every piece, plus the piece's index and its word's piece count. BPE pieces do
  not follow syllables ("acet|amin|ophen"), so a proportional split would be a guess; the TLE attends
  across tokens and the duration model sees the index, so nothing is lost.
- Words come from the tokens' own bytes (GPT-2's byte-level alphabet decoded), not from re-tokenising
  the text: a token may hold part of a UTF-8 character, and the bytes of all tokens are exactly the
  text. A word is a run of letters, marks and digits (`split_words`): an apostrophe between letters
  stays inside ("don't"), a hyphen does not ("beta-blocker" is two words, the "-" token gets none),
  "3.5" / "1,000" / "$12" / "5%" are one number each (eSpeak speaks them: "θɹˈiː pɔɪnt fˈaɪv"), and
  each Han character is a word of its own (one syllable; Chinese writes no spaces). A token gets the
  phonemes of every word it overlaps (word boundaries inside one token are joined by a space);
  punctuation, whitespace and special tokens get none.
- Words are spoken in isolation, so a (language, word) pair always has the same phonemes and is cached
  (`cache_size` entries, least recently used dropped): a domain corpus repeats its words.
- A language the backend cannot speak falls back to the word's spelling (its lower-cased, decomposed
  characters in the same vocabulary, `spelled` set), with one WARNING per language naming it — never
  silently.

The phoneme vocabulary is one id per Unicode character of a fixed, versioned inventory that covers every
symbol eSpeak NG 1.52 emits for its 140 voices (IPA letters, stress and length marks, combining
diacritics, the ASCII it uses for tones) plus Latin and Greek letters for spelled fallbacks; anything
else is <unk>. `PronunciationFrontEnd.to_dict()` records the backend, its voices and version, the
vocabulary and the phoneme limit, so a TLE saved with it rebuilds the same front end (`from_dict`).
"""

from __future__ import annotations

import functools
import logging
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from whistle_pipeline.errors import WhistleError

log = logging.getLogger(__name__)

WORD_BOUNDARY = " "  # between the spoken words of one written word ("3.5") or of one token's words
APOSTROPHES = "'’ʼ"


# ---- the G2P backends ----


class G2PBackend(Protocol):
    """Words of one language -> their phonemes (IPA), one string per word."""

    name: str

    def voice(self, language: str) -> str | None:
        """The backend's voice for a Whisper language code, or None when it cannot speak the language."""

    def phonemize(self, words: Sequence[str], language: str) -> list[str]:
        """Phonemes of each word (spoken in isolation); only called for languages `voice` accepts."""

    def to_dict(self) -> dict[str, Any]:
        """What rebuilds the backend (`from_dict`, a classmethod): {"name": ..., settings, "version": ...}."""


# Whisper language codes whose eSpeak NG voice has another name; every other code is used as it is.
ESPEAK_VOICES = {"en": "en-us", "zh": "cmn", "fr": "fr-fr", "no": "nb"}
# Voices that crash libespeak-ng (1.52, espeakng-loader 0.2.4: Greenlandic segfaults): treated as missing.
ESPEAK_BROKEN_VOICES = frozenset({"kl"})


class EspeakG2P:
    """eSpeak NG's phonemizer, through the `phonemizer` package and the library `espeakng-loader` ships.

    Why phonemizer rather than calling `espeak_TextToPhonemes` through ctypes as whistle_pipeline.tts
    does for synthesis: libespeak-ng keeps its voice and state in globals, and phonemizer loads a private
    copy of the library per voice, so pronouncing never disturbs the process's synthesis engine (nor one
    language another); it also lists eSpeak's 140 voices and strips the language-switch flags eSpeak
    writes for foreign words. Calls are not thread-safe (the front end serialises them); processes each
    load their own copies, and a pickled backend reloads them lazily.

    A voice that loads but says nothing (espeakng-loader lacks some dictionaries, e.g. Faroese) is
    treated as missing, so its language falls back to spelling.
    """

    name = "espeak"

    def __init__(self, voices: Mapping[str, str] | None = None):
        self.voices = {**ESPEAK_VOICES, **(voices or {})}
        self._phonemizers: dict[str, Any] = {}  # voice -> phonemizer EspeakBackend, or None when unusable
        self._separator: Any = None  # phonemizer's Separator: no mark between phones, a space between words

    def __getstate__(self) -> dict[str, Any]:
        return {"voices": self.voices, "_phonemizers": {}, "_separator": None}  # ctypes handles stay here

    def voice(self, language: str) -> str | None:
        voice = self.voices.get(language, language)
        if voice not in self._phonemizers:
            self._phonemizers[voice] = self._load(voice)
        return voice if self._phonemizers[voice] is not None else None

    def _load(self, voice: str) -> Any:
        backend_class, self._separator = _phonemizer()
        if voice in ESPEAK_BROKEN_VOICES or voice not in backend_class.supported_languages():
            return None
        quiet = logging.getLogger(f"{__name__}.phonemizer")
        quiet.setLevel(logging.ERROR)  # it warns on every call that it removed the language-switch flags
        backend = backend_class(voice, with_stress=True, language_switch="remove-flags", logger=quiet)
        if not backend.phonemize(["1"], separator=self._separator, strip=True)[0]:
            return None  # the voice's dictionary is missing: it speaks nothing
        return backend

    def phonemize(self, words: Sequence[str], language: str) -> list[str]:
        voice = self.voice(language)
        if voice is None:
            raise WhistleError(f"eSpeak NG has no voice for language {language!r}")
        return self._phonemizers[voice].phonemize(list(words), separator=self._separator, strip=True)

    def version(self) -> str:
        return ".".join(str(part) for part in _phonemizer()[0].version())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "voices": dict(self.voices), "version": self.version()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EspeakG2P:
        backend = cls(data.get("voices"))
        if data.get("version") and data["version"] != backend.version():
            log.warning(
                "the front end was saved with eSpeak NG %s, this is %s: some words may be pronounced differently",
                data["version"],
                backend.version(),
            )
        return backend


def _phonemizer() -> tuple[Any, Any]:
    """phonemizer's EspeakBackend, pointed at espeakng-loader's library and data, and the word separator.

    Imported here, not at the top: phonemizer and espeakng-loader are optional (`whistle[g2p]`).
    """
    try:
        import espeakng_loader
        from phonemizer.backend import EspeakBackend
        from phonemizer.backend.espeak.wrapper import EspeakWrapper
        from phonemizer.separator import Separator
    except ImportError:
        raise WhistleError(
            "the pronunciation front end needs phonemizer and espeakng-loader: pip install 'whistle[g2p]'"
        ) from None
    EspeakWrapper.set_library(espeakng_loader.get_library_path())
    EspeakWrapper.set_data_path(espeakng_loader.get_data_path())  # new in phonemizer 3.4
    return EspeakBackend, Separator(phone="", syllable="", word=WORD_BOUNDARY)


BACKENDS = {EspeakG2P.name: EspeakG2P}


# ---- the phoneme vocabulary ----

PAD, UNKNOWN = 0, 1
INVENTORY_VERSION = "ipa-chars-v1"
# Unicode blocks of inventory v1, in id order (after <pad>, <unk> and the word boundary).
INVENTORY_RANGES = (
    (0x21, 0x7E),  # printable ASCII: IPA's Latin letters, and eSpeak's ASCII for tones and rare phonemes
    (0xC0, 0x24F),  # Latin-1 letters, Latin Extended-A and -B: æ ç ð ø ħ ŋ œ, clicks ǀ ǃ, spelled words
    (0x250, 0x2AF),  # IPA Extensions: ɐ ə ɚ ɛ ɪ ʃ ʊ ʒ ...
    (0x2B0, 0x2FF),  # Spacing Modifier Letters: ˈ ˌ ː ʰ ʲ, tone letters ˥ ˩
    (0x300, 0x36F),  # Combining Diacritical Marks: nasal ̃, syllabic ̩, dental ̪, tie ͡
    (0x370, 0x3FF),  # Greek: β θ χ
    (0x1D00, 0x1DBF),  # Phonetic Extensions: ᵻ ᵝ
    (0x2191, 0x2191),
    (0x2193, 0x2193),  # upstep, downstep
)


@dataclass(frozen=True)
class PhonemeVocabulary:
    """Phoneme symbols (one Unicode character each) <-> ids; id 0 pads, id 1 is any unknown symbol."""

    symbols: tuple[str, ...]
    version: str

    @classmethod
    def default(cls) -> PhonemeVocabulary:
        symbols = ["<pad>", "<unk>", WORD_BOUNDARY]
        symbols += [chr(c) for low, high in INVENTORY_RANGES for c in range(low, high + 1)]
        return cls(tuple(symbols), INVENTORY_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", {symbol: i for i, symbol in enumerate(self.symbols)})

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, phonemes: str) -> list[int]:
        return [self._ids.get(symbol, UNKNOWN) for symbol in phonemes]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.symbols[i] for i in ids if i != PAD)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "symbols": list(self.symbols)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhonemeVocabulary:
        return cls(tuple(data["symbols"]), data["version"])


# ---- words and tokens ----


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (a printable character standing for each of the 256 bytes) -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = dict(zip(printable, printable))
    for byte in range(256):
        if byte not in stand_ins:
            stand_ins[byte] = 256 + len(stand_ins) - len(printable)
    return {chr(char): byte for byte, char in stand_ins.items()}


BYTE_OF_CHAR = _byte_alphabet()


def token_bytes(tokenizer: Any, token_ids: Sequence[int]) -> list[bytes | None]:
    """Each token's bytes; None for added tokens (<|endoftext|>, language, task and timestamp tokens)."""
    added = tokenizer.added_tokens_decoder
    pieces: list[bytes | None] = []
    for token_id, token in zip(token_ids, tokenizer.convert_ids_to_tokens(list(token_ids))):
        if token_id in added:
            pieces.append(None)
            continue
        try:
            pieces.append(bytes(BYTE_OF_CHAR[char] for char in token))
        except (KeyError, TypeError):
            raise WhistleError(
                f"token {token_id} ({token!r}) is not in a byte-level BPE vocabulary: the "
                "pronunciation front end needs a Whisper tokenizer"
            ) from None
    return pieces


def _is_han(char: str) -> bool:
    code = ord(char)
    return 0x3400 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x3134F


@functools.lru_cache(maxsize=65536)  # a corpus uses few distinct characters; the lookup is the hot loop
def _is_word_char(char: str) -> bool:
    return unicodedata.category(char)[0] in "LMN" and not _is_han(char)


def split_words(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the words of `text` (see the module docstring for what a word is)."""
    spans, i, n = [], 0, len(text)
    while i < n:
        if _is_han(text[i]):
            spans.append((i, i + 1))
            i += 1
            continue
        if not _is_word_char(text[i]):
            i += 1
            continue
        start = i
        while i < n:
            char, after = text[i], text[i + 1] if i + 1 < n else ""
            if _is_word_char(char):
                i += 1
            elif char in APOSTROPHES and text[i - 1].isalpha() and after.isalpha():
                i += 1  # don't, O'Brien
            elif char in ".," and text[i - 1].isdigit() and after.isdigit():
                i += 1  # 3.5, 1,000
            else:
                break
        if start > 0 and unicodedata.category(text[start - 1]) == "Sc" and text[start].isdigit():
            start -= 1  # $12: eSpeak speaks the currency
        if i < n and text[i] == "%" and text[i - 1].isdigit():
            i += 1
        spans.append((start, i))
    return spans


@dataclass(frozen=True)
class WordAlignment:
    """The words of a token sequence and, for each token, the indices of the words it overlaps."""

    words: list[str]
    token_words: list[tuple[int, ...]]


def align_words(tokenizer: Any, token_ids: Sequence[int]) -> WordAlignment:
    """Which words each token holds part of, from the tokens' bytes (exact even inside a UTF-8 character)."""
    pieces = token_bytes(tokenizer, token_ids)
    data = b"".join(piece for piece in pieces if piece)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise WhistleError(
            f"tokens {list(token_ids)[:12]}… do not make UTF-8 text ({err}): give whole "
            "transcripts, not cut token sequences"
        ) from err
    byte_offset = [0]  # byte offset of each character, and of the end
    for char in text:
        byte_offset.append(byte_offset[-1] + len(char.encode("utf-8")))
    word_spans = [(byte_offset[start], byte_offset[end]) for start, end in split_words(text)]
    words = [data[start:end].decode("utf-8") for start, end in word_spans]
    token_words, position, first_word = [], 0, 0
    for piece in pieces:
        if not piece:
            token_words.append(())
            continue
        start, end = position, position + len(piece)
        position = end
        while first_word < len(word_spans) and word_spans[first_word][1] <= start:
            first_word += 1  # words are in order: those ending before this token are done
        overlapping = []
        for k in range(first_word, len(word_spans)):
            if word_spans[k][0] >= end:
                break
            overlapping.append(k)
        token_words.append(tuple(overlapping))
    return WordAlignment(words, token_words)


# ---- the front end ----


@dataclass(frozen=True)
class TokenPronunciation:
    """One token with its word's pronunciation; `phonemes` is "" for punctuation and special tokens."""

    token_id: int
    word: str  # the word(s) it belongs to, "" for none
    phonemes: str
    piece_index: int  # its index among the tokens of its (first) word
    piece_count: int  # tokens in that word; 0 when it belongs to none
    spelled: bool  # the language has no G2P: `phonemes` is the word's spelling


@dataclass
class PronunciationBatch:
    """Per-token pronunciations laid out like whistle_pipeline.text.TextBatch.tle_tokens (B, L).

    phonemes      (B, L, P) long  phoneme ids of each token's word(s), PAD after them; P = the longest
                                  token's phonemes, at most `max_phonemes` (longer ones are cut)
    phoneme_mask  (B, L, P) bool  True on real phonemes
    piece_index   (B, L)    long  the token's index among its word's tokens (0 without a word)
    piece_count   (B, L)    long  tokens in its word; 0 for punctuation, <|endoftext|> and padding
    spelled       (B, L)    bool  the language has no G2P: the phonemes are the word's spelling
    """

    phonemes: torch.Tensor
    phoneme_mask: torch.Tensor
    piece_index: torch.Tensor
    piece_count: torch.Tensor
    spelled: torch.Tensor

    def to(self, device: torch.device | str) -> PronunciationBatch:
        return PronunciationBatch(
            self.phonemes.to(device),
            self.phoneme_mask.to(device),
            self.piece_index.to(device),
            self.piece_count.to(device),
            self.spelled.to(device),
        )

    def __getitem__(self, index: Any) -> PronunciationBatch:
        """The rows and tokens `index` selects, as it would select them from the (B, L) tokens: batch[rows, :L]."""
        return PronunciationBatch(
            self.phonemes[index],
            self.phoneme_mask[index],
            self.piece_index[index],
            self.piece_count[index],
            self.spelled[index],
        )


@dataclass(frozen=True)
class CacheInfo:
    hits: int
    misses: int
    size: int


class PronunciationFrontEnd:
    """Tokens -> their words' phonemes: a G2P backend, a per-(language, word) cache and a phoneme vocabulary.

    Thread-safe (one lock around the cache and the backend) and picklable (the backend reloads in the
    new process), so DataLoader workers may each hold a copy.
    """

    def __init__(
        self,
        backend: G2PBackend | None = None,
        vocabulary: PhonemeVocabulary | None = None,
        max_phonemes: int = 64,
        cache_size: int = 200_000,
    ):
        if max_phonemes < 1 or cache_size < 0:
            raise ValueError(f"max_phonemes = {max_phonemes} must be >= 1 and cache_size = {cache_size} >= 0")
        self.backend = backend if backend is not None else EspeakG2P()
        self.vocabulary = vocabulary if vocabulary is not None else PhonemeVocabulary.default()
        self.max_phonemes = max_phonemes
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._hits = self._misses = 0
        self._spelled_languages: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def to_dict(self) -> dict[str, Any]:
        """The front end's settings as JSON-able data (for the TLE's config)."""
        return {
            "backend": self.backend.to_dict(),
            "vocabulary": self.vocabulary.to_dict(),
            "max_phonemes": self.max_phonemes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], cache_size: int = 200_000) -> PronunciationFrontEnd:
        name = data["backend"]["name"]
        if name not in BACKENDS:
            raise WhistleError(f"unknown pronunciation backend {name!r}; this whistle has {', '.join(BACKENDS)}")
        return cls(
            BACKENDS[name].from_dict(data["backend"]),
            PhonemeVocabulary.from_dict(data["vocabulary"]),
            data["max_phonemes"],
            cache_size,
        )

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache))

    def spelled(self, language: str) -> bool:
        """Whether words of `language` fall back to their spelling (the backend cannot speak it)."""
        with self._lock:
            return self._has_no_g2p(language)

    def _has_no_g2p(self, language: str) -> bool:
        if self.backend.voice(language) is not None:
            return False
        if language not in self._spelled_languages:
            self._spelled_languages.add(language)
            log.warning(
                "the %s pronunciation backend cannot speak language %r: its words fall back to their spelling",
                self.backend.name,
                language,
            )
        return True

    def word_phonemes(self, words: Sequence[str], language: str) -> list[str]:
        """Each word's phonemes (its lower-cased spelling when the language has no G2P), through the cache."""
        with self._lock:
            if self._has_no_g2p(language):
                # decomposed, so an accented letter is its base letter and a combining mark, both in the inventory
                return [unicodedata.normalize("NFD", word.lower()) for word in words]
            found: dict[str, str] = {}
            for word in words:
                key = (language, word)
                if key in self._cache:
                    self._cache.move_to_end(key)
                    found[word] = self._cache[key]
                    self._hits += 1
            missing = list(dict.fromkeys(word for word in words if word not in found))
            if missing:
                self._misses += len(missing)
                self._hits += sum(1 for word in words if word not in found) - len(missing)  # repeats in `words`
                for word, phonemes in zip(missing, self.backend.phonemize(missing, language)):
                    found[word] = phonemes
                    self._cache[(language, word)] = phonemes
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return [found[word] for word in words]

    def pronounce(self, tokenizer: Any, token_ids: Sequence[int], language: str) -> list[TokenPronunciation]:
        """Each token of one transcript with its word's phonemes (see the module docstring)."""
        alignment = align_words(tokenizer, token_ids)
        phonemes = self.word_phonemes(alignment.words, language)
        spelled = self.spelled(language)
        pieces_of_word = [0] * len(alignment.words)
        for overlapping in alignment.token_words:
            for k in overlapping:
                pieces_of_word[k] += 1
        seen_of_word = [0] * len(alignment.words)
        out = []
        for token_id, overlapping in zip(token_ids, alignment.token_words):
            if not overlapping:
                out.append(TokenPronunciation(int(token_id), "", "", 0, 0, False))
                continue
            first = overlapping[0]
            out.append(
                TokenPronunciation(
                    int(token_id),
                    WORD_BOUNDARY.join(alignment.words[k] for k in overlapping),
                    WORD_BOUNDARY.join(phonemes[k] for k in overlapping),
                    seen_of_word[first],
                    pieces_of_word[first],
                    spelled,
                )
            )
            for k in overlapping:
                seen_of_word[k] += 1
        return out

    def encode_batch(
        self, tokenizer: Any, tokens: torch.Tensor, token_mask: torch.Tensor, languages: Sequence[str]
    ) -> PronunciationBatch:
        """A TextBatch's `tle_tokens` (B, L), `tle_mask` (B, L) and `languages` -> PronunciationBatch."""
        B, L = tokens.shape
        rows = [self.pronounce(tokenizer, tokens[b][token_mask[b]].tolist(), languages[b]) for b in range(B)]
        encoded = [[self.vocabulary.encode(token.phonemes)[: self.max_phonemes] for token in row] for row in rows]
        longest = max((len(ids) for row in encoded for ids in row), default=0)
        # filled in numpy: a torch indexing call per token cost more than the rest of the front end
        phonemes = np.full((B, L, max(longest, 1)), PAD, dtype=np.int64)  # (B, L, P)
        pieces = np.zeros((2, B, L), dtype=np.int64)  # piece index, piece count
        spelled = np.zeros((B, L), dtype=bool)  # (B, L)
        for b, (row, row_ids) in enumerate(zip(rows, encoded)):
            positions = token_mask[b].nonzero().flatten().tolist()
            for position, token, ids in zip(positions, row, row_ids):
                phonemes[b, position, : len(ids)] = ids
                pieces[:, b, position] = token.piece_index, token.piece_count
                spelled[b, position] = token.spelled and bool(ids)
        phonemes, spelled = torch.from_numpy(phonemes), torch.from_numpy(spelled)
        piece_index, piece_count = torch.from_numpy(pieces)
        return PronunciationBatch(phonemes, phonemes != PAD, piece_index, piece_count, spelled)
