"""One fine-tuning run: (encoder params, task features, learning rate, seed) -> scores.

The step is pure and jitted with explicit shardings: parameters follow the logical-axis rules
of the mesh (the encoder's own annotations plus the head's), batches are split over the
data-parallel axes. The learning rate is an argument of the step, so one compilation serves
the whole learning-rate x seed grid of a task.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlm_vs_clm import sharding
from mlm_vs_clm.finetune import heads, metrics
from mlm_vs_clm.finetune.tasks import Task, decode_spans
from mlm_vs_clm.model import ModelConfig


@dataclasses.dataclass
class RunResult:
    best_validation: float | None  # main metric, percent
    best_step: int | None
    test: float | None  # main metric on the test split with the parameters of best_step
    test_metrics: dict
    diverged: bool
    reason: str  # '' or why the run counts as diverged
    history: list  # [(step, validation score, mean train loss since the previous validation)]
    params: object = None  # the parameters of best_step (not written to results.json)


@dataclasses.dataclass(eq=False)
class Setup:
    """Model, optimizer and compiled functions for one (encoder architecture, task) pair."""

    model: heads.FinetuneModel
    ft: object  # the fine-tuning ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    param_shardings: dict
    opt_shardings: object
    tx: optax.GradientTransformation
    train_step: object
    predict: object
    init: object

    def context(self):
        return _Context(self.mesh, self.rules)


class _Context:
    def __init__(self, mesh, rules):
        self.stack = [jax.set_mesh(mesh), nn.logical_axis_rules(rules)]

    def __enter__(self):
        for c in self.stack:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.stack):
            c.__exit__(*exc)


def _decay_mask(params):
    """Weight decay on matrices only: not on norm scales or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: "norm" not in jax.tree_util.keystr(path) and x.ndim > 1, params
    )


def learning_rate_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warmup over warmup_fraction of the steps, then linear decay to 0 at `total`."""
    warmup = max(int(round(total * warmup_fraction)), 1)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(total - warmup, 1))


def _row_sharding(mesh, ndim):
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def build(model_cfg: ModelConfig, task: Task, ft, mesh) -> Setup:
    model = heads.FinetuneModel(model_cfg, task.kind, task.num_outputs, ft.pooling, ft.attention,
                                ft.get("head", "linear"))
    rules = sharding.rules(ft)
    o = ft.optimizer
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
        optax.add_decayed_weights(o.weight_decay, mask=_decay_mask),
    )
    with _Context(mesh, rules):
        specs = heads.partition_specs(model)
    param_shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    params_abs = nn.meta.unbox(jax.eval_shape(lambda r: heads.init_head(model, r), jax.random.PRNGKey(0)))
    opt_abs = jax.eval_shape(tx.init, params_abs)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, opt_abs, param_shardings, transform_non_params=lambda _: NamedSharding(mesh, P()),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    replicated = NamedSharding(mesh, P())
    temperature = float(ft.retrieval_temperature)

    def train_step(params, opt_state, batch, lr):
        loss, grads = jax.value_and_grad(lambda p: heads.loss_fn(model, p, batch, temperature))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
        return params, opt_state, loss

    def predict(params, batch):
        return heads.forward(model, params, batch)

    def init(rng):  # the head only: XLA drops the unused encoder initialisation
        return {k: v for k, v in nn.meta.unbox(heads.init_head(model, rng)).items() if k != "encoder"}

    step = jax.jit(
        train_step,
        in_shardings=(param_shardings, opt_shardings, None, replicated),
        out_shardings=(param_shardings, opt_shardings, replicated),
        donate_argnums=(1,),
    )
    predict_fn = jax.jit(predict, in_shardings=(param_shardings, None))
    init_fn = jax.jit(init, out_shardings={k: v for k, v in param_shardings.items() if k != "encoder"})
    return Setup(model, ft, mesh, rules, param_shardings, opt_shardings, tx, step, predict_fn, init_fn)


def place_encoder(setup: Setup, encoder_params):
    """Put pretrained encoder parameters onto the mesh (once per checkpoint and task)."""
    return jax.device_put(encoder_params, setup.param_shardings["encoder"])


def _device_batch(setup: Setup, arrays: dict) -> dict:
    return {k: jax.device_put(v, _row_sharding(setup.mesh, v.ndim)) for k, v in arrays.items()}


def _batches(arrays: dict, batch_size: int, prefix: str = ""):
    """Fixed-size row chunks of `arrays` (keys starting with prefix, prefix stripped), the last
    one padded with empty rows (segment id 0); yields (chunk, number of real rows)."""
    keys = [k for k in arrays if k.startswith(prefix)]
    n = len(arrays[keys[0]])
    for start in range(0, n, batch_size):
        chunk = {}
        for k in keys:
            part = arrays[k][start : start + batch_size]
            if len(part) < batch_size:
                pad = np.zeros((batch_size - len(part),) + part.shape[1:], part.dtype)
                part = np.concatenate([part, pad])
            chunk[k[len(prefix) :]] = part
        yield chunk, min(batch_size, n - start)


def _predict_all(setup: Setup, params, arrays: dict, prefix: str = ""):
    outs = []
    bs = setup.ft.eval_batch_size
    for chunk, real in _batches(arrays, bs, prefix):
        out = setup.predict(params, _device_batch(setup, chunk))
        outs.append(jax.tree.map(lambda x, real=real: np.asarray(x)[:real], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def evaluate(setup: Setup, params, task: Task, split: dict) -> dict:
    """All metrics of `task` on one featurised split; the main one under task.metric."""
    arrays, meta = split["arrays"], split["meta"]
    with setup.context():
        if task.kind == "retrieval":
            q_QxD = _predict_all(setup, params, arrays, "q_")
            d_CxD = _predict_all(setup, params, meta["corpus"])
            return metrics.ranking_scores(q_QxD @ d_CxD.T, meta["relevant"])
        inputs = {k: v for k, v in arrays.items() if k in ("tokens", "segment_ids", "positions")}
        out = _predict_all(setup, params, inputs)
    if task.kind == "classification":
        return {"accuracy": metrics.accuracy(out.argmax(-1), meta["labels"])}
    if task.kind == "token_classification":
        pred_BxL = out.argmax(-1)
        predicted = []
        for row, firsts, gold in zip(pred_BxL, meta["first_positions"], meta["gold_tags"]):
            tags = [task.labels[int(row[p])] for p in firsts]
            predicted.append(tags + ["O"] * (len(gold) - len(tags)))  # words cut by max_len: 'O'
        return {"entity_f1": metrics.entity_f1(predicted, meta["gold_tags"])}
    start, end = out
    texts = decode_spans(
        start, end, arrays["context_mask"], meta["offsets"], meta["contexts"], task.unanswerable,
        setup.ft.max_answer_tokens,
    )
    return metrics.squad_scores(texts, meta["gold_answers"])


def chance_score(task: Task, features: dict) -> float:
    """The validation score of a model that learned nothing (main metric, percent)."""
    meta = features["validation"]["meta"]
    if task.kind == "classification":
        return 100.0 * np.bincount(meta["labels"]).max() / len(meta["labels"])
    if task.kind == "qa":
        golds = meta["gold_answers"]
        return 100.0 * sum(not g for g in golds) / len(golds) if task.unanswerable else 0.0
    if task.kind == "retrieval":
        docs = len(meta["corpus"]["tokens"])
        scores = [metrics.random_ranking_scores(docs, 10, len(rel))["ndcg@10"] for rel in meta["relevant"]]
        return float(np.mean(scores))
    return 0.0


def run_budget(task: Task, features: dict, ft) -> tuple[int, int]:
    """(steps, validate every): a fixed step budget, or whole epochs for token classification
    (at least `token_classification_min_steps`: a small split's epoch is too short for a head)."""
    if task.kind == "token_classification" and ft.token_classification_epochs > 0:
        n = len(features["train"]["arrays"]["tokens"])
        steps = max(1, math.ceil(n * ft.token_classification_epochs / ft.batch_size),
                    int(ft.get("token_classification_min_steps", 0)))
        return steps, max(1, min(ft.token_classification_eval_every, steps))
    return ft.steps, max(1, min(ft.eval_every, ft.steps))


def run(setup: Setup, encoder_params, task: Task, features: dict, lr: float, seed: int) -> RunResult:
    """Fine-tune from `encoder_params` (placed by place_encoder) with one LR and seed."""
    ft = setup.ft
    steps, eval_every = run_budget(task, features, ft)
    train = features["train"]["arrays"]
    n = len(next(iter(train.values())))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps * ft.batch_size / n) + 1)])
    with setup.context():
        params = setup.init(jax.random.PRNGKey(seed))
        params = {**params, "encoder": encoder_params}
        opt_state = jax.jit(setup.tx.init, out_shardings=setup.opt_shardings)(params)
    chance = chance_score(task, features)
    best, best_step, best_params, history, losses = None, None, None, [], []
    reason = ""
    for step in range(steps):
        idx = order[step * ft.batch_size : (step + 1) * ft.batch_size]
        batch = _device_batch(setup, {k: v[idx] for k, v in train.items()})
        lr_now = jnp.float32(lr * learning_rate_factor(step, steps, ft.warmup_fraction))
        with setup.context():
            params, opt_state, loss = setup.train_step(params, opt_state, batch, lr_now)
        losses.append(loss)
        if (step + 1) % eval_every and step + 1 != steps:
            continue
        mean_loss = float(np.mean([float(x) for x in losses]))
        losses = []
        if not math.isfinite(mean_loss):
            reason = f"non-finite training loss before step {step + 1}"
            break
        score = evaluate(setup, params, task, features["validation"])[task.metric]
        history.append((step + 1, score, mean_loss))
        if best is None or score > best:
            best, best_step, best_params = score, step + 1, params
    test_metrics = evaluate(setup, best_params, task, features["test"]) if best_params is not None else {}
    if not reason and best is not None and best <= chance + ft.chance_margin:
        reason = f"best validation {best:.2f} within {ft.chance_margin} of chance ({chance:.2f})"
    return RunResult(
        best_validation=best,
        best_step=best_step,
        test=test_metrics.get(task.metric),
        test_metrics=test_metrics,
        diverged=bool(reason),
        reason=reason,
        history=history,
        params=best_params,
    )
