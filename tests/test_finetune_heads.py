"""Each head learns a tiny separable task on CPU; the attention knob behaves as specified."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from mlm_vs_clm.config import ConfigError, load_config
from mlm_vs_clm.finetune import grid, heads, runner
from mlm_vs_clm.finetune.tasks import Task, featurize
from mlm_vs_clm.model import ModelConfig, init_params
from tests.helpers import accum_tol

FILLER = "red green blue small large quick slow river stone cloud light dark paper metal glass".split()
KEYS = "paris london rome berlin madrid vienna prague dublin oslo lisbon".split()


def make_tokenizer(tmp_path_factory):
    from mlm_vs_clm.data.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = FILLER + KEYS + "alpha omega where is the city marker one two three what".split()
    texts = [" ".join(rng.choice(words, 30)) for _ in range(300)]
    return train_tokenizer(texts, 320, str(tmp_path_factory.mktemp("tok")))


def tiny_model(vocab_size, seed=0):
    pc = load_config("configs/pretrain.py:tiny", {"model.vocab_size": vocab_size})
    cfg = dataclasses.replace(ModelConfig.from_config(pc.model), hidden_size=32, num_heads=2, num_kv_heads=2,
                              ffn_size=64)
    return cfg, nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(seed)))


def ft_config(**overrides):
    base = {"steps": 60, "eval_every": 30, "batch_size": 16, "eval_batch_size": 32, "max_len": 32, "query_max_len": 16}
    base.update(overrides)
    ft = load_config("configs/finetune.py:news_quick", base)
    grid.validate(ft)
    return ft


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok = make_tokenizer(tmp_path_factory)
    cfg, params = tiny_model(((tok.vocab_size + 63) // 64) * 64)
    return tok, cfg, params


def classification_examples(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(FILLER, 6)) + [("alpha", "omega")[label]]
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def token_examples(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = list(rng.choice(FILLER + KEYS[:3], 8))
        out.append({"words": words, "tags": ["B-LOC" if w in KEYS else "O" for w in words]})
    return out


def qa_examples(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = list(rng.choice(FILLER, 8))
        answers = []
        if i % 4:  # one in four has no city: unanswerable
            at = int(rng.integers(0, 8))
            words[at] = str(rng.choice(KEYS))
        context = " ".join(words)
        if i % 4:
            start = len(" ".join(words[:at])) + (1 if at else 0)
            answers = [{"text": words[at], "start": start}]
        out.append({"id": str(i), "question": "what is the city", "context": context, "answers": answers})
    return out


def retrieval_examples(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key = KEYS[i % len(KEYS)]
        words = list(rng.choice(FILLER, 6)) + [key]
        rng.shuffle(words)
        out.append({"query": key, "document": " ".join(words) + f" {i}"})
    return out


def _task(name, kind, make, **kw):
    return Task(name, kind, {"train": make(96, 0), "validation": make(32, 1), "test": make(32, 2)}, **kw)


CASES = {
    "classification": (lambda: _task("cls", "classification", classification_examples, labels=("a", "b")), 95.0, {}),
    "classification_eurobert_head": (
        lambda: _task("cls", "classification", classification_examples, labels=("a", "b")), 95.0, {"head": "eurobert"},
    ),
    "token_classification": (
        lambda: _task("tc", "token_classification", token_examples, labels=("O", "B-LOC", "I-LOC")), 90.0,
        {"token_classification_epochs": 0},
    ),
    "qa": (lambda: _task("qa", "qa", qa_examples, unanswerable=True), 80.0, {"steps": 100, "eval_every": 50}),
    "retrieval": (lambda: _task("ret", "retrieval", retrieval_examples), None, {"learning_rates": (2e-3,)}),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_head_learns_separable_task(env, kind):
    tok, cfg, params = env
    make_task, threshold, overrides = CASES[kind]
    task = make_task()
    ft = ft_config(**overrides)
    features = featurize(task, tok, ft.max_len, ft.query_max_len)
    setup = runner.build(cfg, task, ft, grid.sharding.make_mesh(ft.mesh))
    result = runner.run(setup, runner.place_encoder(setup, params["encoder"]), task, features, ft.learning_rates[0], 0)
    chance = runner.chance_score(task, features)
    if threshold is None:  # retrieval: far above a random ranking
        threshold = chance + 40.0
    assert result.best_validation >= threshold, (kind, result.history, chance)
    assert result.test >= threshold - 10.0, (kind, result.test_metrics)
    assert not result.diverged
    assert result.best_step in [h[0] for h in result.history]


def test_divergence_is_flagged(env):
    tok, cfg, params = env
    task = CASES["classification"][0]()
    ft = ft_config(steps=4, eval_every=2)
    features = featurize(task, tok, ft.max_len, ft.query_max_len)
    setup = runner.build(cfg, task, ft, grid.sharding.make_mesh(ft.mesh))
    encoder = runner.place_encoder(setup, params["encoder"])
    stuck = runner.run(setup, encoder, task, features, 1e-12, 0)  # learns nothing: chance
    assert stuck.diverged and "chance" in stuck.reason
    features["train"]["arrays"]["tokens"][:] = 10**6  # out-of-range ids are fine; a nan loss is not
    nan_params = jax.tree.map(lambda x: x * np.nan, params["encoder"])
    blown = runner.run(setup, runner.place_encoder(setup, nan_params), task, features, 1e-3, 0)
    assert blown.diverged and "non-finite" in blown.reason and blown.test is None


def _first_position_output(env, attention, tokens):
    tok, cfg, params = env
    task = Task("cls", "classification", {s: classification_examples(8, 0) for s in ("train", "validation", "test")},
                labels=("a", "b"))
    ft = load_config("configs/finetune.py:news_quick", {"max_len": 32, "attention": attention, "pooling": "first"})
    setup = runner.build(cfg, task, ft, grid.sharding.make_mesh(ft.mesh))
    p = {**setup.init(jax.random.PRNGKey(0)), "encoder": runner.place_encoder(setup, params["encoder"])}
    seg = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": seg, "positions": positions}
    with setup.context():
        return np.asarray(setup.predict(p, batch))


def test_attention_knob(env):
    rng = np.random.default_rng(0)
    a = rng.integers(5, 300, (8, 16)).astype(np.int32)
    b = a.copy()
    b[:, 1:] = rng.integers(5, 300, (8, 15))  # same first token, different later tokens
    causal = _first_position_output(env, "causal", a), _first_position_output(env, "causal", b)
    np.testing.assert_allclose(causal[0], causal[1], atol=1e-5)  # the first token sees only itself
    bidi = _first_position_output(env, "bidirectional", a), _first_position_output(env, "bidirectional", b)
    assert np.abs(bidi[0] - bidi[1]).max() > 1e-4
    # which is why the grid refuses causal attention with first-token pooling
    with pytest.raises(ConfigError, match="pooling='first' with attention='causal'"):
        ft_config(attention="causal", pooling="first")


def test_retrieval_loss_masks_in_batch_columns_relevant_to_the_query(env):
    tok, cfg, params = env
    rows = [{"query": "paris", "document": "paris red river"}, {"query": "paris", "document": "paris blue stone"},
            {"query": "rome", "document": "rome green cloud"}]
    task = Task("r", "retrieval", {s: rows for s in ("train", "validation", "test")})
    train = featurize(task, tok, 32, 16)["train"]["arrays"]
    batch = {k: v[[0, 1, 2, 0]] for k, v in train.items()}  # row 0 twice: the data order wraps an epoch
    model = heads.FinetuneModel(cfg, "retrieval")
    p = {"encoder": params["encoder"]}
    loss = float(heads.loss_fn(model, p, batch, 0.05))
    q_BxD, d_BxD = (np.asarray(heads.forward(model, p, batch, prefix), np.float64) for prefix in ("q_", "d_"))
    s_BxB = q_BxD @ d_BxD.T / 0.05  # f64: the reference's own rounding is negligible

    def ce(columns):  # mean over rows i of -log softmax(s[i, columns[i]]) at column i
        return np.mean([np.log(np.exp(s_BxB[i, c]).sum()) - s_BxB[i, i] for i, c in enumerate(columns)])

    # The f32 loss: each score is a length-D dot product, off by at most D*eps32*sum_k|q_k d_k|/T
    # (+1 rounding for /T); logsumexp is 1-Lipschitz in the max norm, so a row's lse - s_ii moves by
    # at most 2x that; f32 exp/sum/log/mean over B columns add about (B + 4)*eps32*max|s|.
    (B, D), scale = q_BxD.shape, (np.abs(q_BxD) @ np.abs(d_BxD).T).max() / 0.05
    tol = (2 * accum_tol(D + 1) + accum_tol(B + 4)) * scale
    masked, unmasked = ce([[0, 2], [1, 2], [0, 1, 2, 3], [2, 3]]), ce([[0, 1, 2, 3]] * 4)
    # Columns 0, 1 and 3 hold paris documents: not negatives for the paris rows (0, 1, 3).
    assert abs(loss - masked) <= tol
    assert abs(loss - unmasked) > 100 * tol and abs(masked - unmasked) > 1e-3  # the unmasked loss differs


def test_eurobert_head_is_pooled_dense_exact_gelu_linear():
    """head='eurobert': pooled -> dense -> GELU (erf form, as torch.nn.GELU) -> classes, against
    a float64 numpy reference; head='linear' has no dense layer."""
    from scipy.special import erf

    cfg, encoder = tiny_model(97)
    model = heads.FinetuneModel(cfg, "classification", 3, "mean", "bidirectional", "eurobert")
    params = nn.meta.unbox(heads.init_head(model, jax.random.PRNGKey(0)))
    params["encoder"] = encoder["encoder"]
    rng = np.random.RandomState(0)
    params["head_dense"] = {"kernel": rng.normal(0, 0.5, (32, 32)).astype(np.float32),
                            "bias": rng.normal(0, 0.5, 32).astype(np.float32)}
    tokens = rng.randint(5, 97, (2, 12)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[1, 7:] = 0
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape)
    h = np.asarray(model.apply({"params": params}, tokens, seg, pos, method=heads.FinetuneModel.hidden), np.float64)
    pooled = (h * seg[..., None]).sum(1) / seg.sum(1, keepdims=True)
    x = pooled @ params["head_dense"]["kernel"] + params["head_dense"]["bias"]
    x = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    expect = x @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(params["head"]["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens, seg, pos)), expect, atol=1e-4, rtol=0)
    linear = heads.FinetuneModel(cfg, "classification", 3, "mean", "bidirectional", "linear")
    assert "head_dense" not in nn.meta.unbox(heads.init_head(linear, jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="head must be one of"):
        heads.init_head(heads.FinetuneModel(cfg, "classification", 3, head_type="mlp"), jax.random.PRNGKey(0))


def test_head_defaults_and_validation():
    assert load_config("configs/finetune.py:paper").head == "eurobert"
    assert load_config("configs/finetune.py:news_quick").head == "linear"
    with pytest.raises(Exception, match="head must be one of"):
        grid.validate(ft_config(head="mlp"))
