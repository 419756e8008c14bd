"""--log-to (issue 24 item 7): every variant's perplexity and every step's timing reach the
trackers, read back here with TensorBoard's own reader and from W&B's offline run files."""
import json
import struct
from pathlib import Path

import pytest

import llm_main_v4 as M
from llm_tracking import mlflow_key
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


def test_mlflow_receives_every_variants_perplexity_in_the_run_folder(tiny_run_dir, tmp_path, monkeypatch):
    """MLflow's store is the run's own folder (not the working directory), and a grid's variant
    names reach it in MLflow's metric alphabet; the fine-tune's curve goes to the same store."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "finetune,prune,eval", "--ft-steps", "2",
                            "--prune-method", "magnitude,wanda", "--log-to", "mlflow")) == 0
    res = json.loads((out / "results.json").read_text())
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    runs = {e.name: client.search_runs([e.experiment_id]) for e in client.search_experiments()}
    (pipeline,) = runs["llm-sensitivity"]
    logged = pipeline.data.metrics
    for variant, ppl in res["perplexity"].items():
        assert abs(logged[mlflow_key(f"perplexity/{variant}")] - ppl) <= 1e-4 * ppl
    assert "perplexity/pruned:wanda:0.5:unstructured" in logged and "step/prune/wall_s" in logged
    assert pipeline.data.params["prune/method"] == "magnitude,wanda"
    (finetune,) = runs["finetune"]
    curve = client.get_metric_history(finetune.info.run_id, "train/loss")
    assert len(curve) == 2
    assert [p.value for p in curve] == pytest.approx(res["finetune"]["train_losses"], rel=1e-6)


# ------------------------------------------------- issue 33: trackers that fail, and reruns that skip every step


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "http://localhost:{port}/", "https://127.0.0.1:{port}"])
def test_a_dead_mlflow_server_is_a_warning_and_the_run_goes_on(tiny_run_dir, tmp_path, monkeypatch, caplog, uri):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(port=_closed_port()))
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "eval", "--log-to", "mlflow,tensorboard")) == 0
    assert "does not answer; not logging to MLflow" in caplog.text
    assert json.loads((out / "results.json").read_text())["perplexity"]["base"] > 0
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))  # the other tracker still logs


@pytest.mark.parametrize("base", ["http://127.0.0.1:{port}", "http://localhost:{port}"])
def test_a_dead_wandb_server_logs_offline(tiny_run_dir, tmp_path, monkeypatch, caplog, base):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_BASE_URL", base.format(port=_closed_port()))
    monkeypatch.setenv("WANDB_MODE", "online")  # asked for online: still no CommError
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "eval", "--log-to", "wandb")) == 0
    assert "does not answer; logging offline" in caplog.text
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_tracker_that_fails_mid_run_is_a_warning(tiny_run_dir, tmp_path, monkeypatch, caplog):
    from accelerate import tracking

    def broken(self, *a, **k):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(tracking.TensorBoardTracker, "log", broken)
    out = tmp_path / "out"
    assert M.main(tiny_argv(tiny_run_dir, out, "--steps", "prune,eval", "--log-to", "tensorboard")) == 0
    assert "--log-to tensorboard failed (ConnectionError: connection reset by peer)" in caplog.text
    assert "perplexity" in json.loads((out / "results.json").read_text())


def test_a_rerun_that_skips_every_step_logs_nothing_again(tiny_run_dir, tmp_path):
    out = tmp_path / "out"
    argv = tiny_argv(tiny_run_dir, out, "--steps", "prune,eval", "--log-to", "tensorboard")
    assert M.main(argv) == 0
    first = sorted((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert M.main(argv) == 0
    assert sorted((out / "tensorboard").rglob("events.out.tfevents.*")) == first
    assert M.main(argv[:-1] + ["tensorboard", "--kl"]) == 0  # eval reruns: its numbers are logged once more
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) > len(first)
