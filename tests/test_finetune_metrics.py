import math

import numpy as np
import pytest

from mlm_vs_clm.finetune import metrics


def test_accuracy_hand_computed():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 50.0
    with pytest.raises(ValueError, match="accuracy"):
        metrics.accuracy([1, 0], [1])


def test_entity_f1_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    # Sentence 1: PER found, LOC missed; sentence 2: ORG found. P = 2/2, R = 2/3 -> F1 = 0.8.
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG"]]
    assert metrics.entity_f1(pred, gold) == pytest.approx(80.0)
    # A wrong type and a wrong boundary are both errors: P = 1/3, R = 1/3.
    pred = [["B-PER", "O", "O", "B-ORG"], ["O", "B-ORG"]]
    assert metrics.entity_f1(pred, gold) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="tags"):
        metrics.entity_f1([["O"]], [["O", "O"]])


def test_squad_normalisation_and_scores():
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.normalize_answer("an apple, a pear") == "apple pear"
    preds = ["eiffel tower", "the tower in Paris", "", "something"]
    golds = [["The Eiffel Tower", "Paris"], ["Eiffel Tower"], [], []]
    # F1 of question 2: pred {tower, in, paris} vs gold {eiffel, tower}: P 1/3, R 1/2 -> 0.4.
    scores = metrics.squad_scores(preds, golds)
    assert scores["exact"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx((1 + 0.4 + 1 + 0) / 4 * 100)


def test_ranking_scores_hand_computed():
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.9, 0.1, 0.2, 0.8]])
    out = metrics.ranking_scores(scores, [{2}, {0, 3}])
    # Query 0: the relevant document is ranked 2nd -> NDCG 1/log2(3), MRR 1/2. Query 1: ideal.
    assert out["ndcg@10"] == pytest.approx(100 * (1 / math.log2(3) + 1) / 2)
    assert out["mrr@10"] == pytest.approx(75.0)
    # Beyond the cut-off a relevant document earns nothing.
    far = metrics.ranking_scores(-np.arange(12.0)[None, :], [{11}])
    assert far == {"ndcg@10": 0.0, "mrr@10": 0.0}


def test_random_ranking_expectation():
    out = metrics.random_ranking_scores(4)
    assert out["ndcg@10"] == pytest.approx(25 * (1 + 1 / math.log2(3) + 0.5 + 1 / math.log2(5)))
    assert out["mrr@10"] == pytest.approx(25 * (1 + 1 / 2 + 1 / 3 + 1 / 4))


def test_random_ranking_expectation_with_several_relevant_documents():
    import itertools

    # Exhaustive: every ordering of 5 documents, 2 of them relevant, equally likely (k=3).
    orders = list(itertools.permutations(range(5)))
    exact = [metrics.ranking_scores(-np.argsort(order)[None, :].astype(float), [{0, 1}], k=3) for order in orders]
    expected = metrics.random_ranking_scores(5, k=3, num_relevant=2)
    assert expected["ndcg@3"] == pytest.approx(np.mean([e["ndcg@3"] for e in exact]))
    assert expected["mrr@3"] == pytest.approx(np.mean([e["mrr@3"] for e in exact]))
    assert metrics.random_ranking_scores(5, num_relevant=5)["ndcg@10"] == pytest.approx(100.0)
