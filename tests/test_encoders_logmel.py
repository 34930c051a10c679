"""Log-mel audio tower: WAV reading, resampling and the spectrogram against loop references."""

from __future__ import annotations

import math
import wave

import numpy as np
import pytest
import torch

from modalign.encoders import Encoder, load_encoder
from modalign.encoders.logmel import (
    LogMelEncoder,
    LogMelSpectrogram,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    read_wav,
    resample,
    spectrogram_pixels,
)

torch.set_num_threads(2)


def _write_wav(path, ints: np.ndarray, width: int, rate: int, channels: int = 1) -> None:
    if width == 1:
        data = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        u = ints.astype(np.int64) & 0xFFFFFF
        data = np.stack([u & 0xFF, (u >> 8) & 0xFF, (u >> 16) & 0xFF], -1).astype(np.uint8)
        data = data.tobytes()
    else:
        data = ints.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)


def _sine_wav(path, freq: float, rate: int = 22050, seconds: float = 1.0) -> None:
    t = np.arange(int(rate * seconds)) / rate
    _write_wav(path, np.round(0.5 * 32767 * np.sin(2 * np.pi * freq * t)), 2, rate)


@pytest.fixture(scope="module")
def tower() -> LogMelEncoder:
    return LogMelEncoder(max_seconds=1.0)


@pytest.mark.parametrize("width,full_scale", [(1, 128), (2, 32768), (3, 1 << 23), (4, 1 << 31)])
def test_read_wav_scales_every_pcm_width(tmp_path, width, full_scale):
    ints = np.array([0, 1, -1, full_scale - 1, -full_scale, 7])
    path = tmp_path / f"w{width}.wav"
    _write_wav(path, ints, width, 8000)
    x, rate = read_wav(path)
    assert rate == 8000 and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), ints / full_scale, rtol=1e-6, atol=1e-7)


def test_read_wav_mixes_stereo_to_mono(tmp_path):
    left_right = np.array([[1000, 3000], [-2000, 0], [100, 100]])
    path = tmp_path / "stereo.wav"
    _write_wav(path, left_right.reshape(-1), 2, 16000, channels=2)
    x, _ = read_wav(path)
    np.testing.assert_allclose(x.numpy(), left_right.mean(1) / 32768, rtol=1e-6)


def _resample_reference(x: np.ndarray, orig: int, new: int, width: int = 16,
                        rolloff: float = 0.99) -> np.ndarray:
    """Windowed-sinc interpolation by loops over every output and every input sample."""
    fc = rolloff * min(orig, new) / 2
    half = width / (2 * fc)
    out = []
    for n in range(math.ceil(len(x) * new / orig)):
        t = n / new
        total = 0.0
        for i, xi in enumerate(x):
            tau = t - i / orig
            if abs(tau) > half:
                continue
            arg = 2 * fc * tau
            sinc = 1.0 if arg == 0 else math.sin(math.pi * arg) / (math.pi * arg)
            total += xi * (2 * fc / orig) * sinc * math.cos(math.pi * tau / (2 * half)) ** 2
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("orig,new",
                         [(22050, 16000), (8000, 16000), (48000, 16000), (16001, 16000)])
def test_resample_matches_a_loop_reference(orig, new):
    rng = np.random.default_rng(orig)
    x = rng.standard_normal(90)
    got = resample(torch.from_numpy(x), orig, new)
    np.testing.assert_allclose(got.numpy(), _resample_reference(x, orig, new), atol=1e-10)


def test_resample_keeps_a_tone_and_passes_gradients():
    rate = 22050
    x = torch.sin(2 * math.pi * 1000 * torch.arange(rate) / rate).requires_grad_(True)
    y = resample(x, rate, 16000)
    assert y.shape == (16000,)
    spectrum = torch.fft.rfft(y.detach()[2000:14000]).abs()
    assert spectrum.argmax().item() * 16000 / 12000 == pytest.approx(1000, abs=2)
    y.pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert resample(y, 16000, 16000) is y


def test_mel_scale_roundtrip_and_filter_peaks():
    hz = torch.tensor([0.0, 440.0, 1000.0, 7999.0], dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(hz)), hz)
    assert hz_to_mel(torch.tensor(1000.0)).item() == pytest.approx(1000, abs=0.5)  # HTK anchor
    fb = mel_filterbank(512, 64, 16000, 20.0, 8000.0)
    assert fb.shape == (257, 64) and (fb >= 0).all() and fb.max() <= 1
    bin_hz = torch.arange(257) * 16000 / 512
    centres = LogMelSpectrogram().band_centres()
    peak_hz = bin_hz[fb.argmax(0)]
    assert (peak_hz - centres).abs().max() <= 16000 / 512  # within one FFT bin


def _logmel_reference(x: np.ndarray, sr: int, n_fft: int, win: int, hop: int, n_mels: int,
                      f_min: float, f_max: float, top_db: float) -> np.ndarray:
    """Reflect pad, Hann window centred in n_fft, DFT by sums, triangular mel filters by loops."""
    padded = np.pad(x, n_fft // 2, mode="reflect")
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    for n in range(win):
        window[left + n] = 0.5 - 0.5 * math.cos(2 * math.pi * n / win)  # periodic Hann
    mel_lo, mel_hi = 2595 * math.log10(1 + f_min / 700), 2595 * math.log10(1 + f_max / 700)
    edges = [700 * (10 ** ((mel_lo + (mel_hi - mel_lo) * j / (n_mels + 1)) / 2595) - 1)
             for j in range(n_mels + 2)]
    frames = 1 + len(x) // hop
    out = np.zeros((n_mels, frames))
    for f in range(frames):
        seg = padded[f * hop: f * hop + n_fft] * window
        for m in range(n_mels):
            energy = 0.0
            for k in range(n_fft // 2 + 1):
                re = sum(seg[n] * math.cos(2 * math.pi * k * n / n_fft) for n in range(n_fft))
                im = sum(seg[n] * math.sin(2 * math.pi * k * n / n_fft) for n in range(n_fft))
                freq = k * sr / n_fft
                lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
                weight = max(0.0, min((freq - lo) / (mid - lo), (hi - freq) / (hi - mid)))
                energy += weight * (re * re + im * im)
            out[m, f] = 10 * math.log10(max(energy, 1e-10))
    return np.maximum(out, out.max() - top_db)


def test_logmel_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(64)
    params = dict(n_fft=16, win=12, hop=8, n_mels=5, f_min=10.0, f_max=500.0, top_db=40.0)
    front = LogMelSpectrogram(sample_rate=1000, n_fft=16, win_length=12, hop_length=8, n_mels=5,
                              f_min=10.0, f_max=500.0, top_db=40.0).double()
    front.window = front.window.double()
    front.filters = front.filters.double()
    got = front(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(got, _logmel_reference(x, 1000, **params), atol=1e-5)


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0])
def test_sine_wav_peaks_in_the_mel_band_of_its_frequency(tmp_path, tower, freq):
    path = tmp_path / "tone.wav"
    _sine_wav(path, freq)
    waveform = tower.load_waveform(path)
    db = tower.frontend(waveform[None])[0]
    centres = tower.frontend.band_centres()
    peak_band = db.mean(-1).argmax().item()
    assert peak_band == (centres - freq).abs().argmin().item()


def test_spectrogram_image_has_low_frequencies_at_the_bottom(tmp_path, tower):
    low, high = tmp_path / "low.wav", tmp_path / "high.wav"
    _sine_wav(low, 300.0)
    _sine_wav(high, 5000.0)
    batch = tower.preprocess([low, high])
    assert batch.shape == (2, 3, 96, 96)
    assert batch.min() >= (0 - 127) / 128 and batch.max() <= (255 - 127) / 128
    brightest_row = batch[:, 0].mean(-1).argmax(-1)
    assert brightest_row[0] > 48 > brightest_row[1]


def test_pixels_map_the_dynamic_range_to_0_255():
    db = torch.tensor([[[-80.0, -40.0], [0.0, -100.0]]])
    pixels = spectrogram_pixels(db, top_db=80.0, image_size=2)
    # rows flipped: the first row of the image is the highest band
    expected = torch.tensor([[255.0, 0.0], [0.0, 127.5]])
    torch.testing.assert_close(pixels[0, 0], expected)
    torch.testing.assert_close(pixels[0, 1], pixels[0, 2])


def test_encoder_protocol_lengths_and_pairs(tmp_path, tower):
    assert isinstance(tower, Encoder)
    assert (tower.name, tower.modality, tower.dim) == ("logmel", "audio", 1280)
    rng = np.random.default_rng(1)
    long_clip = (rng.standard_normal(40000).astype(np.float32), 16000)   # cut to 1 s
    short_stereo = (rng.standard_normal((2, 4000)).astype(np.float32), 8000)
    with torch.no_grad():
        v = tower.encode(tower.preprocess([long_clip, short_stereo]))
    assert v.shape == (2, 1280) and torch.isfinite(v).all()
    first_second = (long_clip[0][:16000], 16000)
    torch.testing.assert_close(tower.preprocess([first_second]), tower.preprocess([long_clip]))
    assert "16000 Hz" in tower.identity()["preprocessing"]
    assert len(tower.blocks()) == 18
    assert load_encoder("logmel", max_seconds=0.5).max_seconds == 0.5


def test_bad_inputs_raise_value_errors(tmp_path, tower):
    not_wav = tmp_path / "x.wav"
    not_wav.write_bytes(b"not a wav at all")
    with pytest.raises(ValueError, match="not a PCM WAV"):
        read_wav(not_wav)
    with pytest.raises(ValueError, match="not a file"):
        read_wav(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="inputs must be"):
        tower.preprocess([])
    with pytest.raises(ValueError, match="waveform, sample_rate"):
        tower.preprocess([42])
    with pytest.raises(ValueError, match="waveform must be"):
        tower.preprocess([(np.zeros((2, 2, 2)), 16000)])
    with pytest.raises(ValueError, match="orig_rate"):
        resample(torch.zeros(10), 0, 16000)
    with pytest.raises(ValueError, match="max_seconds"):
        LogMelEncoder(max_seconds=0)
    with pytest.raises(ValueError, match="f_min"):
        mel_filterbank(512, 64, 16000, 20.0, 9000.0)


@pytest.mark.parametrize("rates", [(22050, 16000), (44100, 16000), (8000, 16000), (16001, 16000)])
def test_polyphase_resampling_equals_the_direct_computation(rates):
    from modalign.encoders.logmel import _resample_direct, resample

    x = torch.randn(3001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fast = resample(x, *rates)
    direct = _resample_direct(x, *rates, 16, 0.99)
    assert fast.shape == direct.shape
    # same taps, summed in another order: float64 rounding only
    torch.testing.assert_close(fast, direct, rtol=0, atol=1e-10)


def test_time_frame_tokens_are_the_head_map_columns_and_pool_to_the_vector(tower, tmp_path):
    from modalign.data.dataset import Item, PairedDataset
    from modalign.embed.tokens import embed_tokens, load_tokens

    for i, freq in enumerate((440.0, 1800.0)):
        _sine_wav(tmp_path / f"{i}.wav", freq, seconds=0.4 + 0.3 * i)
    clips = [str(tmp_path / "0.wav"), str(tmp_path / "1.wav")]
    batch = tower.preprocess(clips)
    with torch.no_grad():
        tokens, mask = tower.encode_tokens(batch)
        fmap = tower.image_tower.net.spatial_features(batch)
        vectors = tower.encode(batch)
    w = tower.image_tower.net.output_side(96)
    assert tokens.shape == (2, w, 1280) and bool(mask.all())
    assert tower.token_counts(clips) == [w, w] == [3, 3]
    for b in range(2):  # naive: token j is column j of the map, averaged over frequency rows
        for j in range(w):
            naive = sum(fmap[b, :, r, j] for r in range(fmap.shape[2])) / fmap.shape[2]
            torch.testing.assert_close(tokens[b, j], naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens.mean(1), vectors, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch must be"):
        tower.encode_tokens(torch.zeros(2, 96, 96))

    items = [Item(f"a{i}", "audio", "speech", f"{i}.wav", f"g{i}", "test") for i in range(2)]
    store = embed_tokens(PairedDataset("clips", items, root=tmp_path), {"audio": tower},
                         tmp_path / "emb", progress=False)
    tf = load_tokens(store, "audio")
    assert tf.offsets.tolist() == [0, 3, 6]
    np.testing.assert_allclose(tf.tokens(1), tokens[1].numpy(), rtol=1e-5, atol=1e-5)
