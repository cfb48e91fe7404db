"""The offline `news` suite, built from the held-out demo-corpus articles (BBC News).

Only `heldout_articles()` are used (disjoint from the pretraining split). Articles are split
by a hash of (news_seed, article id) into train 60 % / validation 20 % / test 20 %; every
task uses the same article split, so no test article is seen in any task's training.

Tasks (docs/finetune.md says more):
  topic      classification: headline + body -> one of the 5 topics.
  retrieval  headline (query) -> its article body among the split's bodies.
  cloze_qa   an entity-like span of the headline (a run of capitalised words, or a number) is
             replaced by `@placeholder`; the answer is its first occurrence in the body.
             One item in three has the sentences that contain the span removed from the
             context: unanswerable (SQuAD-v2 style), as is any item whose answer is truncated away.
  truecase   token classification: the words of the body's first sentences, lowercased; tags
             mark runs of capitalised words (CAP) and all-capitals words (UPPER) in BIO.
"""

from __future__ import annotations

import hashlib
import re

from mlm_vs_clm.data.demo_corpus import heldout_articles
from mlm_vs_clm.finetune.tasks import Task

TRUECASE_TAGS = ("O", "B-CAP", "I-CAP", "B-UPPER", "I-UPPER")
PLACEHOLDER = "@placeholder"
SENTENCES_PER_ARTICLE = 3

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_CANDIDATE = re.compile(r"[A-Z][\w&'.-]*(?:\s+[A-Z][\w&'.-]*)*|\d[\d,.]*%?")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_articles(articles: list, seed: int = 0) -> dict:
    """Deterministic train / validation / test split of the articles (60 / 20 / 20 by hash)."""
    splits = {"train": [], "validation": [], "test": []}
    for a in sorted(articles, key=lambda a: a["id"]):
        r = _hash(f"{seed}:{a['id']}") % 10
        splits["train" if r < 6 else "validation" if r < 8 else "test"].append(a)
    return splits


def sentences(text: str) -> list:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def topic_examples(articles, topics):
    return [{"text": f"{a['headline']}\n{a['body']}", "label": topics.index(a["topic"])} for a in articles]


def retrieval_examples(articles):
    return [{"query": a["headline"], "document": a["body"]} for a in articles if a["headline"] and a["body"]]


def cloze_candidates(headline: str, body: str) -> list:
    """Entity-like spans of the headline: runs of capitalised words or numbers (trailing
    punctuation and possessive 's dropped); a lone sentence-initial word is kept only when the
    body never uses it in lower case (a name, not a common word)."""
    out = []
    for m in _CANDIDATE.finditer(headline):
        span = re.sub(r"('s|')$", "", m.group().rstrip(".,:;-'")).strip()
        if not span or len(span) < 2:
            continue
        if m.start() == 0 and " " not in span and re.search(rf"\b{re.escape(span.lower())}\b", body):
            continue
        out.append((m.start(), span))
    return out


def _find(span: str, text: str):
    m = re.search(rf"(?<!\w){re.escape(span)}(?!\w)", text)
    return m.start() if m else None


def cloze_example(article: dict) -> dict | None:
    headline, body = article["headline"], " ".join(article["body"].split())
    found = []
    for start, span in cloze_candidates(headline, body):
        at = _find(span, body)
        found.append((at if at is not None else len(body) + 1, -len(span), start, span))
    if not found:
        return None
    at, _, start, span = min(found)  # the candidate that occurs first in the body
    question = headline[:start] + headline[start:].replace(span, PLACEHOLDER, 1)
    ex = {"id": article["id"], "question": question, "context": body, "answers": []}
    if _hash("unanswerable:" + article["id"]) % 3 == 0:
        kept = [s for s in sentences(body) if _find(span, s) is None]
        if kept:
            ex["context"] = " ".join(kept)
        return ex if kept else None
    if at <= len(body):
        ex["answers"] = [{"text": span, "start": at}]
    return ex


def casing_tag(word: str) -> str:
    letters = [c for c in word if c.isalpha()]
    if len(letters) >= 2 and all(c.isupper() for c in letters):
        return "UPPER"
    if letters and letters[0].isupper():
        return "CAP"
    return "O"


def truecase_examples(articles):
    out = []
    for a in articles:
        for sent in sentences(a["body"])[:SENTENCES_PER_ARTICLE]:
            words = sent.split()
            tags, prev = [], "O"
            for w in words:
                kind = casing_tag(w)
                tags.append("O" if kind == "O" else ("I-" if kind == prev else "B-") + kind)
                prev = kind
            out.append({"words": [w.lower() for w in words], "tags": tags})
    return out


def news_tasks(articles: list | None = None, seed: int = 0, names=None) -> list:
    """The news suite's tasks (all four, or those named) from held-out articles."""
    if articles is None:
        articles = heldout_articles()
    splits = split_articles(articles, seed)
    topics = tuple(sorted({a["topic"] for a in articles}))
    builders = {
        "topic": lambda arts: topic_examples(arts, topics),
        "retrieval": retrieval_examples,
        "cloze_qa": lambda arts: [e for e in map(cloze_example, arts) if e is not None],
        "truecase": truecase_examples,
    }
    kinds = {"topic": "classification", "retrieval": "retrieval", "cloze_qa": "qa", "truecase": "token_classification"}
    labels = {"topic": topics, "truecase": TRUECASE_TAGS}
    names = list(names) if names else list(builders)
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise ValueError(f"tasks: unknown news task(s) {unknown} (one of {list(builders)})")
    return [
        Task(
            name=name,
            kind=kinds[name],
            splits={s: builders[name](arts) for s, arts in splits.items()},
            labels=labels.get(name, ()),
            unanswerable=name == "cloze_qa",
            note=f"news/{name} from {len(articles)} held-out articles",
        )
        for name in names
    ]
