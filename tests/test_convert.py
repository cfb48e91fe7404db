"""Hugging Face conversion: transformers is the independent reference (tiny random models, no hub)."""

import json
import os
import random
import string
import tracemalloc

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from mlm_vs_clm.convert import ConversionError, hf_export, hf_import, hf_tokenizer  # noqa: E402
from mlm_vs_clm.convert import __main__ as convert_cli  # noqa: E402
from mlm_vs_clm.model import LanguageModel, ModelConfig, init_params  # noqa: E402

TOL = 1e-4
WORDS = [f"w{i}" for i in range(80)]


def convert_main(argv: list[str]) -> int:
    """The convert command in this process: its flags parsed afresh, as a new process would."""
    convert_cli.FLAGS.unparse_flags()
    return convert_cli.main(convert_cli.FLAGS(["convert", *argv]))


def _word_tokenizer(kind: str) -> "tokenizers.Tokenizer":
    """A word-level tokenizer: 'reserved' (Llama-3-like specials with reserved tokens), 'plain'
    (no mask, no reserved token) or 'mask' (has <mask>)."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    if kind == "reserved":
        specials += ["<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
    if kind == "mask":
        specials += ["<mask>"]
    vocab = {t: i for i, t in enumerate(["<unk>"] + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in specials])
    return tok


def _hf_llama(path, kv=2, tied=False, llama3=False, tokenizer="reserved", vocab=None):
    """A tiny random LlamaForCausalLM (every weight perturbed, norms included) saved at path."""
    tok = _word_tokenizer(tokenizer)
    size = tok.get_vocab_size(with_added_tokens=True)
    if llama3:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0}
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab or size + 5, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=tied, rope_parameters=rope,
        max_position_embeddings=64, rms_norm_eps=1e-5,
        bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=tok.token_to_id("<|end_of_text|>"),
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomize_and_save(model, tok, path, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    return model


def _randomize_and_save(model, tok, path, tokenizer_config: dict) -> None:
    """Weights drawn wide enough (sd 0.3) that a wrong mapping shows in the logits; the folder as
    transformers writes it, with the tokenizer beside it."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f)


def _ours(params, cfg: ModelConfig, tokens_BxL, mask_mode, segment_ids_BxL=None):
    B, L = tokens_BxL.shape
    seg = np.ones((B, L), np.int32) if segment_ids_BxL is None else segment_ids_BxL
    positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
    return np.asarray(LanguageModel(cfg).apply({"params": params}, jnp.asarray(tokens_BxL), seg, positions, mask_mode))


def _tokens(vocab, shape=(2, 24), seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize(
    "kv,tied,llama3,scan",
    [(2, False, False, True), (4, True, True, False), (2, True, True, True), (4, False, False, False)],
)
def test_import_logits_match_transformers(tmp_path, kv, tied, llama3, scan):
    hf = _hf_llama(tmp_path / "hf", kv=kv, tied=tied, llama3=llama3)
    config, params, tok = hf_import.convert_hf(str(tmp_path / "hf"), str(tmp_path / "tok"), scan_layers=scan)
    cfg = ModelConfig.from_config(config.model)
    assert (cfg.num_kv_heads, cfg.rope_scaling, cfg.scan_layers) == (kv, "llama3" if llama3 else "", scan)
    assert ("layers" in params["encoder"]) == scan
    tokens = _tokens(cfg.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(_ours(params, cfg, tokens, "causal"), ref, atol=TOL, rtol=0)
    # Llama-3 style: the first reserved special token becomes the mask token, no new row.
    assert tok.id_to_piece(tok.mask_id) == "<|mask|>" and config.tokens.mask_id == tok.mask_id
    assert cfg.vocab_size == hf.config.vocab_size


def test_import_without_reserved_token_grows_vocab(tmp_path):
    size = _word_tokenizer("plain").get_vocab_size(with_added_tokens=True)
    hf = _hf_llama(tmp_path / "hf", tokenizer="plain", vocab=size)
    config, params, tok = hf_import.convert_hf(str(tmp_path / "hf"), str(tmp_path / "tok"))
    assert tok.mask_id == size and config.model.vocab_size == size + 1 == tok.vocab_size
    emb = params["encoder"]["embed"]["embedding"]
    np.testing.assert_allclose(emb[size], emb[:size].mean(0), atol=1e-6)
    tokens = _tokens(size)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = _ours(params, ModelConfig.from_config(config.model), tokens, "causal")
    np.testing.assert_allclose(ours[..., :size], ref, atol=TOL, rtol=0)


def test_import_keeps_existing_mask_token(tmp_path):
    _hf_llama(tmp_path / "hf", tokenizer="mask")
    config, _, tok = hf_import.convert_hf(str(tmp_path / "hf"), str(tmp_path / "tok"))
    assert tok.id_to_piece(tok.mask_id) == "<mask>"
    assert config.tokens.bos_id == tok.bos_id == tok._tok.token_to_id("<|begin_of_text|>")


BASE = dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=16)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"head_dim": 16}, "head_dim"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_import_refuses_unsupported(change, field):
    with pytest.raises(ConversionError, match=field):
        hf_import.model_fields_from_hf({**BASE, **change})


def _our_model(seed=0, **overrides):
    kw = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=48)
    cfg = ModelConfig(**{**kw, **overrides})
    params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(seed)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    params = tree.unflatten([np.asarray(x + 0.2 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])
    return cfg, params


TOKENS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3, "mask_id": 4}


@pytest.mark.parametrize("mask_mode", ["causal", "bidirectional"])
def test_export_logits_match_transformers(tmp_path, mask_mode):
    cfg, params = _our_model(rope_scaling="llama3", rope_original_max_position=8, scan_layers=mask_mode == "causal")
    out = str(tmp_path / "hf")
    hf_export.export_params(params, cfg, out, mask_mode, TOKENS, shard_bytes=20_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    tokens = _tokens(cfg.vocab_size)
    ours = _ours(params, cfg, tokens, mask_mode)
    for impl in ("eager", "sdpa"):
        saved = json.load(open(os.path.join(out, "config.json")))
        assert "auto_map" not in saved and "rope_parameters" in saved and saved["dtype"] == "float32"
        if mask_mode == "causal":
            hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation=impl)
        else:  # native: no remote code
            assert saved["model_type"] == "eurobert" and saved["mask_token_id"] == TOKENS["mask_id"]
            hf = transformers.AutoModelForMaskedLM.from_pretrained(out, attn_implementation=impl)
            assert type(hf).__name__ == "EuroBertForMaskedLM"
        with torch.no_grad():
            ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    if mask_mode == "bidirectional":
        masked = tokens.copy()
        masked[:, ::3] = TOKENS["mask_id"]
        with torch.no_grad():
            ref = hf(torch.tensor(masked, dtype=torch.long)).logits.numpy()
        ours = _ours(params, cfg, masked, mask_mode)
        assert (ours[:, ::3].argmax(-1) == ref[:, ::3].argmax(-1)).all()
        # Right padding: the real tokens see the same thing as our padded segment.
        attn = np.ones_like(tokens)
        attn[1, 15:] = 0
        attn[0, 20:] = 0
        with torch.no_grad():
            ref = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(attn)).logits.numpy()
        ours = _ours(params, cfg, tokens, mask_mode, segment_ids_BxL=attn.astype(np.int32))
        np.testing.assert_allclose(ours[attn == 1], ref[attn == 1], atol=TOL, rtol=0)


def test_export_bidirectional_auto_classes(tmp_path):
    cfg, params = _our_model(seed=3)
    out = str(tmp_path / "hf")
    hf_export.export_params(params, cfg, out, "bidirectional", TOKENS)
    tokens = _tokens(cfg.vocab_size, seed=1)
    B, L = tokens.shape
    hidden = np.asarray(LanguageModel(cfg).apply(
        {"params": params}, tokens, np.ones_like(tokens), np.broadcast_to(np.arange(L), (B, L)),
        "bidirectional", method=LanguageModel.encode))
    base = transformers.AutoModel.from_pretrained(out)
    assert type(base).__name__ == "EuroBertModel"
    with torch.no_grad():
        got = base(torch.tensor(tokens, dtype=torch.long)).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, got, atol=TOL, rtol=0)
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    tok = transformers.AutoModelForTokenClassification.from_pretrained(out, num_labels=5)
    assert type(seq).__name__ == "EuroBertForSequenceClassification" and seq.config.classifier_pooling == "mean"
    assert type(tok).__name__ == "EuroBertForTokenClassification"
    for model in (seq, tok):
        np.testing.assert_allclose(model.model.embed_tokens.weight.detach().numpy(),
                                   params["encoder"]["embed"]["embedding"], atol=0)
    with torch.no_grad():
        seq_out = seq(torch.tensor(tokens, dtype=torch.long), labels=torch.tensor([0, 2]))
        tok_out = tok(torch.tensor(tokens, dtype=torch.long), labels=torch.zeros((B, L), dtype=torch.long))
    assert seq_out.logits.shape == (B, 3) and torch.isfinite(seq_out.loss)
    assert tok_out.logits.shape == (B, L, 5) and torch.isfinite(tok_out.loss)
    # mean pooling of the encoder output feeds the classifier
    pooled = torch.tensor(got.mean(1))
    expect = seq.classifier(seq.activation(seq.dense(pooled)))
    np.testing.assert_allclose(expect.detach().numpy(), seq_out.logits.numpy(), atol=TOL)


def test_round_trip_gives_identical_tensors(tmp_path):
    from safetensors import safe_open

    _hf_llama(tmp_path / "hf", kv=2, tied=False, llama3=True)
    config, params, _ = hf_import.convert_hf(str(tmp_path / "hf"), str(tmp_path / "tok"))
    hf_export.export_params(params, ModelConfig.from_config(config.model), str(tmp_path / "out"), "causal",
                            shard_bytes=30_000)
    original = safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt")
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))["weight_map"]
    assert sorted(index) == sorted(original.keys())
    for name, file in index.items():
        got = safe_open(str(tmp_path / "out" / file), framework="pt").get_tensor(name)
        assert torch.equal(got, original.get_tensor(name)), name
    back = json.load(open(tmp_path / "out" / "config.json"))
    assert back["rope_parameters"]["rope_type"] == "llama3" and back["rope_parameters"]["rope_theta"] == 500000.0


def test_export_streams_tensor_by_tensor(tmp_path):
    cfg, params = _our_model(vocab_size=1000, hidden_size=128, num_layers=4, ffn_size=384)
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    tracemalloc.start()
    try:
        hf_export.export_params(params, cfg, str(tmp_path / "hf"), "causal", TOKENS, shard_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * model_bytes, (peak, model_bytes)
    sizes = [os.path.getsize(tmp_path / "hf" / f) for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]
    assert len(sizes) > 1 and sum(sizes) >= model_bytes


def _sentences(n, seed):
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + "éèüößçñ東京語Ωλж"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(400)]
    words += ["Zürich", "naïve", "Ελλάδα", "日本語", "😀", "2024", "state-of-the-art,"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 20))) for _ in range(n)]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_exported_tokenizer_gives_same_ids(tmp_path, model_type):
    from mlm_vs_clm.data.tokenizer import train_tokenizer

    ours = train_tokenizer(_sentences(3000, 0), 700, model_type=model_type)
    hf_tokenizer.write_hf_tokenizer(ours, str(tmp_path))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tests = _sentences(300, 1) + ["  two  spaces\tand tab\n", "unseen ☃ 🦀 ß", "12345 67"]
    assert [auto(t, add_special_tokens=False)["input_ids"] for t in tests] == [ours.encode(t) for t in tests]
    assert (auto.mask_token_id, auto.pad_token_id) == (ours.mask_id, ours.pad_id)
    # like our data pipeline: [bos] + ids + [eos]
    assert auto("Zürich 2024")["input_ids"] == [ours.bos_id] + ours.encode("Zürich 2024") + [ours.eos_id]


def test_cli_import_then_export(tmp_path, capsys):
    from mlm_vs_clm.checkpoint import load_checkpoint

    hf = _hf_llama(tmp_path / "hf", kv=2, tied=True)
    run = str(tmp_path / "run")
    capsys.readouterr()
    assert convert_main(["import-hf", f"--hf={tmp_path / 'hf'}", f"--out={run}"]) == 0
    model = load_checkpoint(run)
    printed = capsys.readouterr().out
    assert f"--config.init_from={run}" in printed
    # what a run started with that flag alone takes from the checkpoint
    from mlm_vs_clm.config import load_config, validate
    from mlm_vs_clm.train import adopt_architecture

    cfg = load_config("configs/pretrain.py:tiny,mlm40")
    adopt_architecture(cfg, run)
    validate(cfg, 1)
    assert "imported_from" not in cfg  # the new run's export follows its own objective
    assert (cfg.model.num_kv_heads, cfg.model.vocab_size) == (2, hf.config.vocab_size)
    assert cfg.tokens.mask_id == model.config.tokens.mask_id and cfg.data.tokenizer == os.path.join(run, "tokenizer")
    tokens = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(model.logits(tokens, mask_mode="causal"), ref, atol=TOL, rtol=0)
    assert model.tokenizer.mask_id == model.config.tokens.mask_id
    out = str(tmp_path / "out")
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={out}", "--mask_mode=causal"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(tokens, dtype=torch.long)).logits.numpy(), ref, atol=TOL, rtol=0)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    text = "w1 w2 w79 w0 unknown"
    assert auto(text, add_special_tokens=False)["input_ids"] == _word_tokenizer("reserved").encode(text).ids
    assert auto.mask_token == "<|mask|>"
    # not sentencepiece-style: the mask takes the space before it only (RoBERTa-style)
    added = json.load(open(os.path.join(out, "tokenizer.json")))["added_tokens"]
    mask = [t for t in added if t["content"] == "<|mask|>"]
    assert (mask[0]["lstrip"], mask[0]["rstrip"]) == (True, False)
    assert auto("w1 <|mask|> w2", add_special_tokens=False)["input_ids"] == [
        auto.convert_tokens_to_ids(t) for t in ("w1", "<|mask|>", "w2")]
    # a prompt to continue: bos, no eos
    assert auto(text)["input_ids"] == [auto.bos_token_id] + _word_tokenizer("reserved").encode(text).ids
    capsys.readouterr()
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--overwrite" in err and err.count("\n") == 0


def _import_then_export(tmp_path, hf_dir, name):
    """import-hf, then export-hf with the default --mask_mode=auto: (run, out, exit status)."""
    run, out = str(tmp_path / f"{name}_run"), str(tmp_path / f"{name}_out")
    assert convert_main(["import-hf", f"--hf={hf_dir}", f"--out={run}"]) == 0
    return run, out, convert_main(["export-hf", f"--checkpoint={run}", f"--out={out}"])


def test_cli_round_trip_auto_keeps_source_attention(tmp_path):
    """--mask_mode=auto on an import: no objective of ours trained it (the base config says
    mlm40), so the export takes the source's attention and gives back its logits."""
    from mlm_vs_clm.checkpoint import load_checkpoint

    hf = _hf_llama(tmp_path / "hf", kv=2, tied=False)
    run, out, rc = _import_then_export(tmp_path, tmp_path / "hf", "causal")
    assert rc == 0
    source = load_checkpoint(run).config.imported_from
    assert (source.hf, source.architectures, source.mask_mode) == (str(tmp_path / "hf"), "LlamaForCausalLM", "causal")
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back).__name__ == "LlamaForCausalLM"
    tokens = torch.tensor(_tokens(hf.config.vocab_size), dtype=torch.long)
    with torch.no_grad():
        np.testing.assert_allclose(back(tokens).logits.numpy(), hf(tokens).logits.numpy(), atol=TOL, rtol=0)
    # Our bidirectional export (is_causal=False) comes back bidirectional.
    bidir = str(tmp_path / "bidir")
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={bidir}", "--mask_mode=bidirectional"]) == 0
    _, again, rc = _import_then_export(tmp_path, bidir, "bidir")
    assert rc == 0 and json.load(open(os.path.join(again, "config.json")))["model_type"] == "eurobert"
    assert load_checkpoint(os.path.join(tmp_path, "bidir_run")).config.imported_from.mask_mode == "bidirectional"
    first, second = (transformers.AutoModelForMaskedLM.from_pretrained(d) for d in (bidir, again))
    with torch.no_grad():
        np.testing.assert_allclose(second(tokens).logits.numpy(), first(tokens).logits.numpy(), atol=TOL, rtol=0)


def test_cli_auto_refuses_untrained_checkpoint_without_source(tmp_path, capsys):
    """Step 0 with no recorded source attention (e.g. an import from before the record)."""
    _hf_llama(tmp_path / "hf")
    run = str(tmp_path / "run")
    assert convert_main(["import-hf", f"--hf={tmp_path / 'hf'}", f"--out={run}"]) == 0
    for path in (os.path.join(run, "checkpoints", "0", "config", "metadata"), os.path.join(run, "config.json")):
        saved = json.load(open(path))
        del saved["imported_from"]
        json.dump(saved, open(path, "w"))
    capsys.readouterr()
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--mask_mode=causal" in err
    assert not os.path.exists(tmp_path / "out")


def test_import_reads_source_attention():
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=48)
    for mode in ("causal", "bidirectional"):  # what our exports write
        assert hf_import.source_mask_mode(hf_export.hf_config(cfg, TOKENS, mode)) == mode
    assert hf_import.source_mask_mode({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == "causal"
    # EuroBERT, native or with the hub's auto_map, or relabelled llama: from the architecture
    eurobert_remote = {"model_type": "eurobert", "auto_map": {"AutoModel": "m.EuroBertModel"}}
    assert hf_import.source_mask_mode(eurobert_remote) == "bidirectional"
    llama_named_eurobert = {"model_type": "llama", "architectures": ["EuroBertForMaskedLM"]}
    assert hf_import.source_mask_mode(llama_named_eurobert) == "bidirectional"
    # our remote-code encoders say is_causal: false
    remote = hf_export.hf_config(cfg, TOKENS, "bidirectional", architecture="remote")
    assert hf_import.source_mask_mode(remote) == "bidirectional"
    # remote code that does not say: unknown, so --mask_mode=auto refuses
    assert hf_import.source_mask_mode({"model_type": "llama", "auto_map": {"AutoModel": "modeling.Encoder"}}) == ""


def test_auto_mask_mode_of_trained_checkpoints():
    from mlm_vs_clm.config import load_config

    config = load_config("configs/pretrain.py:tiny,clm50_mlm40", {"train.steps": 10})
    assert hf_export.auto_mask_mode(config, "run/checkpoints/5") == "causal"
    assert hf_export.auto_mask_mode(config, "run/checkpoints/10") == "bidirectional"
    with pytest.raises(ConversionError, match="step 0"):
        hf_export.auto_mask_mode(config, "run/checkpoints/0")


def test_cli_refuses_with_one_line(tmp_path, capsys):
    _hf_llama(tmp_path / "hf")
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    cfg["hidden_act"] = "gelu_new"
    json.dump(cfg, open(tmp_path / "hf" / "config.json", "w"))
    capsys.readouterr()
    assert convert_main(["import-hf", f"--hf={tmp_path / 'hf'}", f"--out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "hidden_act" in err and "gelu_new" in err
    assert not os.path.exists(tmp_path / "run")


def _hf_eurobert(path, auto_map=False, relabel_llama=False):
    """A tiny random EuroBertForMaskedLM (every weight perturbed) saved at path, with a tokenizer
    that has <mask>; `auto_map`: as the hub's remote-code folders; `relabel_llama`: model_type llama."""
    tok = _word_tokenizer("mask")
    torch.manual_seed(1)
    cfg = transformers.EuroBertConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True) + 3, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 250000.0}, rms_norm_eps=1e-5,
        bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=tok.token_to_id("<|end_of_text|>"),
        pad_token_id=tok.token_to_id("<|end_of_text|>"), mask_token_id=tok.token_to_id("<mask>"),
    )
    model = transformers.EuroBertForMaskedLM(cfg).eval()
    _randomize_and_save(model, tok, path,
                        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "mask_token": "<mask>"})
    saved = json.load(open(os.path.join(path, "config.json")))
    if auto_map:
        saved["auto_map"] = {"AutoModelForMaskedLM": "modeling_eurobert.EuroBertForMaskedLM"}
    if relabel_llama:
        saved["model_type"] = "llama"
    json.dump(saved, open(os.path.join(path, "config.json"), "w"))
    return model


@pytest.mark.parametrize("variant", ["native", "auto_map", "relabelled_llama"])
def test_import_eurobert_is_bidirectional(tmp_path, capsys, variant):
    from mlm_vs_clm.checkpoint import load_checkpoint

    hf = _hf_eurobert(tmp_path / "hf", auto_map=variant == "auto_map", relabel_llama=variant == "relabelled_llama")
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    capsys.readouterr()
    assert convert_main(["import-hf", f"--hf={tmp_path / 'hf'}", f"--out={run}"]) == 0
    printed = capsys.readouterr().out
    assert "bidirectional attention" in printed and "mask token id" in printed and "found '<mask>'" in printed
    assert "pad id" in printed and "eos id" in printed
    model = load_checkpoint(run)
    assert model.config.imported_from.mask_mode == "bidirectional"
    assert model.config.tokens.mask_id == hf.config.mask_token_id
    tokens = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(model.logits(tokens, mask_mode="bidirectional"), ref, atol=TOL, rtol=0)
    # --mask_mode=auto exports it back as a native EuroBERT with the same logits
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={out}"]) == 0
    back = transformers.AutoModelForMaskedLM.from_pretrained(out)
    assert type(back).__name__ == "EuroBertForMaskedLM"
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(tokens, dtype=torch.long)).logits.numpy(), ref, atol=TOL, rtol=0)


def test_import_says_when_the_vocabulary_grew(tmp_path, capsys):
    size = _word_tokenizer("plain").get_vocab_size(with_added_tokens=True)
    _hf_llama(tmp_path / "hf", tokenizer="plain", vocab=size)
    capsys.readouterr()
    assert convert_main(["import-hf", f"--hf={tmp_path / 'hf'}", f"--out={tmp_path / 'run'}"]) == 0
    printed = capsys.readouterr().out
    assert f"vocabulary grew {size} -> {size + 1}" in printed and "added '<|mask|>'" in printed
    assert "causal attention" in printed


@pytest.fixture(scope="module")
def spm_tokenizer():
    from mlm_vs_clm.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    story = ["the", "cat", "fell", "dog", "sat", "on", "mat", "a", "tree", "big", "apple", "from"]
    text = [" ".join(rng.choice(story) for _ in range(12)) for _ in range(1500)] + _sentences(1500, 0)
    return train_tokenizer(text, 700, model_type="unigram")


def test_fill_mask_pipeline_as_people_type_it(tmp_path, spm_tokenizer):
    ours = spm_tokenizer
    tokens = {f"{r}_id": getattr(ours, f"{r}_id") for r in ("pad", "unk", "bos", "eos", "mask")}
    cfg, params = _our_model(seed=5, vocab_size=ours.vocab_size)
    out = str(tmp_path / "hf")
    hf_export.export_params(params, cfg, out, "bidirectional", tokens)
    hf_tokenizer.write_hf_tokenizer(ours, out)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    # typed with spaces around the mask: the ids MLM training shows (a whole word replaced)
    ids = [ours.bos_id] + ours.encode("the") + [ours.mask_id] + ours.encode("fell") + [ours.eos_id]
    for typed in ("the <mask> fell", "the<mask>fell", "the  <mask>  fell"):
        assert auto(typed)["input_ids"] == ids, typed
    logits = _ours(params, cfg, np.array([ids], np.int32), "bidirectional")[0, ids.index(ours.mask_id)]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    fill = transformers.pipeline("fill-mask", model=out, tokenizer=out, top_k=5)
    got = fill("the <mask> fell")
    assert [g["token"] for g in got] == list(np.argsort(-probs)[:5])
    np.testing.assert_allclose([g["score"] for g in got], np.sort(probs)[::-1][:5], atol=TOL, rtol=0)


def test_export_refuses_a_non_empty_folder_and_leaves_no_half_export(tmp_path, capsys, monkeypatch):
    _hf_llama(tmp_path / "hf")
    run = str(tmp_path / "run")
    assert convert_main(["import-hf", f"--hf={tmp_path / 'hf'}", f"--out={run}"]) == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the user's")
    (out / "tokenizer.json").write_text("{}")
    capsys.readouterr()
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not empty" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == b"the user's"
    # a crash part way leaves neither a half export nor the temporary folder
    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "write_hf_tokenizer", crash)
    fresh = tmp_path / "fresh"
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={fresh}"]) == 2
    assert not fresh.exists() and sorted(os.listdir(tmp_path)) == ["hf", "out", "run"]
    monkeypatch.undo()
    # --overwrite replaces the folder as a whole; an empty folder needs no flag
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={out}", "--overwrite"]) == 0
    assert (out / "config.json").exists() and not (out / "tokenizer.json").read_text() == "{}"
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~_umask()
    assert transformers.AutoModelForCausalLM.from_pretrained(str(out)) is not None
    (tmp_path / "empty").mkdir()
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={tmp_path / 'empty'}"]) == 0
    # never over the checkpoint itself
    capsys.readouterr()
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={tmp_path}", "--overwrite"]) == 2
    assert "holds the checkpoint" in capsys.readouterr().err and os.path.isdir(run)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("inside", ["", "sub/run"])
def test_import_refuses_out_in_the_source(tmp_path, capsys, inside):
    _hf_llama(tmp_path / "hf")
    before = open(tmp_path / "hf" / "config.json").read()
    capsys.readouterr()
    assert convert_main(["import-hf", f"--hf={tmp_path / 'hf'}", f"--out={tmp_path / 'hf' / inside}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "inside --hf" in err
    assert open(tmp_path / "hf" / "config.json").read() == before and not (tmp_path / "hf" / "sub").exists()


def test_import_refuses_a_non_empty_out(tmp_path, capsys):
    _hf_llama(tmp_path / "hf")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("mine")
    capsys.readouterr()
    assert convert_main(["import-hf", f"--hf={tmp_path / 'hf'}", f"--out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an empty folder" in err
    assert (tmp_path / "run" / "config.json").read_text() == "mine"
