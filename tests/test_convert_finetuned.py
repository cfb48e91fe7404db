"""Fine-tuned heads out to Hugging Face and sentence-transformers: transformers (no remote code
where EuroBERT can express the model) gives our logits and pooled states within 1e-4."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlm_vs_clm.convert import ConversionError, finetuned, hf_export  # noqa: E402
from mlm_vs_clm.finetune import heads  # noqa: E402
from mlm_vs_clm.model import ModelConfig  # noqa: E402

TOL = 1e-4
TOKENS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3, "mask_id": 4}


def _finetuned(kind, head="linear", pooling="mean", classes=3, seed=0):
    """A FinetuneModel and its parameters, every one perturbed (a stand-in for a fine-tuned model)."""
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=48)
    model = heads.FinetuneModel(cfg, kind, classes, pooling, "bidirectional", head)
    params = nn.meta.unbox(heads.init_head(model, jax.random.PRNGKey(seed)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    params = tree.unflatten([np.asarray(x + 0.2 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])
    return cfg, model, params


def _batch(vocab=97, lengths=(24, 15, 9), seed=0):
    """Right-padded rows: tokens, attention mask (1 real, 0 pad)."""
    rng = np.random.RandomState(seed)
    L = max(lengths)
    tokens = rng.randint(5, vocab, (len(lengths), L)).astype(np.int32)
    attn = (np.arange(L)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    tokens[attn == 0] = TOKENS["pad_id"]
    return tokens, attn


def _ours(model, params, tokens, attn):
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return model.apply({"params": params}, tokens, attn, positions)


@pytest.mark.parametrize(
    "kind,head,pooling,expect",
    [
        ("classification", "eurobert", "mean", "EuroBertForSequenceClassification"),
        ("classification", "eurobert", "first", "EuroBertForSequenceClassification"),
        ("token_classification", "linear", "mean", "EuroBertForTokenClassification"),
        ("classification", "linear", "mean", "BidirLlamaForSequenceClassification"),
        ("classification", "linear", "last", "BidirLlamaForSequenceClassification"),
    ],
)
def test_finetuned_head_exports_with_identical_logits(tmp_path, kind, head, pooling, expect):
    cfg, model, params = _finetuned(kind, head, pooling)
    out = str(tmp_path / "hf")
    config = finetuned.export_finetuned(params, cfg, out, kind, pooling, head, tokens=TOKENS, labels=["a", "b", "c"])
    remote = expect.startswith("Bidir")
    assert ("auto_map" in config) == remote
    auto = (transformers.AutoModelForTokenClassification if kind == "token_classification"
            else transformers.AutoModelForSequenceClassification)
    hf = auto.from_pretrained(out, trust_remote_code=remote)
    assert type(hf).__name__ == expect and hf.config.id2label == {0: "a", 1: "b", 2: "c"}
    tokens, attn = _batch()
    ours = np.asarray(_ours(model, params, tokens, attn))
    for impl in ("eager", "sdpa"):
        hf.set_attn_implementation(impl)
        with torch.no_grad():
            ref = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(attn)).logits.numpy()
        if kind == "token_classification":
            np.testing.assert_allclose(ours[attn == 1], ref[attn == 1], atol=TOL, rtol=0)
        else:
            np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_finetuned_heads_that_cannot_export_say_why():
    with pytest.raises(ConversionError, match="causal"):
        finetuned.finetuned_format("classification", attention="causal")
    with pytest.raises(ConversionError, match="qa"):
        finetuned.finetuned_format("qa")
    with pytest.raises(ConversionError, match="last"):
        finetuned.finetuned_format("classification", pooling="last", head="eurobert")


def test_eurobert_head_is_dense_exact_gelu_classifier():
    cfg, model, params = _finetuned("classification", "eurobert")
    assert set(params) == {"encoder", "head_dense", "head"}
    tokens, attn = _batch()
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    h = np.asarray(model.apply({"params": params}, tokens, attn, positions, method=heads.FinetuneModel.hidden),
                   np.float64)
    pooled = (h * attn[..., None]).sum(1) / attn.sum(1, keepdims=True)
    x = pooled @ params["head_dense"]["kernel"] + params["head_dense"]["bias"]
    x = torch.nn.functional.gelu(torch.tensor(x)).numpy()
    expect = x @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(np.asarray(_ours(model, params, tokens, attn)), expect, atol=TOL, rtol=0)


def test_sentence_transformers_mean_pooling_equals_ours(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from mlm_vs_clm.convert.hf_tokenizer import write_hf_tokenizer
    from mlm_vs_clm.data.tokenizer import train_tokenizer

    texts = ["the cat sat on the mat", "a dog", "the big apple fell from a tree today"]
    ours = train_tokenizer([" ".join(texts)] * 50 + [f"word{i} and more{i % 7}" for i in range(600)], 400)
    tokens = {f"{r}_id": getattr(ours, f"{r}_id") for r in ("pad", "unk", "bos", "eos", "mask")}
    from mlm_vs_clm.model import init_params

    cfg = ModelConfig(vocab_size=ours.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_size=48)
    model = heads.FinetuneModel(cfg, "retrieval", 0, "mean", "bidirectional")

    encoder = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(3)))["encoder"]
    out = str(tmp_path / "hf")
    lm = {"encoder": encoder, "lm_head": {"kernel": np.zeros((cfg.hidden_size, cfg.vocab_size), np.float32)}}
    hf_export.export_params(lm, cfg, out, "bidirectional", tokens)
    write_hf_tokenizer(ours, out)
    hf_export.write_sentence_transformers(out, cfg.hidden_size, 64)
    emb = st.SentenceTransformer(out, device="cpu").encode(texts, convert_to_numpy=True, batch_size=8)
    ids = [[ours.bos_id] + ours.encode(t) + [ours.eos_id] for t in texts]
    L = max(map(len, ids))
    batch = np.array([i + [ours.pad_id] * (L - len(i)) for i in ids], np.int32)
    seg = np.array([[1] * len(i) + [0] * (L - len(i)) for i in ids], np.int32)
    positions = np.broadcast_to(np.arange(L, dtype=np.int32), batch.shape)
    h = model.apply({"params": {"encoder": encoder}}, batch, seg, positions, method=heads.FinetuneModel.hidden)
    pooled = np.asarray(heads.pool(h, seg, "mean"))
    np.testing.assert_allclose(emb, pooled, atol=TOL, rtol=0)
    assert json.load(open(os.path.join(out, "1_Pooling", "config.json")))["pooling_mode_mean_tokens"] is True


@pytest.mark.parametrize("kind,head", [("classification", "eurobert"), ("token_classification", "linear")])
def test_cli_exports_a_finetuned_checkpoint(tmp_path, capsys, kind, head):
    from helpers import tiny_config

    from tests.test_convert import convert_main

    config = tiny_config()
    cfg = ModelConfig.from_config(config.model)
    model = heads.FinetuneModel(cfg, kind, 2, "mean", "bidirectional", head)
    params = nn.meta.unbox(heads.init_head(model, jax.random.PRNGKey(0)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten([np.asarray(x + 0.2 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])
    run, out = str(tmp_path / "ft"), str(tmp_path / "hf")
    finetuned.save_finetuned(run, config, params, kind, "mean", head, labels=["neg", "pos"])
    capsys.readouterr()
    assert convert_main(["export-hf", f"--checkpoint={run}", f"--out={out}"]) == 0
    expect = "EuroBertForTokenClassification" if kind == "token_classification" else "EuroBertForSequenceClassification"
    assert f"load with {expect}, no remote code" in capsys.readouterr().out
    auto = (transformers.AutoModelForTokenClassification if kind == "token_classification"
            else transformers.AutoModelForSequenceClassification)
    hf = auto.from_pretrained(out)
    assert type(hf).__name__ == expect and hf.config.id2label[1] == "pos"
    tokens, attn = _batch(vocab=cfg.vocab_size)
    ours = np.asarray(_ours(model, params, tokens, attn))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(attn)).logits.numpy()
    keep = attn == 1 if kind == "token_classification" else slice(None)
    np.testing.assert_allclose(ours[keep], ref[keep], atol=TOL, rtol=0)
