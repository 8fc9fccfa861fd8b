"""The one audio path (anymodal.data.media): every reader gives the same samples, integer formats
scale one way, the WAV writer round-trips and is atomic, and bad files fail in one line."""

from __future__ import annotations

import io
import json
import pathlib
import wave
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io.wavfile
import soundfile
import torch

from anymodal.cli import main as cli_main
from anymodal.data import media
from anymodal.data.media import BAD_AUDIO, BadRecord, encode_wav, load_audio, save_wav
from anymodal.data.reader import decode_sample
from anymodal.sample.prompt import parse_prompt, prompt_segments
from anymodal.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig, decode_file, encode_file
from anymodal.train.audio_tokenizer import load_speech

SR_IN, SR = 22050, 16000
TINY = dict(sample_rate=SR, channels=8, max_channels=32, strides=[4, 4, 5], stem=False, plain_stages=1,
            res_dilations=[1], latent_dim=16, n_q=3, codebook_size=32, kmeans_iters=2)


def stereo_signal(seconds: float = 0.5) -> np.ndarray:
    """float64 [T, 2] at SR_IN: different tones left and right, so the down-mix is visible."""
    t = np.arange(int(SR_IN * seconds)) / SR_IN
    return np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1000 * t)], 1)


def pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)


def wav_bytes(frames: np.ndarray, sr: int, width: int) -> bytes:
    """Integer PCM WAV with the stdlib writer (independent of the code under test)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1 if frames.ndim == 1 else frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(sr)
        if width == 3:  # little-endian 24-bit: the low three bytes of each int32
            raw = frames.astype("<i4").reshape(-1, 1).view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        else:
            raw = frames.astype({1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes()
        w.writeframes(raw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The same stereo int16 signal at 22.05 kHz as WAV, FLAC and (lossy) OGG Vorbis."""
    d = tmp_path_factory.mktemp("audio")
    pcm = pcm16(stereo_signal())
    files = {"wav": d / "s.wav", "flac": d / "s.flac", "ogg": d / "s.ogg"}
    files["wav"].write_bytes(wav_bytes(pcm, SR_IN, 2))
    soundfile.write(files["flac"], pcm, SR_IN, format="FLAC", subtype="PCM_16")
    soundfile.write(files["ogg"], pcm.astype(np.float32) / 32768, SR_IN, format="OGG", subtype="VORBIS")
    return files


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> pathlib.Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tok")
    AudioTokenizer(AudioTokenizerConfig(**TINY)).save(d)
    return d


@pytest.fixture
def encoded_waves(monkeypatch) -> list[np.ndarray]:
    """Records every wave the audio tokenizer is asked to encode (the samples a path read)."""
    seen: list[np.ndarray] = []
    original = AudioTokenizer.encode

    def spy(self, wave_, levels=None):
        seen.append(wave_[0].detach().cpu().numpy().copy())
        return original(self, wave_, levels)

    monkeypatch.setattr(AudioTokenizer, "encode", spy)
    return seen


def test_every_path_reads_the_same_samples(audio_files, tok_dir, encoded_waves, tmp_path):
    from webdataset import TarWriter

    shards = str(tmp_path / "a-00000.tar")
    with TarWriter(shards, encoder=False) as tar:
        for ext, p in audio_files.items():
            rec = {"segments": [{"audio": f"0.{ext}"}, {"text": ext}], "kind": "asr"}
            tar.write({"__key__": ext, "json": json.dumps(rec).encode(), f"0.{ext}": p.read_bytes()})
    trainer_clips = load_speech(shards, SR)  # (b) the codec trainer's loader, in shard order
    tok = SimpleNamespace(image=None, audio=AudioTokenizer.load(tok_dir))
    got = {}
    for i, (ext, p) in enumerate(audio_files.items()):
        data = p.read_bytes()
        sample = {"__key__": ext, "__shard__": "mem", "json": json.dumps(
            {"segments": [{"audio": f"0.{ext}"}], "kind": "asr"}).encode(), f"0.{ext}": data}
        ref = load_audio(data, SR)
        assert ref.dtype == np.float32 and ref.shape == (round(0.5 * SR),)
        paths = {
            "reader": decode_sample(sample, sample_rate=SR).audio[0],  # (a) raw shards
            "trainer": trainer_clips[i],  # (b)
        }
        encoded_waves.clear()
        encode_file(tok_dir, p, tmp_path / f"{ext}.json")  # (c) `anymodal tokenizer encode audio`
        paths["tokenizer encode"] = encoded_waves[-1]
        encoded_waves.clear()
        segments, _ = prompt_segments(parse_prompt("transcribe:", audios=[str(p)]), tok)  # (d) `sample --audio`
        assert [type(s).__name__ for s in segments] == ["Audio", "Text"]
        paths["sample --audio"] = encoded_waves[-1]
        for name, w in paths.items():
            assert np.array_equal(w, ref), (ext, name)
        got[ext] = ref
    # lossless formats of the same int16 data decode to identical samples
    assert np.array_equal(got["wav"], got["flac"])
    # and they are the mono mix of the signal, resampled to 16 kHz (edges aside)
    t = np.arange(len(got["wav"])) / SR
    want = 0.5 * (0.4 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 1000 * t))
    assert np.abs(got["wav"][200:-200] - want[200:-200]).max() < 2e-3
    # Vorbis is lossy: close, not equal
    assert np.abs(got["ogg"][200:-200] - want[200:-200]).max() < 0.05


def test_integer_formats_scale_one_way(tmp_path):
    assert np.array_equal(load_audio(wav_bytes(np.full(100, 16384, np.int16), SR, 2), SR), np.full(100, 0.5, np.float32))
    assert load_audio(wav_bytes(np.full(10, -32768, np.int16), SR, 2), SR)[0] == -1.0
    # a signal on the 16-bit grid is exactly representable in every format: all read equal
    x = pcm16(0.8 * np.sin(2 * np.pi * 300 * np.arange(4000) / SR))
    want = x.astype(np.float32) / 32768
    scipy.io.wavfile.write(tmp_path / "f32.wav", SR, want)  # IEEE float WAV
    variants = {
        "int16": wav_bytes(x, SR, 2),
        "int24": wav_bytes(x.astype(np.int32) << 8, SR, 3),
        "int32": wav_bytes(x.astype(np.int32) << 16, SR, 4),
        "float32": (tmp_path / "f32.wav").read_bytes(),
    }
    for name, data in variants.items():
        assert np.array_equal(load_audio(data, SR), want), name
    # off the 16-bit grid: 24-bit keeps 2**-23 resolution
    y = 0.6 * np.sin(2 * np.pi * 250 * np.arange(4000) / SR)
    y24 = np.rint(y * 2**23).astype(np.int32)
    assert np.abs(load_audio(wav_bytes(y24, SR, 3), SR) - y).max() <= 2**-23
    # 8-bit WAV is unsigned around 128
    u8 = np.array([0, 64, 128, 192, 255], np.uint8)
    assert np.array_equal(load_audio(wav_bytes(u8, SR, 1), SR), (u8.astype(np.float32) - 128) / 128)


def test_save_wav_round_trip_and_format(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-1, 1, 5000), [1.0, -1.0, 0.0, 0.5]]).astype(np.float32)
    p = save_wav(x, SR, tmp_path / "sub" / "x.wav")  # parents are created
    assert p == tmp_path / "sub" / "x.wav"
    y = load_audio(p, SR)
    assert y.shape == x.shape and np.abs(y - x).max() <= 1 / 32768
    with wave.open(str(p)) as w:  # 16-bit PCM mono at the given rate
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, SR, len(x))
    assert p.read_bytes() == encode_wav(x, SR)  # one implementation: the file is the bytes
    assert encode_wav(x, SR) == encode_wav(x, SR)  # deterministic
    # out of range clips; int16 passes through unchanged
    assert np.array_equal(load_audio(encode_wav(np.array([3.0, -3.0], np.float32), SR), SR),
                          np.array([32767 / 32768, -1.0], np.float32))
    i16 = np.array([1, -2, 32767, -32768], np.int16)
    assert np.array_equal(load_audio(encode_wav(i16, SR), SR), i16 / np.float32(32768))


def test_save_wav_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.wav"
    old = np.full(800, 0.25, np.float32)
    save_wav(old, SR, target)
    before = target.read_bytes()
    real_write = pathlib.Path.write_bytes

    def crash_half_way(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_wav(np.zeros(16000, np.float32), SR, target)
    monkeypatch.undo()
    assert target.read_bytes() == before  # the old file, never half a new one
    new = np.linspace(-0.5, 0.5, 16000, dtype=np.float32)
    save_wav(new, SR, target)  # the crash's half-written temporary is overwritten and renamed
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out.wav"]  # no .tmp left
    assert np.abs(load_audio(target, SR) - new).max() <= 1 / 32768


def test_writers_everywhere_are_the_one_writer(tok_dir, tmp_path):
    import anymodal.sample.render as render
    import anymodal.tokenizers.audio as tok_audio
    import anymodal.train.audio_tokenizer as trainer

    assert render.save_wav is trainer.save_wav is tok_audio.save_wav is media.save_wav
    # `anymodal tokenizer decode audio` writes what the codec decodes, through save_wav
    codes = [[1, 2, 3]] * 10
    (tmp_path / "c.json").write_text(json.dumps({"codes": codes, "sample_rate": SR, "num_samples": 750}))
    decode_file(tok_dir, tmp_path / "c.json", tmp_path / "c.wav")
    want = AudioTokenizer.load(tok_dir).decode(torch.tensor(codes)[None])[0, :750].numpy()
    assert (tmp_path / "c.wav").read_bytes() == encode_wav(want, SR)


@pytest.mark.parametrize("data", [
    b"RIFF\x10\x00\x00\x00WAVEjunkjunk",  # a WAV header with no data chunk
    b"this is not audio at all, just some text" * 4,
    b"fLaC" + bytes(range(200)),  # a FLAC magic and garbage
])
def test_corrupt_audio_is_bad_audio_in_one_line(data, tmp_path):
    for src in (data, tmp_path / "bad.wav"):
        (tmp_path / "bad.wav").write_bytes(data)
        with pytest.raises(BadRecord) as e:
            load_audio(src, SR)
        assert e.value.reason == BAD_AUDIO and "\n" not in str(e.value) and "BytesIO" not in str(e.value)


def test_corrupt_file_through_the_cli_exits_2(tok_dir, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    out = tmp_path / "codes.json"
    rc = cli_main(["tokenizer", "encode", "audio", "--tokenizer", str(tok_dir), str(bad), str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith("anymodal: error:") and BAD_AUDIO in err, err
    assert "Traceback" not in err
