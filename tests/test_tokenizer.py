"""Tokenizer: training, reserved ids, round trips, save/load, Hugging Face tokenizer.json, errors."""

import json
import os
import pickle

import numpy as np
import pytest

from mlm_vs_clm.data import tokenizer as tk
from tests.helpers import run_command

WORDS = ("the market report said growth in the second quarter was strong while ministers debated the budget and the "
         "team won the final match at home café naïve Zürich Ελλάδα Москва 東京 新闻 🙂").split()


def make_texts(n_docs=300, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 20))) + "." for _ in range(rng.integers(1, 4))]
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return tk.train_tokenizer(make_texts(), vocab_size=320, out_dir=str(out)), str(out)


def test_reserved_ids_match_config_defaults(trained):
    tok, _ = trained
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == (0, 1, 2, 3, 4)
    assert [tok.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    assert tok.vocab_size == 320
    # Special pieces typed in text are ordinary text, never the special ids.
    ids = tok.encode("<mask> <s> </s> <pad> <unk>")
    assert not set(ids) & set(tok.special_ids)


@pytest.mark.parametrize(
    "text",
    ["the market report", "Zürich café naïve — Ελλάδα, Москва, 東京 🙂", "two  spaces\nnew line\ttab ",
     "unseen ∮ ⅋ 𝔘 characters", ""],
)
def test_round_trip_including_non_ascii(trained, text):
    tok, _ = trained
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown


def test_save_load_and_pickle_give_same_ids(trained, tmp_path):
    tok, out = trained
    text = "ministers debated the budget in 東京 🙂"
    for loaded in (tk.load_tokenizer(out), tk.load_tokenizer(os.path.join(out, tk.MODEL_FILE)),
                   tk.load_tokenizer(tok.save(str(tmp_path / "copy"))), pickle.loads(pickle.dumps(tok))):
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.special_ids == tok.special_ids and loaded.vocab_size == tok.vocab_size
    assert tok.encode_batch(["the team", "won"]) == [tok.encode("the team"), tok.encode("won")]


def test_bpe_and_vocab_size_limits(tmp_path):
    texts = make_texts(100)
    bpe = tk.train_tokenizer(texts, vocab_size=400, model_type="bpe")
    assert bpe.vocab_size == 400 and bpe.mask_id == 4
    assert bpe.decode(bpe.encode("naïve team")) == "naïve team"
    # Too little text for the vocabulary: smaller vocabulary by default, a clear error with exact=True.
    small = tk.train_tokenizer(texts, vocab_size=5000)
    assert 261 < small.vocab_size < 5000
    with pytest.raises(tk.TokenizerError, match="too small for vocab_size=5000"):
        tk.train_tokenizer(texts, vocab_size=5000, exact=True)
    with pytest.raises(tk.TokenizerError, match="vocab_size=300 is too small for the characters"):
        tk.train_tokenizer(texts, vocab_size=300, model_type="bpe")
    with pytest.raises(tk.TokenizerError, match="reserved"):
        tk.train_tokenizer(texts, vocab_size=100)
    with pytest.raises(tk.TokenizerError, match="model_type"):
        tk.train_tokenizer(texts, vocab_size=300, model_type="wordpiece")


_TRAIN_IN_A_PROCESS = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from tests.test_tokenizer import make_texts
from mlm_vs_clm.data import tokenizer as tk
tok = tk.train_tokenizer(make_texts(600), vocab_size=330, input_sentence_size=200, seed=int(sys.argv[2]))
print(hashlib.sha256(tok._proto).hexdigest())
"""


def test_sampled_training_is_the_same_in_every_process():
    """More lines than input_sentence_size: the sample (hence the model) depends on the seed
    only, so two processes (two hosts) train byte-identical models."""
    import subprocess
    import sys

    assert sum(len(t.splitlines()) for t in make_texts(600)) > 1000  # sampled down to 200
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def digest(seed):
        cmd = [sys.executable, "-c", _TRAIN_IN_A_PROCESS, root, str(seed)]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root).stdout.strip()

    first = digest(0)
    assert digest(0) == first
    assert digest(1) != first  # the sample matters: an unseeded one would differ between processes


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(tk.TokenizerError, match="nowhere"):
        tk.load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(tk.TokenizerError, match="neither spiece.model nor tokenizer.json"):
        tk.load_tokenizer(str(tmp_path))
    (tmp_path / "spiece.model").write_bytes(b"not a model at all")
    with pytest.raises(tk.TokenizerError, match="spiece.model.*not a valid sentencepiece"):
        tk.load_tokenizer(str(tmp_path))
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{ broken")
    with pytest.raises(tk.TokenizerError, match="tokenizer.json.*not a valid"):
        tk.load_tokenizer(str(bad))


def _hf_tokenizer(specials):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(specials + ["the", "team", "won", "[UNK]"])}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    return hf


def test_hugging_face_tokenizer_json(tmp_path):
    hf = _hf_tokenizer(["[PAD]", "<s>", "</s>", "[MASK]"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = tk.load_tokenizer(str(tmp_path))
    assert isinstance(tok, tk.HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.unk_id) == (0, 1, 2, 3, 7)
    assert tok.vocab_size == 8
    assert tok.encode("the team won") == [4, 5, 6]
    assert tok.decode([1, 4, 5, 6, 2]) == "the team won"
    # Saved with its meta file, then loaded from the file itself: same ids.
    again = tk.load_tokenizer(os.path.join(tok.save(str(tmp_path / "saved")), "tokenizer.json"))
    assert again.special_ids == tok.special_ids and again.encode("won the") == [6, 4]
    assert pickle.loads(pickle.dumps(tok)).encode("team") == [5]

    no_mask = _hf_tokenizer(["<pad>", "<s>", "</s>"])
    no_mask.save(str(tmp_path / "plain.json"))
    assert tk.load_tokenizer(str(tmp_path / "plain.json")).mask_id is None


def test_command_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": t}) for t in make_texts(150)))
    out = tmp_path / "out"
    proc = run_command("data.tokenizer", [f"--input={corpus}", "--vocab_size=400", f"--out={out}",
                                           "--text_field=body", "--model_type=bpe"])
    assert proc.returncode == 0, proc.stderr
    assert tk.load_tokenizer(str(out)).vocab_size == 400
    proc = run_command("data.tokenizer", [f"--input={tmp_path / 'missing.txt'}", "--vocab_size=300", f"--out={out}"])
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "missing.txt" in err and err.count("\n") == 0, err
