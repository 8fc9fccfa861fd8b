"""Speech for the demo world with `espeak-ng`, fast and deterministic.

One espeak-ng process per utterance costs more than the synthesis itself, so utterances are
synthesized in batches inside worker processes that call `libespeak-ng` through ctypes. The
library carries state from one utterance to the next (its pitch "flutter" phase, noise seeds),
so the same text can come out slightly different later in a process. To keep output a pure
function of the seed, every batch runs in a *fresh* process (`maxtasksperchild=1`) and batches
are cut at fixed document indices: a batch's audio depends only on its own utterance list.
Where the library cannot be loaded, the `espeak-ng` command is run once per utterance
(a fresh process each time, hence deterministic too). Either way the samples go through the data
layer's one audio path (`media.resample`, `media.to_pcm16`; the command's WAV through `load_audio`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .media import EMPTY_AUDIO, BadRecord, from_pcm16, load_audio, resample, to_pcm16


@dataclass(frozen=True)
class Utterance:
    text: str
    voice: str = "en-us"
    speed: int = 160  # words per minute
    pitch: int = 50  # 0-100


def espeak_command() -> str | None:
    return shutil.which("espeak-ng")


def espeak_available() -> bool:
    """True when espeak-ng can be used (the command or the shared library)."""
    return espeak_command() is not None or _library_path() is not None


def _library_path() -> str | None:
    for name in ("libespeak-ng.so.1", "libespeak-ng.so", "libespeak-ng.dylib"):
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    found = ctypes.util.find_library("espeak-ng")
    return found


class _Library:
    """libespeak-ng in synchronous mode, collecting samples through the synth callback."""

    AUDIO_OUTPUT_SYNCHRONOUS = 2
    RATE, PITCH = 1, 3  # espeak_PARAMETER
    CHARS_UTF8, ENDPAUSE = 1, 0x1000

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.sample_rate = self.lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
        if self.sample_rate <= 0:
            raise OSError("espeak_Initialize failed")
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.chunks: list[np.ndarray] = []
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = proto(self._collect)  # keep a reference: espeak calls it later
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if n > 0 and wav:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    def synth(self, u: Utterance) -> np.ndarray:
        if self.lib.espeak_SetVoiceByName(u.voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {u.voice!r}")
        self.lib.espeak_SetParameter(self.RATE, int(u.speed), 0)
        self.lib.espeak_SetParameter(self.PITCH, int(u.pitch), 0)
        self.chunks = []
        text = u.text.encode() + b"\0"
        self.lib.espeak_Synth(text, len(text), 0, 0, 0, self.CHARS_UTF8 | self.ENDPAUSE, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)


def _synth_command(u: Utterance, sample_rate: int) -> np.ndarray:
    """One utterance through the `espeak-ng --stdout` command -> float32 [T] at `sample_rate`.

    Its WAV header carries placeholder sizes (a stream); `load_audio` (libsndfile) reads it to the end.
    """
    cmd = [espeak_command() or "espeak-ng", "--stdout", "-v", u.voice, "-s", str(int(u.speed)),
           "-p", str(int(u.pitch)), "--", u.text]
    proc = subprocess.run(cmd, capture_output=True, check=True)
    try:
        return load_audio(proc.stdout, sample_rate)
    except BadRecord as e:
        if e.reason == EMPTY_AUDIO:
            return np.zeros(0, np.float32)  # as the library path: nothing said, no samples
        raise ValueError(f"espeak-ng wrote no readable WAV ({e})") from None


def synthesize_batch(utterances: list[Utterance], sample_rate: int = 16000) -> list[np.ndarray]:
    """Utterances -> int16 waves at `sample_rate`. Call in a fresh process for determinism."""
    path = _library_path()
    lib = None
    if path is not None:
        try:
            lib = _Library(path)
        except (OSError, AttributeError):
            lib = None
    out = []
    for u in utterances:
        if lib is not None:
            wave = resample(from_pcm16(lib.synth(u)), lib.sample_rate, sample_rate)
        else:
            wave = _synth_command(u, sample_rate)
        out.append(to_pcm16(wave))
    return out


def _job(args):
    return synthesize_batch(*args)


class SpeechPool:
    """Synthesize batches in fresh worker processes, results in submission order.

    `submit(batch)` queues a batch; `results()` yields finished batches in order. At most
    `2 * workers + 1` batches are in flight so memory stays bounded on large corpora.
    """

    def __init__(self, workers: int = 2, sample_rate: int = 16000):
        self.sample_rate = sample_rate
        # Workers come from a forkserver: a small clean process (never touched libespeak-ng, no
        # torch threads) that forks each worker cheaply, with this module already imported.
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
        else:
            ctx = multiprocessing.get_context("spawn")
        self.pool = ctx.Pool(max(1, workers), maxtasksperchild=1)
        self.pending: deque = deque()
        self.max_pending = 2 * max(1, workers) + 1

    def submit(self, batch: list[Utterance]):
        self.pending.append(self.pool.apply_async(_job, ((batch, self.sample_rate),)))

    def full(self) -> bool:
        return len(self.pending) >= self.max_pending

    def pop(self) -> list[np.ndarray]:
        """The oldest submitted batch's waves (waits for it)."""
        try:
            return self.pending.popleft().get()
        except (ValueError, subprocess.CalledProcessError) as e:  # a voice espeak-ng does not know

            raise UserError(f"espeak-ng failed: {e}") from None

    def close(self):
        self.pool.close()
        self.pool.join()

    def terminate(self):
        self.pool.terminate()
        self.pool.join()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.terminate()


if __name__ == "__main__":  # quick manual check: python -m anymodal.data.speech "some text"
    from .media import save_wav

    w = synthesize_batch([Utterance(" ".join(sys.argv[1:]) or "hello world")])[0]
    save_wav(w, 16000, os.environ.get("OUT", "speech.wav"))
