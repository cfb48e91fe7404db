"""Task metrics, all in percent (0-100): accuracy, entity F1, SQuAD EM/F1, NDCG@10, MRR@10.

Entity F1 is seqeval's (CoNLL evaluation); SQuAD EM/F1 follow the official evaluation
script's normalisation (lowercase, drop punctuation, drop the articles a/an/the, collapse
whitespace; the score of a question is the maximum over its gold answers; an unanswerable
question's only gold answer is the empty string).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np
from seqeval.metrics import f1_score as _seqeval_f1


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or labels.size == 0:
        raise ValueError(f"accuracy: need equal, non-empty shapes, got {predictions.shape} and {labels.shape}")
    return 100.0 * float(np.mean(predictions == labels))


def entity_f1(predicted_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]) -> float:
    """Micro-averaged entity F1 over BIO tag sequences (one list of tags per sentence)."""
    if len(predicted_tags) != len(gold_tags):
        raise ValueError("entity_f1: as many predicted as gold sentences are needed")
    for p, g in zip(predicted_tags, gold_tags):
        if len(p) != len(g):
            raise ValueError(f"entity_f1: a sentence has {len(p)} predicted tags and {len(g)} gold tags")
    return 100.0 * float(_seqeval_f1([list(g) for g in gold_tags], [list(p) for p in predicted_tags]))


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # unanswerable: 1 only if both are empty
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> dict:
    """{'exact': EM, 'f1': F1} in percent. An empty gold list means unanswerable (gold '')."""
    if len(predictions) != len(gold_answers) or not predictions:
        raise ValueError("squad_scores: need one prediction per question, and at least one question")
    exact, f1 = 0.0, 0.0
    for pred, golds in zip(predictions, gold_answers):
        golds = [g for g in golds if normalize_answer(g)] or [""]
        exact += max(_exact(pred, g) for g in golds)
        f1 += max(_f1(pred, g) for g in golds)
    n = len(predictions)
    return {"exact": 100.0 * exact / n, "f1": 100.0 * f1 / n}


def ranking_scores(scores_QxC: np.ndarray, relevant: Sequence[set], k: int = 10) -> dict:
    """NDCG@k and MRR@k (binary relevance) in percent.

    scores_QxC: similarity of each query to each corpus document; relevant[q]: the indices of
    the documents relevant to query q. Ties are broken by the lower document index.
    """
    scores_QxC = np.asarray(scores_QxC, np.float64)
    if scores_QxC.ndim != 2 or scores_QxC.shape[0] != len(relevant) or not len(relevant):
        raise ValueError(f"ranking_scores: scores {scores_QxC.shape} do not match {len(relevant)} queries")
    order_QxC = np.argsort(-scores_QxC, axis=1, kind="stable")[:, :k]
    ndcg, mrr = 0.0, 0.0
    for q, rel in enumerate(relevant):
        gains = [1.0 if int(d) in rel else 0.0 for d in order_QxC[q]]
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
        ideal = sum(1.0 / math.log2(r + 2) for r in range(min(len(rel), k)))
        ndcg += dcg / ideal if ideal else 0.0
        first = next((r for r, g in enumerate(gains) if g), None)
        mrr += 1.0 / (first + 1) if first is not None else 0.0
    n = len(relevant)
    return {f"ndcg@{k}": 100.0 * ndcg / n, f"mrr@{k}": 100.0 * mrr / n}


def random_ranking_scores(num_docs: int, k: int = 10, num_relevant: int = 1) -> dict:
    """Expected NDCG@k / MRR@k of a random ranking of num_docs documents, num_relevant of them
    relevant (one query)."""
    n, r = max(num_docs, 1), min(max(num_relevant, 1), max(num_docs, 1))
    ranks = range(min(k, n))
    ideal = sum(1 / math.log2(i + 2) for i in range(min(r, k)))
    ndcg = 100.0 * (r / n) * sum(1 / math.log2(i + 2) for i in ranks) / ideal  # P(relevant at rank i) = r/n
    mrr, none_before = 0.0, 1.0  # P(first relevant at rank i) = P(none before i) * r / (n - i)
    for i in ranks:
        mrr += none_before * r / (n - i) / (i + 1)
        none_before *= (n - i - r) / (n - i)
    return {f"ndcg@{k}": ndcg, f"mrr@{k}": 100.0 * mrr}
