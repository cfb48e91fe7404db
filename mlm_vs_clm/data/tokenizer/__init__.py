"""Tokenizers: train a sentencepiece model, or load one (or a Hugging Face `tokenizer.json`).

    python -m mlm_vs_clm.data.tokenizer --input=SOURCE --vocab_size=N --out=DIR [--model_type=unigram|bpe]

SOURCE is any data source (`sources.open_source`: paths, globs, tfds:NAME, demo). The model
reserves pad=0, unk=1, bos=2, eos=3 and the control symbol `<mask>`=4 (the `config.tokens`
defaults) and uses byte fallback, so every string is encodable and `decode(encode(s)) == s`
(identity normalisation: no NFKC, whitespace kept).

Both kinds expose one interface: `encode(text) -> list[int]` (no bos/eos), `encode_batch`,
`decode(ids)`, `vocab_size`, `pad_id`, `unk_id`, `bos_id`, `eos_id`, `mask_id` (None when
absent), `special_ids`, `save(directory)`. `load_tokenizer(path)` takes a directory holding
`spiece.model` or `tokenizer.json` (and optionally `tokenizer_meta.json`), or the file itself.
"""

from __future__ import annotations

import abc
import io
import json
import os

import numpy as np
import sentencepiece as spm
import tokenizers
from absl import logging
from etils import epath

MODEL_FILE = "spiece.model"
HF_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "mask": "<mask>"}
# Hugging Face tokenizers name their special tokens in several ways; the first present wins.
HF_CANDIDATES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "mask": ("<mask>", "<|mask|>", "[MASK]"),
}
_ROLES = ("pad", "unk", "bos", "eos", "mask")
_MAX_LINE_CHARS = 2000  # training lines are cut to this (sentencepiece drops longer ones)


class TokenizerError(ValueError):
    """A tokenizer cannot be trained or loaded; the message names the file or the cause."""


class Tokenizer(abc.ABC):
    """The interface the pipeline, fine-tuning and conversion use."""

    kind = "abstract"
    vocab_size: int
    pad_id: int | None
    unk_id: int | None
    bos_id: int | None
    eos_id: int | None
    mask_id: int | None

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(sorted({i for i in (getattr(self, f"{r}_id") for r in _ROLES) if i is not None}))

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Implemented by each tokenizer kind."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_document(self, text: str) -> np.ndarray:
        """A pretraining document: int32 [bos] + ids + [eos] (each where the tokenizer has it);
        '' -> an empty array. The training pipeline and `data.prepare` both tokenize with this."""
        if not text:
            return np.zeros((0,), np.int32)
        bos = [] if self.bos_id is None else [self.bos_id]
        eos = [] if self.eos_id is None else [self.eos_id]
        return np.asarray(bos + self.encode(text) + eos, np.int32)

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Implemented by each tokenizer kind."""

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """Implemented by each tokenizer kind."""

    @abc.abstractmethod
    def save(self, directory: str) -> str:
        """Implemented by each tokenizer kind."""

    def _meta(self) -> dict:
        return dict(kind=self.kind, vocab_size=self.vocab_size, **{f"{r}_id": getattr(self, f"{r}_id") for r in _ROLES})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, special_ids={self.special_ids})"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, name: str = "sentencepiece model"):
        self._proto, self._name = bytes(model_proto), name
        self._load()

    def _load(self):
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError with C++ text
            raise TokenizerError(f"tokenizer {self._name!r}: not a valid sentencepiece model ({e})") from e
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        ids = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
        for role, i in ids.items():
            setattr(self, f"{role}_id", i if i >= 0 else None)
        mask = sp.piece_to_id(SPECIAL_PIECES["mask"])
        self.mask_id = mask if mask != sp.unk_id() and sp.id_to_piece(mask) == SPECIAL_PIECES["mask"] else None

    def __getstate__(self):
        return {"proto": self._proto, "name": self._name}

    def __setstate__(self, state):
        self._proto, self._name = state["proto"], state["name"]
        self._load()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, MODEL_FILE), "wb") as f:
            f.write(self._proto)
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(self._meta(), f, indent=1)
        return directory


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` model; special ids from `tokenizer_meta.json` or token names."""

    kind = "huggingface"

    def __init__(self, tokenizer_json: str, meta: dict | None = None, name: str = HF_FILE):
        self._json, self._meta_in, self._name = tokenizer_json, dict(meta or {}), name
        self._load()

    def _load(self):
        try:
            self._tok = tokenizers.Tokenizer.from_str(self._json)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"tokenizer {self._name!r}: not a valid tokenizer.json ({e})") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        for role in _ROLES:
            if f"{role}_id" in self._meta_in:
                value = self._meta_in[f"{role}_id"]
            else:
                value = next((vocab[t] for t in HF_CANDIDATES[role] if t in vocab), None)
            setattr(self, f"{role}_id", None if value is None else int(value))

    def __getstate__(self):
        return {"json": self._json, "meta": self._meta_in, "name": self._name}

    def __setstate__(self, state):
        self._json, self._meta_in, self._name = state["json"], state["meta"], state["name"]
        self._load()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, HF_FILE), "w", encoding="utf-8") as f:
            f.write(self._json)
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(self._meta(), f, indent=1)
        return directory


def load_tokenizer(path: str) -> Tokenizer:
    """A directory with `spiece.model` or `tokenizer.json`, or either file -> Tokenizer."""
    p = epath.Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer: {os.fspath(path)!r} does not exist")
    if p.is_dir():
        candidates = [p / MODEL_FILE, p / HF_FILE]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise TokenizerError(f"tokenizer: directory {os.fspath(path)!r} has neither {MODEL_FILE} nor {HF_FILE}")
        p = found[0]
    meta_path = p.parent / META_FILE
    meta = None
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"tokenizer: {os.fspath(meta_path)!r} is not valid JSON ({e})") from e
    if p.suffix == ".json":
        return HFTokenizer(p.read_text(), meta, name=os.fspath(p))
    return SentencePieceTokenizer(p.read_bytes(), name=os.fspath(p))


def _training_lines(texts):
    for text in texts:
        for line in text.splitlines():
            for start in range(0, len(line), _MAX_LINE_CHARS):
                piece = line[start : start + _MAX_LINE_CHARS]
                if piece.strip():
                    yield piece


def _sample_lines(lines: list[str], size: int, seed: int) -> list[str]:
    """`size` of the lines, chosen with `seed` and kept in order (all when there are fewer)."""
    if len(lines) <= size:
        return lines
    keep = np.sort(np.random.default_rng(seed).choice(len(lines), size, replace=False))
    return [lines[i] for i in keep]


def train_tokenizer(
    texts, vocab_size: int, out_dir: str | None = None, model_type: str = "unigram", exact: bool = False,
    input_sentence_size: int = 4_000_000, seed: int = 0,
) -> SentencePieceTokenizer:
    """Trains a sentencepiece model in-process on an iterable of documents.

    `vocab_size` is an upper bound: text too small for it (the 4 MB demo corpus supports ~24k
    unigram pieces) gives a smaller vocabulary, with a warning; the model's embedding table
    may be larger than the tokenizer (unused rows). With `exact=True` a `TokenizerError` says
    instead that the text is too small and which size it supports.

    Training reads at most `input_sentence_size` lines, sampled here with `seed`, so the same
    text gives the same model in every process (sentencepiece's own sampling differs between
    processes, even after `set_random_generator_seed`, with sentencepiece 0.2.3).
    """
    if model_type not in ("unigram", "bpe"):
        raise TokenizerError(f"tokenizer: model_type {model_type!r} is not 'unigram' or 'bpe'")
    reserved = len(SPECIAL_PIECES) + 256  # special pieces + byte-fallback pieces
    if vocab_size <= reserved:
        raise TokenizerError(f"tokenizer: vocab_size {vocab_size} must exceed the {reserved} reserved pieces")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_sample_lines(list(_training_lines(texts)), input_sentence_size, seed)),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            hard_vocab_limit=exact,
            character_coverage=0.9995,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            max_sentence_length=4 * _MAX_LINE_CHARS + 64,
            input_sentence_size=0,  # all of the lines sampled above
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=SPECIAL_PIECES["pad"], unk_piece=SPECIAL_PIECES["unk"],
            bos_piece=SPECIAL_PIECES["bos"], eos_piece=SPECIAL_PIECES["eos"],
            control_symbols=[SPECIAL_PIECES["mask"]],
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e).strip().splitlines()[-1]
        if "smaller than required_chars" in message:
            raise TokenizerError(f"tokenizer: vocab_size={vocab_size} is too small for the characters "
                                 f"of the training text ({message})") from e
        if "Vocabulary size too high" in message:
            raise TokenizerError(
                f"tokenizer: the training text is too small for vocab_size={vocab_size} ({message}); "
                "use more text or a smaller data.tokenizer_vocab_size"
            ) from e
        raise TokenizerError(f"tokenizer: sentencepiece training failed ({message})") from e
    tokenizer = SentencePieceTokenizer(model.getvalue(), name="trained sentencepiece model")
    if tokenizer.vocab_size < vocab_size:
        logging.warning("tokenizer: the text supports %d pieces, fewer than vocab_size=%d", tokenizer.vocab_size,
                        vocab_size)
    logging.info("tokenizer: trained %s, %d pieces", model_type, tokenizer.vocab_size)
    if out_dir:
        tokenizer.save(out_dir)
    return tokenizer
