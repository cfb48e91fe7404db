"""bench.data_path at toy sizes: the measurements run and report what they claim (no timing asserted)."""

import os
import sys

from mlm_vs_clm.bench import data_path


def test_loader_reads_one_pth_of_the_rows_and_bytes(tmp_path):
    corpus = data_path.write_synthetic_corpus(str(tmp_path / "rows"), 96, 128, shards=3)
    one = data_path.loader_rows_per_second(corpus, 1, 16, 0.2, 128)
    four = data_path.loader_rows_per_second(corpus, 4, 16, 0.2, 128)
    assert (one["rows_per_step"], four["rows_per_step"]) == (16, 4)
    assert four["bytes_per_step"] * 4 == one["bytes_per_step"] > 0
    assert one["rows_per_second"] > 0 and four["rows_per_second"] > 0


def test_prepare_rates_compare_one_and_two_workers_on_the_same_text(tmp_path):
    (row,) = data_path.prepare_rates(str(tmp_path), [0.3], vocab=300, seq_len=128, shard_mb=0.05)
    assert row["bare_encode_tokens_per_second"] > 0 and row["prepare_shard_tokens_per_second"] > 0
    one, two = row["workers_1"], row["workers_2"]
    assert one["tokens"] == two["tokens"] > 0 and one["shards"] == two["shards"] >= 6
    assert one["peak_rss_mb"] > 20 and two["peak_rss_mb"] > two["peak_rss_mb_largest_process"] > 20


def test_run_sampled_sees_the_peak_of_a_process_tree(tmp_path):
    """A child that holds 200 MB for a moment, started by a parent holding little: the sampled
    peak of the tree includes the child (a child's ru_maxrss would start at its parent's RSS)."""
    child = "import time; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1)"
    code = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)\n"
    env = {**os.environ}
    res, total, largest = data_path.run_sampled([sys.executable, "-c", code], env)
    assert res.returncode == 0, res.stderr
    assert largest >= 200 and total >= largest
