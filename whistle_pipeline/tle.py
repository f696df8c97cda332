"""The text-to-latent encoder (TLE): text -> Whisper encoder states, with an explicit duration model.

    tokens (B, L), language                      text tokens + <|endoftext|> (whistle_pipeline.text)
      -> token embedding (E = the teacher's d_model; initialised from its decoder) -> Linear -> + language
         (+ its spelling, + its word's phonemes and its place in the word: PhonemeEncoder, optional)
      -> text transformer                                         token states (B, L, H)
      -> prior p(z | text) = N(mu_p, sigma_p)                     utterance latent z (B, Z): voice, tempo
         (training: posterior q(z | teacher speech frames), KL(q || p); without it the paper's VAE,
          z ~ p(z | text) with KL(p || N(0, I)))
      -> duration predictor (token states + z)                    log(1 + frames) per token
      -> length regulator: token i repeated d_i frames, for each sample over its own length only
         (padding is never interpolated), + absolute frame position + position inside the token
      -> frame transformer (self-attention spans the utterance)   (B, T, H)
      -> residual Conv1D blocks with FiLM(z) -> Linear            states in the store's normalised space (B, T, D)
      -> x * std + mean                                           teacher-scale speech frames (B, T, D)
    full window = speech frames [0, T) + the store's tail template [T, max_frames)   (B, max_frames, D)

Per-token durations are learned from alignments of the teacher itself (whistle_pipeline.alignment).
The losses at the bottom (masked MSE, cosine, durations, KL with free bits) plus the frozen decoder's
cross-entropy (whistle_pipeline.decoder) are combined by stages/train_tle.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.pronunciation import PAD, PronunciationBatch, PronunciationFrontEnd
from whistle_pipeline.teacher import check_finite_weights

POSITION_FEATURES = 64  # sinusoid channels for a frame's absolute position and its offset inside its token
MAX_PIECES = 8  # a word's tokens from the 8th on share the last piece-index embedding (and counts >= 8 theirs)


@strict
class TLEConfig(PreTrainedConfig):
    """Dimensions of a TLE and what it was trained against (so a saved TLE rebuilds full windows alone).

    `teacher` is the store's TeacherInfo as a dict; the normalisation statistics and the tail template
    are buffers of the model (saved in model.safetensors), sized by d_model and max_frames.
    """

    model_type = "whistle_tle"

    vocab_size: int = 51865
    embedding_size: int = 384  # width of the token embedding: the teacher decoder's d_model
    spelling_channels: int = 0  # width of the per-token spelling encoder over its bytes (0 = none)
    max_token_bytes: int = 16  # bytes of a token's text the spelling encoder reads
    hidden_size: int = 384
    text_layers: int = 4
    frame_layers: int = 4
    num_heads: int = 6
    ffn_multiplier: int = 4
    latent_size: int = 16
    conv_kernel: int = 5
    conv_layers: int = 2
    dropout: float | int = 0.1
    posterior: bool = True  # learn z from the teacher's speech frames (else from text only)
    languages: list[str] | tuple[str, ...] = ("en",)
    d_model: int = 384  # teacher width
    max_frames: int = 1500  # encoder frames per 30 s window
    max_tokens: int = 448  # text positions (the decoder's max_target_positions)
    end_token_id: int = 50256  # <|endoftext|>: the TLE's last token; its duration is the trailing silence
    teacher: dict | None = None  # store.TeacherInfo fields
    pronunciation: dict | None = None  # PronunciationFrontEnd.to_dict() of the front end it reads (None: none)
    phoneme_channels: int = 64  # width of the per-token phoneme encoder (with a front end)


@dataclass
class TLEOutput(ModelOutput):
    """What `TLEModel.forward` returns (B batch, L tokens, T frames = longest length in the batch).

    states         (B, T, D) predicted frames in normalised space, zero past each sample's length
    frame_mask     (B, T)    True on real frames
    lengths        (B,)      frames per sample (the sum of its durations)
    durations      (B, L)    frames per token used for upsampling (given, or predicted)
    log_durations  (B, L)    predicted log(1 + frames) per token
    latent         (B, Z)    the z that conditioned the frames
    prior_mean, prior_logvar          (B, Z)  p(z | text)
    posterior_mean, posterior_logvar  (B, Z)  q(z | speech), None without target frames or posterior
    """

    states: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    durations: torch.Tensor | None = None
    log_durations: torch.Tensor | None = None
    latent: torch.Tensor | None = None
    prior_mean: torch.Tensor | None = None
    prior_logvar: torch.Tensor | None = None
    posterior_mean: torch.Tensor | None = None
    posterior_logvar: torch.Tensor | None = None


def sinusoids(positions: torch.Tensor, channels: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (fractional) positions (...,) -> (..., channels), as Whisper's encoder uses."""
    half = channels // 2
    scales = torch.exp(-math.log(max_period) * torch.arange(half, device=positions.device) / max(half - 1, 1))
    angles = positions.float()[..., None] * scales  # (..., half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., channels)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of x (B, N, C) where mask (B, N) is True -> (B, C)."""
    weights = mask.to(x.dtype)[..., None]  # (B, N, 1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention + feed-forward; padded keys are masked, so padding never leaks in."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, N, H), mask (B, N) True on real positions -> (B, N, H)."""
        B, N, H = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, N, 3, self.heads, H // self.heads).unbind(2)  # 3 x (B, N, h, H/h)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask[:, None, None, :],  # (B, 1, 1, N): every query sees only real keys
            dropout_p=self.dropout.p if self.training else 0.0,
        )  # (B, h, N, H/h)
        x = x + self.dropout(self.attn_out(attn.transpose(1, 2).reshape(B, N, H)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class FiLMConvBlock(nn.Module):
    """Residual Conv1D over frames, then feature-wise modulation by the utterance latent: x*(1+g(z)) + b(z)."""

    def __init__(self, hidden: int, kernel: int, latent: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.conv1 = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.film = nn.Linear(latent, 2 * hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x (B, T, H), mask (B, T), z (B, Z) -> (B, T, H)."""
        keep = mask[..., None].to(x.dtype)  # (B, T, 1)
        # zero the padding before each conv: a frame near the end then sees the same zeros whether the
        # batch is padded or not (batch invariance)
        h = (self.norm(x) * keep).transpose(1, 2)  # (B, H, T)
        h = F.gelu(self.conv1(h)) * keep.transpose(1, 2)  # (B, H, T)
        x = x + self.dropout(self.conv2(h).transpose(1, 2))  # (B, T, H)
        gain, bias = self.film(z)[:, None, :].chunk(2, dim=-1)  # 2 x (B, 1, H)
        return (x * (1 + gain) + bias) * keep


class TokenConv(nn.Module):
    """Conv1D + ReLU + LayerNorm over tokens (the FastSpeech duration-predictor layer), padding zeroed."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv1d(hidden, hidden, 3, padding=1)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, H), mask (B, L) -> (B, L, H)."""
        x = x * mask[..., None].to(x.dtype)
        return self.dropout(self.norm(F.relu(self.conv(x.transpose(1, 2)).transpose(1, 2))))


class PhonemeEncoder(nn.Module):
    """Each token's word phonemes -> a feature added to its embedding, like the spelling encoder over bytes:
    phoneme embeddings -> Conv1D -> GELU -> max over the phonemes -> Linear, plus embeddings of the token's
    index among its word's tokens, of its word's token count and of whether the phonemes are a spelling
    (a language the G2P cannot speak)."""

    def __init__(self, vocabulary_size: int, channels: int, hidden: int):
        super().__init__()
        self.phoneme_embedding = nn.Embedding(vocabulary_size, channels, padding_idx=PAD)
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.projection = nn.Linear(channels, hidden)
        self.piece_index = nn.Embedding(MAX_PIECES, hidden)
        self.piece_count = nn.Embedding(MAX_PIECES + 1, hidden)  # 0: no word (punctuation, <|endoftext|>, padding)
        self.spelled = nn.Embedding(2, hidden)

    def forward(self, pronunciation: PronunciationBatch) -> torch.Tensor:
        """PronunciationBatch (phonemes (B, L, P)) -> (B, L, H)."""
        B, L = pronunciation.phonemes.shape[:2]
        phonemes = self.phoneme_embedding(pronunciation.phonemes).flatten(0, 1).transpose(1, 2)  # (B*L, C, P)
        missing = ~pronunciation.phoneme_mask.flatten(0, 1)[:, None, :]  # (B*L, 1, P)
        phonemes = F.gelu(self.conv(phonemes)).masked_fill(missing, -1e4)
        sound = phonemes.amax(-1).clamp(min=-1.0).view(B, L, -1)  # (B, L, C); a token without phonemes: -1
        index = self.piece_index(pronunciation.piece_index.clamp(max=MAX_PIECES - 1))  # (B, L, H)
        count = self.piece_count(pronunciation.piece_count.clamp(max=MAX_PIECES))  # (B, L, H)
        return self.projection(sound) + index + count + self.spelled(pronunciation.spelled.long())  # (B, L, H)


def length_regulate(
    token_states: torch.Tensor, durations: torch.Tensor, longest: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Repeat token i of each sample durations[b, i] times, over that sample's own frames only.

    token_states (B, L, H), durations (B, L) long (0 on padded tokens) ->
      frames (B, T, H), token_index (B, T), offset (B, T) frames since the token's start,
      token_duration (B, T), frame_mask (B, T), lengths (B,); T = the longest sample, `longest` when the
      caller knows it (the largest row sum of durations: reading it back from a GPU waits for the GPU).
    """
    B, L, H = token_states.shape
    ends = durations.cumsum(1)  # (B, L)
    lengths = ends[:, -1]  # (B,)
    T = max(int(lengths.max()) if longest is None else longest, 1)
    t = torch.arange(T, device=durations.device).expand(B, T)  # (B, T)
    token_index = torch.searchsorted(ends, t.contiguous(), right=True).clamp(max=L - 1)  # (B, T)
    starts = ends - durations  # (B, L)
    offset = t - starts.gather(1, token_index)  # (B, T)
    token_duration = durations.gather(1, token_index)  # (B, T)
    frames = token_states.gather(1, token_index[..., None].expand(B, T, H))  # (B, T, H)
    frame_mask = t < lengths[:, None]  # (B, T)
    return frames, token_index, offset, token_duration, frame_mask, lengths


def round_durations(
    frames: torch.Tensor, token_mask: torch.Tensor, max_frames: int, min_frames: torch.Tensor
) -> torch.Tensor:
    """Real-valued frames per token (B, L) -> integers whose running sum stays within half a frame of the
    real running sum (so the total length is the rounded total, not the sum of rounding errors).

    min_frames (B, L) is the floor per token (1 for text tokens: a token with no frame vanishes);
    a sample longer than max_frames is shrunk to fit the window.
    """
    frames = torch.maximum(frames, min_frames) * token_mask  # (B, L)
    total = frames.sum(1, keepdim=True)  # (B, 1)
    frames = frames * (max_frames / total).clamp(max=1.0)
    ends = frames.cumsum(1).round().long()  # (B, L)
    return torch.diff(ends, dim=1, prepend=torch.zeros_like(ends[:, :1]))


class TLEModel(PreTrainedModel):
    """Text -> Whisper encoder states. See the module docstring for the data flow."""

    config_class = TLEConfig
    config: TLEConfig
    base_model_prefix = "tle"
    main_input_name = "tokens"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> TLEModel:
        """PreTrainedModel.from_pretrained from safetensors only, refusing a TLE with inf/nan weights (saved by a
        run that diverged)."""
        kwargs.pop("use_safetensors", None)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, use_safetensors=True, **kwargs)
        check_finite_weights(model, f"the TLE in {pretrained_model_name_or_path}")
        return model

    def __init__(self, config: TLEConfig):
        super().__init__(config)
        H, Z, D = config.hidden_size, config.latent_size, config.d_model
        ffn = config.ffn_multiplier * H
        self.token_embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.token_norm = nn.LayerNorm(config.embedding_size)
        self.token_projection = nn.Linear(config.embedding_size, H)
        self.token_position = nn.Linear(POSITION_FEATURES, H)
        if config.spelling_channels:
            C = config.spelling_channels
            # each token's text as bytes + 1 (0 = padding): fill with set_token_spellings(tokenizer)
            self.register_buffer(
                "token_bytes", torch.zeros(config.vocab_size, config.max_token_bytes, dtype=torch.int32)
            )
            self.byte_embedding = nn.Embedding(257, C, padding_idx=0)
            self.spelling_conv = nn.Conv1d(C, C, 3, padding=1)
            self.spelling_projection = nn.Linear(C, H)
        # the pronunciation front end the TLE reads (its input, like the tokenizer): rebuilt from the config
        self.front_end = PronunciationFrontEnd.from_dict(config.pronunciation) if config.pronunciation else None
        if self.front_end is not None:
            self.phoneme_encoder = PhonemeEncoder(len(self.front_end.vocabulary), config.phoneme_channels, H)
        self.language_embedding = nn.Embedding(len(config.languages), H)
        self.text_layers = nn.ModuleList(
            TransformerBlock(H, config.num_heads, ffn, config.dropout) for _ in range(config.text_layers)
        )
        self.text_norm = nn.LayerNorm(H)
        self.prior = nn.Linear(H, 2 * Z)
        if config.posterior:
            self.posterior_input = nn.Linear(D, H)
            self.posterior_convs = nn.ModuleList(nn.Conv1d(H, H, 5, padding=2) for _ in range(2))
            self.posterior = nn.Linear(H, 2 * Z)
        self.latent_projection = nn.Linear(Z, H)
        self.duration_layers = nn.ModuleList(TokenConv(H, config.dropout) for _ in range(2))
        self.duration_head = nn.Linear(H, 1)
        self.frame_position = nn.Linear(2 * POSITION_FEATURES + 1, H)
        self.frame_layers = nn.ModuleList(
            TransformerBlock(H, config.num_heads, ffn, config.dropout) for _ in range(config.frame_layers)
        )
        self.conv_layers = nn.ModuleList(
            FiLMConvBlock(H, config.conv_kernel, Z, config.dropout) for _ in range(config.conv_layers)
        )
        self.output_norm = nn.LayerNorm(H)
        self.output = nn.Linear(H, D)
        # the store's per-channel statistics and tail template (saved with the weights)
        self.register_buffer("state_mean", torch.zeros(D))
        self.register_buffer("state_std", torch.ones(D))
        self.register_buffer("tail_template", torch.zeros(config.max_frames, D))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FiLMConvBlock):  # start as identity modulation
            init.zeros_(module.film.weight)
            init.zeros_(module.film.bias)

    # ---- set-up from a store and a teacher ----

    def set_store_statistics(self, mean: Any, std: Any, tail_template: Any) -> None:
        """Copy the store's statistics() and tail_template() (numpy or torch) into the model."""
        with torch.no_grad():
            self.state_mean.copy_(torch.tensor(np.asarray(mean)))
            # a channel that never varies would divide by ~0; its normalised value carries nothing
            self.state_std.copy_(torch.tensor(np.asarray(std)).clamp(min=1e-4))
            self.tail_template.copy_(torch.tensor(np.asarray(tail_template)))

    def set_token_spellings(self, tokenizer: Any) -> None:
        """Record every token's text (UTF-8 bytes, leading space included) for the spelling encoder.

        The TTS behind the store's speech pronounces from spelling, and so does a human speaker, mostly:
        a token never seen in training still has familiar letters, where its embedding alone is unheard of.
        """
        if not self.config.spelling_channels:
            return
        limit = self.config.max_token_bytes
        table = torch.zeros(self.config.vocab_size, limit, dtype=torch.int32)
        for token_id in range(min(self.config.vocab_size, len(tokenizer))):
            data = tokenizer.decode([token_id]).encode("utf-8")[:limit]
            table[token_id, : len(data)] = torch.tensor(list(data), dtype=torch.int32) + 1
        with torch.no_grad():
            self.token_bytes.copy_(table)

    def language_ids(self, languages: Sequence[str]) -> torch.Tensor:
        """Language codes -> (B,) ids; an unknown code raises, listing the ones this TLE knows."""
        known = list(self.config.languages)
        unknown = sorted({code for code in languages if code not in known})
        if unknown:
            raise WhistleError(
                f"this TLE was not trained on language(s) {', '.join(unknown)}; it knows {', '.join(known)}. "
                "Train a TLE on a store that holds speech in those languages."
            )
        return torch.tensor([known.index(code) for code in languages], device=self.device)

    def spelled_languages(self) -> list[str]:
        """The TLE's languages its front end cannot speak, whose words it reads by their spelling; the front
        end warns once for each (call it where a stage starts, so the warning reaches its log)."""
        if self.front_end is None:
            return []
        return [code for code in self.config.languages if self.front_end.spelled(code)]

    def normalise(self, states: torch.Tensor) -> torch.Tensor:
        """Teacher-scale states (..., D) -> the store's per-channel normalised space."""
        return (states - self.state_mean) / self.state_std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (..., D) -> teacher scale."""
        return x * self.state_std + self.state_mean

    # ---- the network ----

    def check_pronunciation(self, tokens: torch.Tensor, pronunciation: PronunciationBatch | None) -> None:
        """Refuse a missing pronunciation batch for a TLE with a front end (the phonemes are never silently
        left out), a given one for a TLE without, and one laid out for other tokens."""
        if self.front_end is None and pronunciation is not None:
            raise WhistleError(
                'this TLE was trained without a pronunciation front end ([tle] pronunciation = "none"): '
                "pass no pronunciation batch (encode_texts without front_end)"
            )
        if self.front_end is None:
            return
        if pronunciation is None:
            raise WhistleError(
                f"this TLE reads each token's pronunciation ({self.front_end.backend.name} front end): pass "
                "pronunciation=TextBatch.pronunciation from encode_texts(..., front_end=tle.front_end)"
            )
        if pronunciation.phonemes.shape[:2] != tokens.shape:
            raise WhistleError(
                f"the pronunciation batch is laid out for tokens {tuple(pronunciation.phonemes.shape[:2])}, "
                f"the tokens are {tuple(tokens.shape)}: slice both alike"
            )

    def encode_text(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        language_ids: torch.Tensor,
        pronunciation: PronunciationBatch | None = None,
    ) -> torch.Tensor:
        """tokens (B, L), token_mask (B, L), language_ids (B,), the tokens' pronunciation (required with a
        front end) -> token states (B, L, H)."""
        self.check_pronunciation(tokens, pronunciation)
        B, L = tokens.shape
        # normalised first: teacher embeddings and fresh ones differ in scale by orders of magnitude
        x = self.token_projection(self.token_norm(self.token_embedding(tokens)))  # (B, L, H)
        if self.config.spelling_channels:
            spelled = self.token_bytes[tokens].long()  # (B, L, K) bytes + 1, 0 = padding
            chars = self.byte_embedding(spelled).flatten(0, 1).transpose(1, 2)  # (B*L, C, K)
            chars = F.gelu(self.spelling_conv(chars)).masked_fill(spelled.flatten(0, 1)[:, None, :] == 0, -1e4)
            spelling = chars.amax(-1).clamp(min=-1.0)  # (B*L, C) max over the bytes; a token without text: -1
            x = x + self.spelling_projection(spelling.view(B, L, -1))  # (B, L, H)
        if pronunciation is not None:
            x = x + self.phoneme_encoder(pronunciation)  # (B, L, H)
        x = x + self.language_embedding(language_ids)[:, None, :]
        x = x + self.token_position(sinusoids(torch.arange(L, device=tokens.device), POSITION_FEATURES).to(x.dtype))
        for layer in self.text_layers:
            x = layer(x, token_mask)
        return self.text_norm(x)  # (B, L, H)

    def encode_speech(self, target: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Normalised teacher frames (B, T, D) -> posterior mean and log-variance, concatenated (B, 2Z)."""
        keep = frame_mask[..., None].to(target.dtype)  # (B, T, 1)
        h = F.gelu(self.posterior_input(target)) * keep  # (B, T, H)
        for conv in self.posterior_convs:
            h = F.gelu(conv(h.transpose(1, 2)).transpose(1, 2)) * keep
        return self.posterior(masked_mean(h, frame_mask))  # (B, 2Z)

    def predict_log_durations(
        self, token_states: torch.Tensor, token_mask: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """(B, L, H), (B, L), (B, Z) -> log(1 + frames) per token (B, L)."""
        h = token_states + self.latent_projection(z)[:, None, :]
        for layer in self.duration_layers:
            h = layer(h, token_mask)
        return self.duration_head(h).squeeze(-1)  # (B, L)

    def durations_from_log(self, log_durations: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Predicted log(1 + frames) (B, L) -> integer frames per token (B, L), text tokens >= 1 frame."""
        text_token = token_mask.clone()
        lengths = token_mask.sum(1)  # (B,)
        text_token[torch.arange(len(lengths), device=lengths.device), lengths - 1] = False  # the end token may be 0
        frames = torch.expm1(log_durations.float()).clamp(min=0.0)
        return round_durations(frames, token_mask, self.config.max_frames, text_token.float())

    def forward(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        language_ids: torch.Tensor,
        durations: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        latent: torch.Tensor | None = None,
        sample_latent: bool | None = None,
        pronunciation: PronunciationBatch | None = None,
        longest: int | None = None,
    ) -> TLEOutput:
        """Predict normalised speech frames.

        tokens, token_mask (B, L); language_ids (B,); durations (B, L) frames per token (None: predicted),
        longest: the largest row sum of the given durations when the caller knows it (no read-back);
        target (B, T, D) normalised teacher frames aligned with `durations` (training: feeds the posterior);
        latent (B, Z) a given z (else posterior sample in training, prior mean in eval, prior sample if
        sample_latent); pronunciation: the tokens' PronunciationBatch, required with a front end.
        """
        token_states = self.encode_text(tokens, token_mask, language_ids, pronunciation)  # (B, L, H)
        prior_mean, prior_logvar = self.prior(masked_mean(token_states, token_mask)).chunk(2, dim=-1)  # (B, Z) x2
        posterior_mean = posterior_logvar = None
        sample = self.training if sample_latent is None else sample_latent
        if latent is None:
            if self.config.posterior and target is not None and durations is not None:
                frame_mask = torch.arange(target.shape[1], device=target.device) < durations.sum(1)[:, None]
                posterior_mean, posterior_logvar = self.encode_speech(target, frame_mask).chunk(2, dim=-1)
                mean, logvar = posterior_mean, posterior_logvar
            else:
                mean, logvar = prior_mean, prior_logvar
            latent = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean  # (B, Z)

        log_durations = self.predict_log_durations(token_states, token_mask, latent)  # (B, L)
        if durations is None:
            durations = self.durations_from_log(log_durations, token_mask)
        durations = durations * token_mask  # padded tokens get no frames

        x, _, offset, token_duration, frame_mask, lengths = length_regulate(  # (B, T, H)
            token_states, durations, longest
        )
        T = x.shape[1]
        position = torch.cat(
            [
                sinusoids(torch.arange(T, device=x.device), POSITION_FEATURES).expand(x.shape[0], T, -1),
                sinusoids(offset, POSITION_FEATURES),
                (offset.float() / token_duration.clamp(min=1).float())[..., None],  # how far through its token
            ],
            dim=-1,
        )  # (B, T, 2P + 1)
        x = x + self.frame_position(position.to(x.dtype)) + self.latent_projection(latent)[:, None, :]
        for layer in self.frame_layers:
            x = layer(x, frame_mask)
        for conv in self.conv_layers:
            x = conv(x, frame_mask, latent)
        states = self.output(self.output_norm(x)) * frame_mask[..., None].to(x.dtype)  # (B, T, D)
        return TLEOutput(
            states=states,
            frame_mask=frame_mask,
            lengths=lengths,
            durations=durations,
            log_durations=log_durations,
            latent=latent,
            prior_mean=prior_mean,
            prior_logvar=prior_logvar,
            posterior_mean=posterior_mean,
            posterior_logvar=posterior_logvar,
        )

    # ---- what finetune calls ----

    def speech_frames(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        language_ids: torch.Tensor,
        durations: torch.Tensor | None = None,
        latent: torch.Tensor | None = None,
        sample_latent: bool = False,
        pronunciation: PronunciationBatch | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-scale speech frames (B, T, D) and lengths (B,), at predicted lengths unless `durations`.

        z is the prior mean, or a draw from p(z | text) with sample_latent=True (varied voices/tempo);
        `pronunciation` (TextBatch.pronunciation) is required with a front end.
        """
        out = self(
            tokens,
            token_mask,
            language_ids,
            durations=durations,
            latent=latent,
            sample_latent=sample_latent,
            pronunciation=pronunciation,
        )
        return self.denormalise(out.states), out.lengths

    def full_window(self, speech: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Speech frames (B, T, D) + the tail template after each sample's length -> (B, max_frames, D).

        This is what the Whisper decoder receives, as `encoder_outputs`, in train-tle and finetune.
        """
        return assemble_window(speech, lengths, self.tail_template)


def assemble_window(speech: torch.Tensor, lengths: torch.Tensor, tail_template: torch.Tensor) -> torch.Tensor:
    """Frames [0, length) of each sample from `speech` (B, T, D), the rest from tail_template (F, D) -> (B, F, D)."""
    B, T, D = speech.shape
    max_frames = tail_template.shape[0]
    speech = F.pad(speech, (0, 0, 0, max_frames - T))  # (B, F, D)
    is_speech = torch.arange(max_frames, device=speech.device) < lengths[:, None]  # (B, F)
    return torch.where(is_speech[..., None], speech, tail_template.to(speech.dtype))


# ---- losses ----


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real frames and all channels: (B, T, D), (B, T, D), (B, T) -> ()."""
    keep = frame_mask[..., None].to(prediction.dtype)
    return ((prediction - target) ** 2 * keep).sum() / (keep.sum() * prediction.shape[-1]).clamp(min=1.0)


def masked_cosine(prediction: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-frame cosine similarity over real frames: (B, T, D), (B, T, D), (B, T) -> ()."""
    cosine = F.cosine_similarity(prediction.float(), target.float(), dim=-1)  # (B, T)
    keep = frame_mask.float()
    return (cosine * keep).sum() / keep.sum().clamp(min=1.0)


def stretch(frames: torch.Tensor, length: int) -> torch.Tensor:
    """Frames (n, D), n >= 1, stretched linearly in time to `length` frames, the first and last kept (one
    frame is held throughout) -> (length, D) float32."""
    in_time = frames.float().T[None]  # (1, D, n)
    if in_time.shape[-1] == 1:
        return in_time.expand(-1, -1, length)[0].T
    return F.interpolate(in_time, size=length, mode="linear", align_corners=True)[0].T


def stretched_cosine(
    prediction: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """Mean per-frame cosine of frames made at other lengths: each sample's prediction[b, :lengths[b]] is
    stretched linearly in time to target_lengths[b] frames and compared with target[b, :target_lengths[b]];
    the mean is over all target frames, as masked_cosine's. A sample predicted with no frame scores 0.
    (B, T, D), (B,), (B, T', D), (B,) -> ()."""
    total, frames = torch.zeros((), device=target.device), 0
    for row, length, real, real_length in zip(prediction, lengths.tolist(), target, target_lengths.tolist()):
        frames += int(real_length)
        if length >= 1 and real_length >= 1:
            stretched = stretch(row[:length], int(real_length))
            total = total + F.cosine_similarity(stretched, real[:real_length].float(), dim=-1).sum()
    return total / max(frames, 1)


def retimed(states: torch.Tensor, durations: torch.Tensor, new_durations: torch.Tensor) -> torch.Tensor:
    """One utterance's frames (T, D), whose tokens last `durations` (L,) frames, re-timed token by token to
    `new_durations` (L,): each token's frames stretched linearly in time to its new length (a token with no
    frame holds the frame where it falls) -> (sum(new_durations), D). Compares two recordings of one text at
    one timing: another voice's states re-timed to this voice's token durations."""
    pieces, start, last = [], 0, max(len(states) - 1, 0)
    for frames, new_frames in zip(durations.tolist(), new_durations.tolist()):
        if new_frames > 0:
            piece = states[start : start + frames] if frames > 0 else states[min(start, last)][None]
            pieces.append(stretch(piece, int(new_frames)))
        start += int(frames)
    return torch.cat(pieces) if pieces else states.new_zeros((0, states.shape[-1]), dtype=torch.float32)


def duration_loss(log_durations: torch.Tensor, durations: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """MSE of log(1 + frames) per token, plus the squared log error of each sample's total length -> ().

    The total term matters on its own: per-token errors add up, and ~5 % length error cost ~6 WER points.
    """
    keep = token_mask.float()
    target = torch.log1p(durations.float())
    per_token = ((log_durations.float() - target) ** 2 * keep).sum() / keep.sum().clamp(min=1.0)
    predicted_total = (torch.expm1(log_durations.float()).clamp(min=0.0) * keep).sum(1)  # (B,)
    total = (torch.log1p(predicted_total) - torch.log1p(durations.float().mul(keep).sum(1))) ** 2
    return per_token + total.mean()


def kl_divergence(output: TLEOutput) -> torch.Tensor:
    """KL per latent dimension (B, Z): KL(q(z|speech) || p(z|text)), or KL(p(z|text) || N(0, I))."""
    if output.posterior_mean is not None:
        q_mean, q_logvar = output.posterior_mean.float(), output.posterior_logvar.float()
        p_mean, p_logvar = output.prior_mean.float(), output.prior_logvar.float()
    else:
        q_mean, q_logvar = output.prior_mean.float(), output.prior_logvar.float()
        p_mean, p_logvar = torch.zeros_like(q_mean), torch.zeros_like(q_logvar)
    return 0.5 * (p_logvar - q_logvar + (q_logvar.exp() + (q_mean - p_mean) ** 2) / p_logvar.exp() - 1.0)


def free_bits_kl(kl: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Sum over latent dims of max(batch-mean KL, free_bits) (B, Z) -> (): dims under the floor cost nothing
    more to use, which keeps the latent from collapsing to the prior."""
    return kl.mean(0).clamp(min=free_bits).sum()


@dataclass(frozen=True)
class LossWeights:
    """Weights of one step; beta and decoder_ce change over training (annealing, phases)."""

    mse: float
    cosine: float
    length: float
    beta: float
    free_bits: float
    decoder_ce: float
    decoder_kl: float = 0.0


@dataclass
class LossTerms:
    """The total loss and its parts: () tensors on the loss's device, detached except `total` (read them
    back when they are logged, not every step: each read waits for the GPU)."""

    total: torch.Tensor
    mse: torch.Tensor
    cosine: torch.Tensor
    kl: torch.Tensor
    length: torch.Tensor
    decoder_ce: torch.Tensor | None
    decoder_kl: torch.Tensor | None = None


def tle_loss(
    output: TLEOutput,
    target: torch.Tensor,
    durations: torch.Tensor,
    token_mask: torch.Tensor,
    weights: LossWeights,
    decoder_ce: torch.Tensor | None = None,
    decoder_kl: torch.Tensor | None = None,
) -> LossTerms:
    """Combine the terms. output from forward(durations=the true durations, target=target);
    target (B, T, D) normalised teacher frames; decoder_ce and decoder_kl () from
    whistle_pipeline.decoder (the decoder's cross-entropy on the labels, its KL to the real states'
    distributions) or None."""
    frame_mask = output.frame_mask
    target = target[:, : frame_mask.shape[1]]
    mse = masked_mse(output.states.float(), target.float(), frame_mask)
    cosine = masked_cosine(output.states, target, frame_mask)
    kl = kl_divergence(output)
    length = duration_loss(output.log_durations, durations, token_mask)
    total = weights.mse * mse + weights.cosine * (1 - cosine) + weights.length * length
    total = total + weights.beta * free_bits_kl(kl, weights.free_bits)
    if decoder_ce is not None:
        total = total + weights.decoder_ce * decoder_ce
    if decoder_kl is not None:
        total = total + weights.decoder_kl * decoder_kl
    return LossTerms(
        total=total,
        mse=mse.detach(),
        cosine=cosine.detach(),
        kl=kl.sum(1).mean().detach(),
        length=length.detach(),
        decoder_ce=None if decoder_ce is None else decoder_ce.detach(),
        decoder_kl=None if decoder_kl is None else decoder_kl.detach(),
    )
