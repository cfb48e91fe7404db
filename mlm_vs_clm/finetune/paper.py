"""The `paper` suite (PAPER.md): SST-2, MNLI, QQP, CoNLL-2003, SQuAD, SQuAD-v2, MS MARCO.

Each task is read from `data.local_dir/<task>/{train,validation,test}.{jsonl,parquet}` when
that folder exists (rows in the schemas of tasks.py), else from a prepared TFDS dataset via
`tfds.data_source` (no TensorFlow needed; `data.tfds_data_dir`). Public test splits of GLUE
and SQuAD carry no labels, so the public validation split is our test split and 5 % of the
training rows (chosen by a hash of the row index) are our validation split. MS MARCO is not
in the TFDS catalogue: it is read from local files only.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os

import pyarrow.parquet as pq

from mlm_vs_clm.finetune.tasks import SPLITS, Task, check_fields

CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _glue(fields):
    def convert(row):
        ex = {"text": _text(row[fields[0]]), "label": int(row["label"])}
        if len(fields) > 1:
            ex["text_pair"] = _text(row[fields[1]])
        return ex

    return convert


def _conll(row):
    words, tags = list(row["tokens"]), list(row["ner"])
    n = min(len(words), len(tags))  # equal in the real data; mock data draws them separately
    return {"words": [_text(w) for w in words[:n]], "tags": [CONLL_TAGS[int(t)] for t in tags[:n]]}


def _squad(row):
    answers = row["answers"]
    texts, starts = list(answers["text"]), list(answers["answer_start"])
    impossible = bool(row.get("is_impossible", False))
    return {
        "id": _text(row["id"]),
        "question": _text(row["question"]),
        "context": _text(row["context"]),
        "answers": [] if impossible else [{"text": _text(t), "start": int(s)} for t, s in zip(texts, starts)],
    }


# name: (kind, labels, tfds name, tfds train split, tfds split used as our test, converter)
SPECS = {
    "sst2": ("classification", ("negative", "positive"), "glue/sst2", "train", "validation", _glue(["sentence"])),
    "mnli": (
        "classification", ("entailment", "neutral", "contradiction"), "glue/mnli", "train", "validation_matched",
        _glue(["premise", "hypothesis"]),
    ),
    "qqp": (
        "classification", ("not_duplicate", "duplicate"), "glue/qqp", "train", "validation",
        _glue(["question1", "question2"]),
    ),
    "conll2003": ("token_classification", CONLL_TAGS, "conll2003", "train", "test", _conll),
    "squad": ("qa", (), "squad/v1.1", "train", "validation", _squad),
    "squad_v2": ("qa", (), "squad/v2.0", "train", "validation", _squad),
    "msmarco": ("retrieval", (), None, None, None, None),
}
# Builders that TFDS registers only when their module is imported.
TFDS_MODULES = {"glue": "tensorflow_datasets.text.glue", "conll2003": "tensorflow_datasets.text.conll2003"}
# TFDS splits used as our validation split where the dataset has a labelled one.
TFDS_VALIDATION = {"conll2003": "dev"}


def _held_out(index: int) -> bool:
    return int.from_bytes(hashlib.sha256(str(index).encode()).digest()[:4], "big") % 20 == 0


def read_local(path_prefix: str, kind: str = "") -> list:
    """Rows of `PREFIX.jsonl` or `PREFIX.parquet` (one dict per example); with `kind`, every
    row is checked for the fields that kind needs (tasks.REQUIRED)."""
    if os.path.isfile(path_prefix + ".jsonl"):
        path = path_prefix + ".jsonl"
        with open(path, encoding="utf-8") as f:
            try:
                rows = [json.loads(line) for line in f if line.strip()]
            except json.JSONDecodeError as e:
                raise ValueError(f"data: {path} is not valid JSONL ({e})") from e
    elif os.path.isfile(path_prefix + ".parquet"):
        path = path_prefix + ".parquet"
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"data: neither {path_prefix}.jsonl nor {path_prefix}.parquet exists")
    if kind:
        check_fields(kind, rows, f"data: {path}")
    return rows


def _limit(rows, n):
    return rows[:n] if n else rows


def load_task(name: str, data_cfg, max_train: int = 0, max_eval: int = 0) -> Task:
    if name not in SPECS:
        raise ValueError(f"tasks: unknown paper task {name!r} (one of {list(SPECS)})")
    kind, labels, tfds_name, train_split, test_split, convert = SPECS[name]
    local = os.path.join(data_cfg.local_dir, name) if data_cfg.local_dir else ""
    if local and os.path.isdir(local):
        splits = {s: read_local(os.path.join(local, s), kind) for s in SPLITS}
        source = local
    elif tfds_name is None:
        raise ValueError(f"data: task {name} is read from local files only; put them under data.local_dir/{name}/")
    else:
        import tensorflow_datasets as tfds  # heavy (pulls in TensorFlow); local task files do without it

        module = TFDS_MODULES.get(tfds_name.split("/")[0])
        if module:
            importlib.import_module(module)
        kwargs = {"data_dir": data_cfg.tfds_data_dir} if data_cfg.tfds_data_dir else {}
        try:
            train_src = tfds.data_source(tfds_name, split=train_split, **kwargs)
            test_src = tfds.data_source(tfds_name, split=test_split, **kwargs)
            val_src = (tfds.data_source(tfds_name, split=TFDS_VALIDATION[name], **kwargs)
                       if name in TFDS_VALIDATION else None)
        except Exception as e:  # noqa: BLE001 - TFDS raises many types for a missing dataset
            raise ValueError(
                f"data: TFDS dataset {tfds_name} is not prepared ({type(e).__name__}); prepare it or "
                f"set data.local_dir to a folder with {name}/train.jsonl etc."
            ) from e
        if val_src is None:
            n = len(train_src)
            held = {i for i in range(n) if _held_out(i)} or {n - 1}  # tiny sets: at least one row
            train_rows = [convert(train_src[i]) for i in range(n) if i not in held]
            val_rows = [convert(train_src[i]) for i in sorted(held)]
        else:
            train_rows = [convert(train_src[i]) for i in range(len(train_src))]
            val_rows = [convert(val_src[i]) for i in range(len(val_src))]
        test_rows = [convert(test_src[i]) for i in range(len(test_src))]
        splits = {"train": train_rows, "validation": val_rows, "test": test_rows}
        source = f"tfds:{tfds_name}"
    splits = {
        "train": _limit(splits["train"], max_train),
        "validation": _limit(splits["validation"], max_eval),
        "test": _limit(splits["test"], max_eval),
    }
    return Task(name, kind, splits, labels, unanswerable=name == "squad_v2", note=f"paper/{name} from {source}")


def paper_tasks(data_cfg, names, max_train: int = 0, max_eval: int = 0) -> list:
    return [load_task(n, data_cfg, max_train, max_eval) for n in names]
