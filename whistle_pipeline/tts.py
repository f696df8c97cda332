"""Speech from text with eSpeak NG, from PyPI alone (the `espeakng-loader` package ships the library
and its data; it is driven through ctypes, so no system install is needed).

`synthesize(texts_file, out_dir, ...)` speaks every line of a text file with a voice, variant, rate
and pitch drawn per sentence from a seeded generator, resamples to the teacher's rate with soxr and
writes an audio folder plus ``manifest.jsonl``, which `whistle precompute` reads as a manifest
source (``data.audio_column = "audio"``, paths relative to the manifest)::

    result = synthesize("examples/target/test.txt", "target-test-audio", seed=0)
    # target-test-audio/manifest.jsonl: {"audio": "audio/test-00001.flac", "text": ..., "language": "en",
    #                                    "id": "test-00001", "duration": 3.2, "voice": "en-us+f3", ...}

Reproducibility and processes: libespeak-ng is not thread-safe and keeps hidden state from one
utterance to the next (e.g. the pitch-flutter index in its wave generator is a function-level
static), so the same sentence comes out slightly different depending on what the process spoke
before. `synthesize` therefore speaks the sentences in fixed chunks of `CHUNK_SIZE`, each chunk in
a fresh worker process (``spawn``): the audio is a function of (text file, settings, seed) alone —
bit-identical across runs and whatever the number of workers — and chunks run in parallel.
Finished chunks are recorded, so an interrupted run resumes. In-process use (`EspeakEngine`) is
serialised by a lock; use processes, not threads, for parallelism.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from whistle_pipeline.errors import WhistleError

log = logging.getLogger(__name__)

# espeak_ng/speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_Synth returns when the text is spoken, through the synth callback
INITIALIZE_DONT_EXIT = 0x8000  # report initialisation errors instead of calling exit()
CHARS_UTF8 = 1
PARAMETER_RATE, PARAMETER_PITCH = 1, 3  # words per minute; base pitch 0-100 (50 = the voice's own)
EE_OK = 0

# The English voices and variants shipped in espeakng-loader's data (gmw/en*, voices/!v/m*, f*).
DEFAULT_VOICES = (
    "en-us",
    "en",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
DEFAULT_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
DEFAULT_RATE = (140, 190)  # words per minute (eSpeak's default is 175)
DEFAULT_PITCH = (35, 65)  # eSpeak's pitch parameter, 0-100
CHUNK_SIZE = 64  # sentences per fresh worker process; part of what makes the audio reproducible
AUDIO_FORMATS = {"flac": "FLAC", "wav": "WAV"}
MANIFEST = "manifest.jsonl"
RUN_RECORD = "synthesize.json"
CHUNKS_DIR = ".chunks"
MAX_WINDOW_S = 30.0  # Whisper's window: longer clips are rejected by precompute


class TTSError(WhistleError):
    """eSpeak NG is missing, a voice does not exist, or the input cannot be spoken."""


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakEngine:
    """The process's one eSpeak NG instance (the library is a global singleton): `EspeakEngine.get()`.

    `speak` returns int16 samples at `sample_rate` (22050 Hz). Calls are serialised by a lock.
    """

    _instance: EspeakEngine | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:
            raise TTSError(
                "eSpeak NG is not installed: pip install 'whistle[demo]' (or pip install espeakng-loader)"
            ) from None
        self.data_path = Path(espeakng_loader.get_data_path())
        library_path = espeakng_loader.get_library_path()
        try:
            lib = ctypes.CDLL(library_path)
        except OSError as err:
            raise TTSError(f"cannot load eSpeak NG from {library_path}: {err}") from err
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise TTSError(
                f"eSpeak NG failed to initialise with its data at {self.data_path} (status "
                f"{self.sample_rate}); reinstall espeakng-loader"
            )
        self.version = lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)  # kept referenced: eSpeak calls it during espeak_Synth
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib

    @classmethod
    def get(cls) -> EspeakEngine:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _collect(self, wav: Any, n_samples: int, events: Any) -> int:
        if n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        return 0  # 0 = go on

    def voices(self) -> list[str]:
        """Voice names `speak` accepts: each voice's language codes (en-us, en-gb-x-rp, ...)."""
        with self._lock:
            listed = self._lib.espeak_ListVoices(None)
            names, i = set(), 0
            while listed[i]:
                # `languages`: (priority byte, NUL-terminated code) pairs, ended by a zero priority byte.
                address = listed[i].contents.languages
                while ctypes.string_at(address, 1) != b"\0":
                    code = ctypes.string_at(address + 1)
                    names.add(code.decode())
                    address += len(code) + 2
                i += 1
        return sorted(names)

    def variants(self) -> list[str]:
        return sorted(p.name for p in (self.data_path / "voices" / "!v").iterdir() if p.is_file())

    def check_voice(self, voice: str, variant: str = "") -> None:
        """Raise TTSError naming the available voices / variants when `voice` or `variant` does not exist."""
        if "+" in voice:
            raise TTSError(f"voice {voice!r}: give the variant separately (--voices en-us --variants f3)")
        with self._lock:
            status = self._lib.espeak_SetVoiceByName(voice.encode())
        if status != EE_OK:
            english = [v for v in self.voices() if v.startswith("en")]
            raise TTSError(
                f"eSpeak NG has no voice {voice!r}. English voices: {', '.join(english)} (every voice: "
                "whistle synthesize --list-voices)"
            )
        if variant and variant not in self.variants():
            raise TTSError(f"eSpeak NG has no voice variant {variant!r}. Variants: {', '.join(self.variants())}")

    def speak(
        self, text: str, voice: str, variant: str = "", rate: int = 175, pitch: int = 50, seed: int = 0
    ) -> np.ndarray:
        """int16 samples (n,) at `self.sample_rate`; empty when eSpeak produced nothing."""
        with self._lock:
            self._chunks = []
            if self._lib.espeak_SetVoiceByName(f"{voice}+{variant}".encode() if variant else voice.encode()) != EE_OK:
                raise TTSError(f"eSpeak NG has no voice {voice!r}")
            self._lib.espeak_SetParameter(PARAMETER_RATE, rate, 0)
            self._lib.espeak_SetParameter(PARAMETER_PITCH, pitch, 0)
            self._lib.espeak_ng_SetRandSeed(seed)  # noise in breathy / klatt variants
            data = text.encode("utf-8")
            status = self._lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, CHARS_UTF8, None, None)
            self._lib.espeak_Synchronize()
            if status != EE_OK:
                raise TTSError(f"eSpeak NG failed on {text[:60]!r} (status {status})")
            chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


@dataclass(frozen=True)
class Utterance:
    """One sentence to speak and how: a row of the manifest once spoken."""

    id: str
    text: str
    line: int
    voice: str
    variant: str
    rate: int
    pitch: int
    seed: int


def read_sentences(path: str | Path) -> list[tuple[int, str]]:
    """(line number, sentence) for every non-blank line of a UTF-8 text file."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TTSError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise TTSError(f"{path} is not UTF-8 text ({err}); convert it, e.g. with iconv") from err
    sentences = [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]
    if not sentences:
        raise TTSError(f"{path} has no sentences (one per line)")
    return sentences


def plan(
    sentences: Sequence[tuple[int, str]],
    prefix: str,
    voices: Sequence[str],
    variants: Sequence[str],
    rate: tuple[int, int],
    pitch: tuple[int, int],
    seed: int,
) -> list[Utterance]:
    """Draw a voice, variant, rate and pitch per sentence: the same seed and sentences give the same plan."""
    rng = np.random.default_rng(seed)
    n = len(sentences)
    voice_ix = rng.integers(len(voices), size=n)
    variant_ix = rng.integers(len(variants), size=n) if variants else np.zeros(n, dtype=int)
    rates = rng.integers(rate[0], rate[1] + 1, size=n)
    pitches = rng.integers(pitch[0], pitch[1] + 1, size=n)
    synth_seeds = rng.integers(1, 2**31 - 1, size=n)
    return [
        Utterance(
            f"{prefix}-{line:05d}",
            text,
            line,
            voices[voice_ix[i]],
            variants[variant_ix[i]] if variants else "",
            int(rates[i]),
            int(pitches[i]),
            int(synth_seeds[i]),
        )
        for i, (line, text) in enumerate(sentences)
    ]


def _speak_chunk(
    utterances: list[Utterance], out_dir: str, chunk: int, sample_rate: int, audio_format: str, language: str
) -> dict[str, Any]:
    """Worker: speak one chunk in this (fresh) process, write its audio, then its chunk record (last)."""
    import soundfile
    import soxr

    engine = EspeakEngine.get()
    out = Path(out_dir)
    rows, rejects = [], []
    for utt in utterances:
        samples = engine.speak(utt.text, utt.voice, utt.variant, utt.rate, utt.pitch, utt.seed)
        if samples.size == 0:
            rejects.append({"id": utt.id, "line": utt.line, "reason": "eSpeak produced no audio"})
            continue
        audio = samples.astype(np.float32) / 32768.0
        if sample_rate != engine.sample_rate:
            audio = soxr.resample(audio, engine.sample_rate, sample_rate, quality="HQ")
        relative = f"audio/{utt.id}.{audio_format}"
        soundfile.write(
            out / relative,
            np.clip(audio, -1.0, 1.0 - 1 / 32768),
            sample_rate,
            format=AUDIO_FORMATS[audio_format],
            subtype="PCM_16",
        )
        rows.append(
            {
                "audio": relative,
                "text": utt.text,
                "language": language,
                "id": utt.id,
                "duration": round(len(audio) / sample_rate, 4),
                "voice": f"{utt.voice}+{utt.variant}" if utt.variant else utt.voice,
                "rate": utt.rate,
                "pitch": utt.pitch,
            }
        )
    record = {"chunk": chunk, "rows": rows, "rejects": rejects, "espeak": engine.version}
    path = out / CHUNKS_DIR / f"{chunk:05d}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    path.with_suffix(".tmp").replace(path)
    return record


@dataclass(frozen=True)
class SynthesisResult:
    out_dir: str
    manifest: str
    n_clips: int
    n_rejects: int
    n_resumed: int
    hours: float
    longest_s: float
    n_over_window: int
    sample_rate: int
    seconds: float
    rejects: list[dict[str, Any]]

    def summary(self) -> str:
        lines = [
            f"wrote {self.n_clips} clips ({self.hours * 60:.1f} min of audio at {self.sample_rate} Hz) and "
            f"{self.manifest} in {self.seconds:.1f} s"
            + (f" ({self.n_resumed} clips kept from an earlier run)" if self.n_resumed else "")
        ]
        if self.n_over_window:
            lines.append(
                f"  {self.n_over_window} clip(s) are longer than Whisper's {MAX_WINDOW_S:.0f} s window "
                f"(longest {self.longest_s:.1f} s): precompute will reject them; split those lines"
            )
        if self.rejects:
            shown = "; ".join(f"line {r['line']}: {r['reason']}" for r in self.rejects[:5])
            lines.append(f"  {self.n_rejects} sentence(s) gave no audio: {shown}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synthesize(
    texts: str | Path,
    out_dir: str | Path,
    *,
    voices: Sequence[str] = DEFAULT_VOICES,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    rate: tuple[int, int] = DEFAULT_RATE,
    pitch: tuple[int, int] = DEFAULT_PITCH,
    seed: int = 0,
    sample_rate: int = 16000,
    audio_format: str = "flac",
    language: str = "en",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> SynthesisResult:
    """Speak every line of `texts` into `out_dir` (audio/, manifest.jsonl, synthesize.json); see the module doc."""
    from whistle_pipeline import preflight  # here, not at the top: it imports this module (and transformers)

    preflight.synthesize(texts, out_dir)
    started = time.perf_counter()
    texts, out = Path(texts), Path(out_dir)
    problems = []
    if not voices:
        problems.append("give at least one voice")
    for name, (low, high), (floor, ceiling) in (("rate", rate, (80, 450)), ("pitch", pitch, (0, 100))):
        if not floor <= low <= high <= ceiling:
            problems.append(f"{name} range {low}-{high} must satisfy {floor} <= low <= high <= {ceiling}")
    if audio_format not in AUDIO_FORMATS:
        problems.append(f"audio format {audio_format!r} is not one of {', '.join(AUDIO_FORMATS)}")
    if not 8000 <= sample_rate <= 48000:
        problems.append(f"sample rate {sample_rate} Hz is outside 8000-48000")
    if workers < 1:
        problems.append(f"workers = {workers} must be at least 1")
    if problems:
        raise TTSError("cannot synthesize: " + "; ".join(problems))
    engine = EspeakEngine.get()
    for voice in voices:
        engine.check_voice(voice)
    for variant in variants:
        engine.check_voice(voices[0], variant)

    sentences = read_sentences(texts)
    utterances = plan(sentences, texts.stem, list(voices), list(variants), rate, pitch, seed)
    settings = {
        "texts": str(texts.resolve()),
        "n_sentences": len(utterances),
        "voices": list(voices),
        "variants": list(variants),
        "rate": list(rate),
        "pitch": list(pitch),
        "seed": seed,
        "sample_rate": sample_rate,
        "audio_format": audio_format,
        "language": language,
        "chunk_size": CHUNK_SIZE,
        "espeak": engine.version,
    }
    _prepare(out, settings, overwrite)

    chunks = [utterances[i : i + CHUNK_SIZE] for i in range(0, len(utterances), CHUNK_SIZE)]
    records: dict[int, dict[str, Any]] = {}
    for index in range(len(chunks)):
        done = out / CHUNKS_DIR / f"{index:05d}.json"
        if done.is_file():
            records[index] = json.loads(done.read_text(encoding="utf-8"))
    n_resumed = sum(len(r["rows"]) for r in records.values())
    todo = [i for i in range(len(chunks)) if i not in records]
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(utterances),
        initial=len(utterances) - sum(len(chunks[i]) for i in todo),
        unit="clip",
        desc="synthesize",
        disable=not progress,
    )
    # spawn, not fork: each chunk must start from eSpeak's pristine state, and forking a process that
    # holds torch threads is unsafe. max_tasks_per_child=1 gives every chunk its own process.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(workers, max(len(todo), 1)), mp_context=context, max_tasks_per_child=1
    ) as pool:
        futures = {
            pool.submit(_speak_chunk, chunks[i], str(out), i, sample_rate, audio_format, language): i for i in todo
        }
        for future in as_completed(futures):
            records[futures[future]] = future.result()
            bar.update(len(chunks[futures[future]]))
    bar.close()

    rows = [row for i in sorted(records) for row in records[i]["rows"]]
    rejects = [r for i in sorted(records) for r in records[i]["rejects"]]
    manifest = out / MANIFEST
    manifest.with_suffix(".tmp").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    manifest.with_suffix(".tmp").replace(manifest)
    durations = [r["duration"] for r in rows]
    result = SynthesisResult(
        out_dir=str(out),
        manifest=str(manifest),
        n_clips=len(rows),
        n_rejects=len(rejects),
        n_resumed=n_resumed,
        hours=sum(durations) / 3600,
        longest_s=max(durations, default=0.0),
        n_over_window=sum(d > MAX_WINDOW_S for d in durations),
        sample_rate=sample_rate,
        seconds=time.perf_counter() - started,
        rejects=rejects,
    )
    (out / RUN_RECORD).write_text(
        json.dumps({"settings": settings, "result": result.to_dict()}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    shutil.rmtree(out / CHUNKS_DIR)
    return result


def _prepare(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Create `out`, or resume an interrupted run with identical settings; refuse anything else."""
    record = out / RUN_RECORD
    if out.exists() and any(out.iterdir()) and not overwrite:
        partial = out / CHUNKS_DIR / "settings.json"
        if record.is_file():
            raise TTSError(
                f"{out} already holds a finished synthesis ({record}); choose another folder or pass --overwrite"
            )
        if not partial.is_file():
            raise TTSError(
                f"{out} exists and is not a whistle synthesis folder; choose another folder or pass --overwrite"
            )
        previous = json.loads(partial.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed:
            raise TTSError(
                f"{out} holds an interrupted synthesis with different settings ({', '.join(changed)}); "
                "rerun with the same settings to resume, or pass --overwrite"
            )
        log.info("resuming the interrupted synthesis in %s", out)
        return
    if out.exists() and overwrite:
        shutil.rmtree(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / CHUNKS_DIR).mkdir(exist_ok=True)
    (out / CHUNKS_DIR / "settings.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
