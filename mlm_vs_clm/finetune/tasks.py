"""Fine-tuning tasks: what an example looks like, and how it becomes token arrays.

Example schemas (the same fields are read from local JSONL/Parquet files, see docs/finetune.md):
  classification        {"text": str, "text_pair": str (optional), "label": int}
  token_classification  {"words": [str], "tags": [str]}        (BIO tags, e.g. B-PER)
  qa                    {"id": str, "question": str, "context": str,
                         "answers": [{"text": str, "start": int}]}   ([] = unanswerable)
  retrieval             {"query": str, "document": str}        (one relevant pair per row)

Every split is checked for the fields its kind needs (REQUIRED) when a Task is made.
Retrieval evaluation groups the rows of a split by query text: one query per distinct text,
relevant = all of its documents; the corpus is the split's distinct documents. Training keeps
one (query, document) pair per row, and the in-batch loss masks every column whose document
is relevant to the row's query (another positive of the same query, or the same document).

Every row is one segment: [bos] text [eos] (pairs: [bos] a [eos] b [eos]; QA: [bos] question
[eos] context [eos]), right-padded with segment id 0. Words are tokenised one at a time, which
gives each sub-token a character span (the first sub-token of a word carries its tag; a QA
answer maps back to context[char_start:char_end]).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

KINDS = ("classification", "token_classification", "qa", "retrieval")
MAIN_METRIC = {"classification": "accuracy", "token_classification": "entity_f1", "qa": "f1", "retrieval": "ndcg@10"}
REQUIRED = {
    "classification": ("text", "label"),
    "token_classification": ("words", "tags"),
    "qa": ("question", "context", "answers"),
    "retrieval": ("query", "document"),
}
IGNORE = -100  # label of positions that carry no loss (padding, non-first sub-tokens)
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Task:
    name: str
    kind: str
    splits: dict  # 'train' / 'validation' / 'test' -> list of examples (schemas above)
    labels: tuple = ()  # class names (classification) or the tag set (token_classification)
    unanswerable: bool = False  # qa: SQuAD-v2 style (predicting no answer is allowed)
    note: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: unknown kind {self.kind!r} (one of {KINDS})")
        missing = [s for s in SPLITS if not self.splits.get(s)]
        if missing:
            raise ValueError(f"task {self.name}: split(s) {missing} are missing or empty")
        if self.kind in ("classification", "token_classification") and not self.labels:
            raise ValueError(f"task {self.name}: a {self.kind} task needs its labels")
        for split in SPLITS:
            check_fields(self.kind, self.splits[split], f"task {self.name}: {split}")

    @property
    def metric(self) -> str:
        return MAIN_METRIC[self.kind]

    @property
    def num_outputs(self) -> int:
        return {"classification": len(self.labels), "token_classification": len(self.labels), "qa": 2}.get(
            self.kind, 0
        )


def check_fields(kind: str, rows: list, where: str) -> None:
    """Raise ValueError naming `where`, the row (1-based) and the field when a row lacks a
    field that `kind` needs (None counts as missing: a null Parquet cell)."""
    needs = ", ".join(REQUIRED[kind])
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where} row {i + 1}: not an object but {type(row).__name__}")
        for field in REQUIRED[kind]:
            if row.get(field) is None:
                raise ValueError(f"{where} row {i + 1}: missing field {field!r} (a {kind} row needs {needs})")


def pack_rows(rows: list, length: int) -> dict:
    """Token-id lists -> tokens / segment_ids / positions int32 [N, length] (right padding)."""
    n = len(rows)
    tokens = np.zeros((n, length), np.int32)
    seg = np.zeros((n, length), np.int32)
    for i, row in enumerate(rows):
        row = row[:length]
        tokens[i, : len(row)] = row
        seg[i, : len(row)] = 1
    pos = np.where(seg > 0, np.arange(length, dtype=np.int32)[None, :], 0).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


class WordPieces:
    """Per-word tokenisation with character spans, cached (vocabularies of words are small)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache = functools.lru_cache(maxsize=200_000)(self._pieces)

    def _pieces(self, word: str) -> tuple:
        ids = list(self.tokenizer.encode(word)) or [self.tokenizer.unk_id]
        spans, prev = [], 0
        exact = self.tokenizer.decode(ids).strip() == word
        for k in range(1, len(ids) + 1):
            end = min(len(self.tokenizer.decode(ids[:k]).lstrip()), len(word)) if exact else len(word)
            end = max(end, prev)
            spans.append((prev if exact else 0, end))
            prev = end
        return tuple(ids), tuple(spans)

    def __call__(self, word: str) -> tuple:
        return self._cache(word)


def _words_with_offsets(text: str):
    return [(m.group(), m.start()) for m in re.finditer(r"\S+", text)]


def featurize(task: Task, tokenizer, max_len: int, query_max_len: int = 64) -> dict:
    """split name -> {'arrays': dict of [N, ...] numpy arrays, 'meta': what evaluation needs}."""
    fn = {
        "classification": _classification,
        "token_classification": _token_classification,
        "qa": _qa,
        "retrieval": _retrieval,
    }[task.kind]
    pieces = WordPieces(tokenizer)
    return {
        split: fn(task, examples, tokenizer, pieces, max_len, query_max_len, train=split == "train")
        for split, examples in task.splits.items()
    }


def _classification(task, examples, tok, pieces, max_len, qlen, train):
    rows, labels = [], []
    for ex in examples:
        ids = [tok.bos_id] + list(tok.encode(ex["text"])) + [tok.eos_id]
        if ex.get("text_pair") is not None:
            pair = list(tok.encode(ex["text_pair"])) + [tok.eos_id]
            keep_a = max(max_len // 2, max_len - len(pair))  # truncate the longer side first
            ids = ids[:keep_a] + pair
        rows.append(ids[:max_len])
        label = int(ex["label"])
        if not 0 <= label < len(task.labels):
            raise ValueError(f"task {task.name}: label {label} outside 0..{len(task.labels) - 1}")
        labels.append(label)
    arrays = pack_rows(rows, max_len)
    arrays["labels"] = np.asarray(labels, np.int32)
    return {"arrays": arrays, "meta": {"labels": arrays["labels"]}}


def _token_classification(task, examples, tok, pieces, max_len, qlen, train):
    tag_index = {t: i for i, t in enumerate(task.labels)}
    rows, label_rows, first_positions, gold = [], [], [], []
    for ex in examples:
        if len(ex["words"]) != len(ex["tags"]):
            raise ValueError(f"task {task.name}: an example has {len(ex['words'])} words but {len(ex['tags'])} tags")
        ids, labels, firsts = [tok.bos_id], [IGNORE], []
        for word, tag in zip(ex["words"], ex["tags"]):
            if tag not in tag_index:
                raise ValueError(f"task {task.name}: tag {tag!r} is not in the task's tag set")
            word_ids = pieces(word)[0]
            if len(ids) + len(word_ids) > max_len - 1:
                break
            firsts.append(len(ids))
            labels += [tag_index[tag]] + [IGNORE] * (len(word_ids) - 1)
            ids += list(word_ids)
        ids.append(tok.eos_id)
        labels.append(IGNORE)
        rows.append(ids)
        label_rows.append(labels + [IGNORE] * (max_len - len(labels)))
        first_positions.append(firsts)
        gold.append(list(ex["tags"]))
    arrays = pack_rows(rows, max_len)
    arrays["labels"] = np.asarray(label_rows, np.int32)
    return {"arrays": arrays, "meta": {"first_positions": first_positions, "gold_tags": gold}}


def _qa(task, examples, tok, pieces, max_len, qlen, train):
    rows, starts, ends, ctx_masks, offsets, golds, contexts, kept = [], [], [], [], [], [], [], []
    for ex in examples:
        q_ids = list(tok.encode(ex["question"]))[:qlen]
        ids = [tok.bos_id] + q_ids + [tok.eos_id]
        ctx_start = len(ids)
        spans = []  # (char_start, char_end) in the context, per context token
        for word, offset in _words_with_offsets(ex["context"]):
            word_ids, word_spans = pieces(word)
            if len(ids) + len(word_ids) > max_len - 1:
                break
            ids += list(word_ids)
            spans += [(offset + a, offset + b) for a, b in word_spans]
        ids.append(tok.eos_id)
        span_arr = np.full((max_len, 2), -1, np.int32)
        span_arr[ctx_start : ctx_start + len(spans)] = spans
        start = end = 0  # position 0 ([bos]) means "no answer"
        answers = ex.get("answers") or []
        if answers:
            a_start = int(answers[0]["start"])
            a_end = a_start + len(answers[0]["text"])
            inside = [i for i, (s, e) in enumerate(spans) if e > a_start and s < a_end]
            if inside and spans[inside[-1]][1] >= a_end:
                start, end = ctx_start + inside[0], ctx_start + inside[-1]
            elif train and not task.unanswerable:
                continue  # the answer was truncated away: useless for a task without "no answer"
        elif not task.unanswerable:
            raise ValueError(f"task {task.name}: example {ex.get('id')!r} has no answer but the task needs one")
        rows.append(ids)
        starts.append(start)
        ends.append(end)
        mask = np.zeros(max_len, np.int32)
        mask[ctx_start : ctx_start + len(spans)] = 1
        ctx_masks.append(mask)
        offsets.append(span_arr)
        golds.append([a["text"] for a in answers])
        contexts.append(ex["context"])
        kept.append(ex)
    if not rows:
        raise ValueError(f"task {task.name}: no example fits max_len={max_len}")
    arrays = pack_rows(rows, max_len)
    arrays.update(
        start_positions=np.asarray(starts, np.int32),
        end_positions=np.asarray(ends, np.int32),
        context_mask=np.stack(ctx_masks),
    )
    return {"arrays": arrays, "meta": {"offsets": np.stack(offsets), "gold_answers": golds, "contexts": contexts}}


def decode_spans(start_NxL, end_NxL, context_mask_NxL, offsets_NxLx2, contexts, unanswerable, max_answer_tokens=30):
    """Best span per row (start <= end, within the context, at most max_answer_tokens long) ->
    its text; '' when the task allows no answer and position 0 scores higher than every span."""
    predictions = []
    for s, e, m, off, ctx in zip(start_NxL, end_NxL, context_mask_NxL, offsets_NxLx2, contexts):
        s_masked = np.where(m > 0, s, -np.inf)
        e_masked = np.where(m > 0, e, -np.inf)
        pair_LxL = s_masked[:, None] + e_masked[None, :]
        length = np.arange(len(s))[None, :] - np.arange(len(s))[:, None]
        pair_LxL = np.where((length >= 0) & (length < max_answer_tokens), pair_LxL, -np.inf)
        i, j = np.unravel_index(np.argmax(pair_LxL), pair_LxL.shape)
        best = pair_LxL[i, j]
        if not np.isfinite(best) or (unanswerable and s[0] + e[0] > best):
            predictions.append("")
        else:
            predictions.append(ctx[off[i, 0] : off[j, 1]])
    return predictions


def _retrieval(task, examples, tok, pieces, max_len, qlen, train):
    doc_index, docs, query_index, queries, relevant = {}, [], {}, [], []
    pair_docs, pair_queries = [], []  # per row
    for ex in examples:
        d, q = ex["document"], ex["query"]
        if d not in doc_index:
            doc_index[d] = len(docs)
            docs.append([tok.bos_id] + list(tok.encode(d))[: max_len - 2] + [tok.eos_id])
        if q not in query_index:
            query_index[q] = len(queries)
            queries.append([tok.bos_id] + list(tok.encode(q))[: qlen - 2] + [tok.eos_id])
            relevant.append(set())
        relevant[query_index[q]].add(doc_index[d])
        pair_docs.append(doc_index[d])
        pair_queries.append(query_index[q])
    q = pack_rows(queries, qlen)
    d = pack_rows(docs, max_len)
    meta = {"corpus": d, "relevant": relevant}
    if not train:  # one row per distinct query, scored against the whole corpus
        return {"arrays": {"q_" + k: v for k, v in q.items()}, "meta": meta}
    # Training pairs, one per row: the query and its document, row-aligned; `relevant_ids`
    # [N, most documents of a query] lists every document of the row's query (-1 pads) so that
    # the in-batch loss can mask the columns that are not negatives.
    pair_docs, pair_queries = np.asarray(pair_docs, np.int32), np.asarray(pair_queries, np.int32)
    relevant_ids = np.full((len(relevant), max(map(len, relevant))), -1, np.int32)
    for i, rel in enumerate(relevant):
        relevant_ids[i, : len(rel)] = sorted(rel)
    arrays = {"q_" + k: v[pair_queries] for k, v in q.items()}
    arrays.update({"d_" + k: v[pair_docs] for k, v in d.items()})
    arrays.update(doc_id=pair_docs, relevant_ids=relevant_ids[pair_queries])
    return {"arrays": arrays, "meta": meta}
