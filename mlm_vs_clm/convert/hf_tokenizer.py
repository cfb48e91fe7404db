"""Tokenizers across the conversion: ours -> files `AutoTokenizer` loads, and a Hugging Face
`tokenizer.json` -> our tokenizer interface, with a mask token added when it has none.

Export: a sentencepiece model becomes a `tokenizers` Unigram/BPE model through transformers'
own sentencepiece converter (same ids); the role tokens are registered as special tokens.
Encoders: `tokenizer(text)` adds bos/eos around each text, as our data pipeline does; causal
models: bos only (a prompt to continue must not end in eos). The mask token swallows the
spaces around it the way the tokenizer needs (`the <mask> fell` -> the ids of `the`, mask,
`fell`, what MLM training showed the model): spaces on both sides for sentencepiece-style
(Metaspace) tokenizers, whose next word piece carries its own `▁`; the space before it for
byte-level ones, RoBERTa-style.
Import: the mask token is the tokenizer's own, else the first reserved special token
(renamed `<|mask|>`, as Llama-3's `<|reserved_special_token_0|>` = 128002 in the study), else
a new `<|mask|>` appended after the vocabulary.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import tokenizers
from tokenizers import processors

from mlm_vs_clm.convert import ConversionError
from mlm_vs_clm.data.tokenizer import load_tokenizer

MASK_TOKEN = "<|mask|>"
ROLES = ("pad", "unk", "bos", "eos", "mask")
_RESERVED = re.compile(r"reserved|^<unused\d+>$|^\[unused\d+\]$")


def _spm_to_tokenizers(model_proto: bytes):
    # transformers: the `hf` extra, heavy; only a sentencepiece export needs its converter
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_proto)
    if proto.trainer_spec.model_type == 1:  # unigram
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # legacy=True: the dummy prefix exactly as sentencepiece adds it (checked on leading spaces).
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if tok is None:
        raise ConversionError("export-hf: this sentencepiece model type cannot be converted")
    return tok


def _uses_metaspace(tok) -> bool:
    """True for sentencepiece-style tokenizers (a word piece starts with '▁')."""
    data = json.loads(tok.to_str())
    pre, norm = (json.dumps(data.get(k), ensure_ascii=False) for k in ("pre_tokenizer", "normalizer"))
    return "Metaspace" in pre or "\u2581" in norm  # '▁' replacing spaces


def mask_added_token(name: str, metaspace: bool):
    """The mask as an AddedToken that eats the spaces a typed `<mask>` brings (see above)."""
    return tokenizers.AddedToken(name, special=True, normalized=False, lstrip=True, rstrip=metaspace)


def to_hf_tokenizer(tokenizer, causal: bool = False):
    """Our tokenizer -> transformers.PreTrainedTokenizerFast with the same ids (bos + text +
    eos per text; causal: bos + text)."""
    from transformers import PreTrainedTokenizerFast  # the `hf` extra, heavy: only for a transformers tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        if os.path.exists(os.path.join(tmp, "tokenizer.json")):
            tok = tokenizers.Tokenizer.from_file(os.path.join(tmp, "tokenizer.json"))
        elif os.path.exists(os.path.join(tmp, "spiece.model")):
            with open(os.path.join(tmp, "spiece.model"), "rb") as f:
                tok = _spm_to_tokenizers(f.read())
        else:
            raise ConversionError(
                f"export-hf: the tokenizer saved neither tokenizer.json nor spiece.model ({os.listdir(tmp)})")
    names = {}
    for role in ROLES:
        token_id = getattr(tokenizer, f"{role}_id", None)
        if token_id is not None:
            names[role] = tok.id_to_token(token_id)
    metaspace = _uses_metaspace(tok)
    tok.add_special_tokens([
        mask_added_token(n, metaspace) if role == "mask" else tokenizers.AddedToken(n, special=True, normalized=False)
        for role, n in names.items()
    ])
    for role, name in names.items():
        if tok.token_to_id(name) != getattr(tokenizer, f"{role}_id"):
            raise ConversionError(f"export-hf: the {role} token {name!r} does not keep its id")
    bos, eos = names.get("bos"), (None if causal else names.get("eos"))
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(["$B:1"] + ([f"{eos}:1"] if eos else []))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(n, tok.token_to_id(n)) for n in (bos, eos) if n]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
        **{f"{role}_token": name for role, name in names.items()},
    )


def write_hf_tokenizer(tokenizer, out_dir: str, causal: bool = False) -> None:
    to_hf_tokenizer(tokenizer, causal=causal).save_pretrained(out_dir)


# ---------------------------------------------------------------------------- import


def _token_name(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


def _declared_roles(hf_dir: str, vocab: dict) -> dict:
    """role -> id from tokenizer_config.json / special_tokens_map.json, then config.json ids."""
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(hf_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            for role in ROLES:
                token = _token_name(data.get(f"{role}_token"))
                if role not in found and isinstance(token, str) and token in vocab:
                    found[role] = vocab[token]
    path = os.path.join(hf_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        for role in ROLES:
            value = data.get(f"{role}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if role not in found and isinstance(value, int) and value >= 0:
                found[role] = value
    return found


def _rename_token(data: dict, old: str, new: str) -> None:
    for entry in data.get("added_tokens", []):
        if entry["content"] == old:
            entry["content"] = new
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    elif isinstance(vocab, list):
        for item in vocab:
            if item[0] == old:
                item[0] = new


def import_hf_tokenizer(hf_dir: str, out_dir: str, vocab_size: int):
    """Writes out_dir/tokenizer.json (+ tokenizer_meta.json) and returns (tokenizer, grew, how):
    `grew` is True when a mask token was appended at id == vocab_size (the embedding and the
    head must grow by one row); `how` says where the mask token came from."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise ConversionError(f"import-hf: no tokenizer.json in {hf_dir!r} (only fast tokenizers are supported)")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    vocab = tok.get_vocab(with_added_tokens=True)
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ConversionError(f"import-hf: the tokenizer has {size} tokens, more than vocab_size {vocab_size}")
    roles = _declared_roles(hf_dir, vocab)
    how = f"found {tok.id_to_token(roles['mask'])!r}" if "mask" in roles else ""
    if "mask" not in roles:
        for candidate in ("<mask>", MASK_TOKEN, "[MASK]"):
            if candidate in vocab:
                roles["mask"] = vocab[candidate]
                how = f"found {candidate!r}"
                break
    grew = False
    if "mask" not in roles:
        used = set(roles.values())
        reserved = sorted(
            (e["id"], e["content"]) for e in data.get("added_tokens", [])
            if e.get("special") and _RESERVED.search(e["content"]) and e["id"] not in used
        )
        if reserved:
            token_id, old = reserved[0]
            _rename_token(data, old, MASK_TOKEN)
            tok = tokenizers.Tokenizer.from_str(json.dumps(data))
            how = f"{old!r} renamed {MASK_TOKEN!r}"
        else:
            tok.add_special_tokens([tokenizers.AddedToken(MASK_TOKEN, special=True, normalized=False)])
            token_id = tok.token_to_id(MASK_TOKEN)
            grew = token_id >= vocab_size
            how = f"added {MASK_TOKEN!r}"
        roles["mask"] = token_id
    if "pad" not in roles and "eos" in roles:
        roles["pad"] = roles["eos"]  # padding is never attended to; any real id will do
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_meta.json"), "w") as f:
        json.dump({f"{r}_id": i for r, i in roles.items()}, f, indent=1)
    return load_tokenizer(out_dir), grew, how
