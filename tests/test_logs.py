"""metrics.jsonl and TensorBoard events across a resume (mlm_vs_clm/logs.py)."""

import glob
import json
import os
import struct
import time

from mlm_vs_clm.logs import MetricsWriter


def _tb_events(workdir):
    """(file, step, kind, value) of every event in DIR/tb, files in creation order."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.*")), key=os.path.getmtime):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("summary"):
                out += [(path, event.step, "scalar", v.simple_value) for v in event.summary.value]
            elif event.HasField("session_log"):
                out.append((path, event.step, "session_log", event.session_log.status))
    return out


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_rewrites_metrics_and_purges_tensorboard_past_the_restored_step(tmp_path):
    workdir = str(tmp_path)
    w = MetricsWriter(workdir, 0, 10, progress=False)
    for step in range(1, 11):
        w.write({"step": step, "loss": float(step)})
    w.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 11, "lo')  # a write cut short by a crash

    time.sleep(1.1)  # event files are named by the second they were opened in
    w = MetricsWriter(workdir, 5, 10, progress=False)  # resumed from the checkpoint of step 5
    for step in range(6, 11):
        w.write({"step": step, "loss": 100.0 + step})
    w.close()

    assert [(r["step"], r["loss"]) for r in _records(workdir)] == [(s, float(s)) for s in range(1, 6)] + [
        (s, 100.0 + s) for s in range(6, 11)]
    events = _tb_events(workdir)
    files = sorted({e[0] for e in events}, key=os.path.getmtime)
    assert len(files) == 2
    # the second file opens by telling TensorBoard to drop steps >= 6 of the first (SessionLog START)
    first_of_second = [e for e in events if e[0] == files[1]][0]
    assert first_of_second[1:] == (6, "session_log", 1)
    scalars = [(s, v) for f, s, k, v in events if f == files[1] and k == "scalar"]
    assert scalars == [(s, 100.0 + s) for s in range(6, 11)]
