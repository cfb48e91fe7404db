"""Fine-tuning evaluation configs: `--config=configs/finetune.py:SUITE[,quick]`.

SUITE is `news` (offline, built from the held-out demo-corpus articles; the default) or `paper`
(SST-2, MNLI, QQP, CoNLL-2003, SQuAD, SQuAD-v2, MS MARCO; PAPER.md's OntoNotes, UNER, ReCoRD,
NQ and MLDR are not included). `news_quick`, `paper_quick` or `SUITE,quick`: one learning rate,
two seeds, few steps, short rows, at most 200 validation / test examples (smoke runs, the demo).
Protocol defaults are PAPER.md's (the full suites score whole validation and test splits);
every one is a key: `--config.learning_rates=1e-4,2e-4`.
"""

import importlib.util
import os

import ml_collections

SUITES = ("news", "paper")
PAPER_TASKS = ("sst2", "mnli", "qqp", "conll2003", "squad", "squad_v2", "msmarco")
NEWS_TASKS = ("topic", "retrieval", "cloze_qa", "truecase")


def _pretrain_rules():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
    spec = importlib.util.spec_from_file_location("_mlm_vs_clm_pretrain_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DEFAULT_RULES


def get_config(arg: str = "news") -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (arg or "news").replace("_", ",").split(",") if p.strip()]
    quick = "quick" in parts
    suites = [p for p in parts if p != "quick"]
    if len(suites) > 1 or any(s not in SUITES for s in suites):
        raise ValueError(f"config: unknown fine-tuning suite {arg!r} (use news, paper, news_quick, paper_quick)")
    suite = suites[0] if suites else "news"

    c = ml_collections.ConfigDict()
    c.suite = suite
    c.quick = quick
    # Checkpoints to evaluate: `checkpoint` (one path) and/or `checkpoints` (comma-separated or
    # a tuple); all are run with the same grid and shown side by side.
    c.checkpoint = ""
    c.checkpoints = ()
    # Tasks of the suite to run ('' = all): `--config.tasks=topic,cloze_qa`.
    c.tasks = ",".join(NEWS_TASKS if suite == "news" else PAPER_TASKS)

    # The PAPER.md protocol.
    c.learning_rates = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4)
    c.seeds = (0, 1, 2, 3, 4)
    c.batch_size = 32
    c.eval_batch_size = 32
    c.steps = 1000  # sequence classification, QA, retrieval
    c.eval_every = 100
    c.token_classification_epochs = 1  # token classification trains for epochs (0 = `steps`)
    c.token_classification_eval_every = 20
    # A floor on token-classification steps (project choice, not PAPER.md's): one epoch of a small
    # train split (news `truecase`: 732 examples = 23 steps of 32) leaves every seed at the all-O
    # model; 300 steps let a head learn (F1 about 48 here and through transformers). 0 = no floor.
    c.token_classification_min_steps = 300 if suite == "news" else 0
    c.warmup_fraction = 0.1  # linear warmup, then linear decay to 0
    c.optimizer = ml_collections.ConfigDict(
        dict(b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip_norm=1.0)  # clip_norm 0 = off
    )

    # Model knobs at fine-tuning time.
    c.attention = "bidirectional"  # or 'causal' (also for CLM-pretrained encoders, default bidirectional)
    # 'mean', 'first', 'last' (sequence classification and retrieval); 'first' is refused under
    # causal attention: the first token sees only itself, so its vector ignores the input.
    c.pooling = "mean"
    # Sequence-classification head: 'linear' (pooled -> classes) or 'eurobert' (pooled -> dense
    # -> GELU -> classes, the transformers EuroBertForSequenceClassification head the study used).
    c.head = "eurobert" if suite == "paper" else "linear"
    c.retrieval_temperature = 0.05
    c.max_len = 512 if suite == "paper" else 256
    c.query_max_len = 64  # QA questions and retrieval queries
    c.max_answer_tokens = 30
    c.dtype = ""  # '' = the checkpoint's compute dtype; or 'float32' / 'bfloat16'

    # A run is `diverged` if its loss goes non-finite or its best validation score is within
    # chance_margin (percentage points) of chance.
    c.chance_margin = 1.0
    c.max_eval_examples = 0  # per validation / test split (0 = all: PAPER.md scores whole splits)
    c.max_train_examples = 0  # 0 = all

    # Data: news splits; paper tasks from TFDS (data_dir) or local files.
    c.data = ml_collections.ConfigDict(
        dict(
            tfds_data_dir="",  # '' = TFDS's default
            # Directory with local files `<task>/{train,validation,test}.{jsonl,parquet}` in
            # the schemas of docs/finetune.md; a task found there is not read from TFDS.
            local_dir="",
            news_seed=0,
        )
    )

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=_pretrain_rules()))
    c.progress = True
    # Keep the parameters of the best run of each (task, checkpoint) in WORKDIR/models/ for
    # `python -m mlm_vs_clm.convert export-hf` (classification and token-classification heads).
    c.save_models = True

    if quick:
        c.learning_rates = (1e-3,) if suite == "news" else (1e-4,)
        c.seeds = (0, 1)
        c.batch_size = 16
        c.eval_batch_size = 64
        c.steps = 100
        c.eval_every = 50
        c.token_classification_epochs = 0  # use `steps` for every task
        c.max_len = 128
        c.query_max_len = 32
        c.max_eval_examples = 200
    return c
