"""--log-to (issue 24 item 7): every variant's perplexity and every step's timing reach the
trackers, read back here with TensorBoard's own reader and from W&B's offline run files."""
import json
import struct
from pathlib import Path

import llm_main_v4 as M
from conftest import tiny_argv


def wandb_history(path: Path) -> dict:
    """The last value of every key a W&B offline run logged, read from its run-*.wandb file: the
    LevelDB log format (a 7-byte W&B header, 32 KiB blocks of records, each with a 7-byte
    checksum/length/type header; types FULL=1 and LAST=4 end a record) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf, hist = path.read_bytes(), 7, 32768, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                hist.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return hist


def test_tensorboard_and_wandb_receive_every_variants_perplexity(tiny_run_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval", "--prune-method", "magnitude,wanda",
                            "--log-to", "tensorboard,wandb")) == 0
    res = json.loads((out / "results.json").read_text())
    events = EventAccumulator(str(out / "tensorboard" / out.name)).Reload()
    tags = set(events.Tags()["scalars"])
    for variant, ppl in res["perplexity"].items():
        (point,) = events.Scalars(f"perplexity/{variant}")
        assert abs(point.value - ppl) <= 1e-4 * ppl
    assert {"step/prune/wall_s", "step/eval/wall_s", "sparsity/pruned[wanda,0.5,unstructured]"} <= tags
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged = wandb_history(run_file)
    assert {f"perplexity/{v}" for v in res["perplexity"]} <= set(logged)
    assert abs(logged["perplexity/base"] - res["perplexity"]["base"]) <= 1e-4 * res["perplexity"]["base"]


def test_an_unknown_tracker_is_one_error_line(tiny_run_dir, tmp_path, capsys):
    assert M.main(tiny_argv(tiny_run_dir, tmp_path / "o", "--log-to", "tensorboard,neptune")) == 2
    assert "--log-to must be none, or a comma list from tensorboard,wandb,mlflow" in capsys.readouterr().err
