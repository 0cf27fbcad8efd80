"""
Experiment tracking (tracking.py): what log.jsonl holds reaches TensorBoard and Weights & Biases (offline, read
back from the files each writes), a resumed run goes on in the same tracked run, and a tracker that fails or is
not installed never costs a user their training.
"""
import glob
import json
import struct

import pytest

from conftest import TINY_MODEL, read_log, run
from training import Logger

tensorboard = pytest.importorskip("tensorboard", reason="tensorboard is the TensorBoard oracle (pip install it)")
wandb = pytest.importorskip("wandb", reason="wandb is the Weights & Biases oracle (pip install it)")
OFFLINE = {"WANDB_SILENT": "true"}  # and no API key: offline, as on a machine without a login


def tensorboard_scalars(out_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    values = {}
    for path in sorted(glob.glob(f"{out_dir}/tensorboard/events.*")):
        events = EventAccumulator(path)
        events.Reload()
        values.update({e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {})
    return values


def wandb_history(run_file):
    """The history rows of an offline wandb run file: a log of 32 KiB blocks of (crc, length, kind) records,
    each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2
    data, pos, pending, rows = open(run_file, "rb").read(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length, kind) == (0, 0):
            pos += left  # the rest of a block is padding
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_tensorboard_and_offline_wandb_get_the_logged_losses_and_a_resumed_run_goes_on_in_them(demo_data, tmp_path):
    out = tmp_path / "out"
    common = [f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL, "--eval_interval=3",
              "--log_to=tensorboard,wandb"]
    run("pretrain.py", *common, "--max_iters=3", extra_env=OFFLINE)
    run("pretrain.py", *common, "--max_iters=6", "--init_from=resume", extra_env=OFFLINE)
    losses = {r["iter"]: r["loss"] for r in read_log(out) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert tensorboard_scalars(out, "loss") == pytest.approx(losses, rel=1e-6)  # one folder, both sessions
    assert set(tensorboard_scalars(out, "val_loss")) == {0, 3, 6}
    run_files = sorted(glob.glob(f"{out}/wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and len({f.rsplit("-", 1)[1] for f in run_files}) == 1  # the same run id twice
    logged = {row["_step"]: row["loss"] for f in run_files for row in wandb_history(f) if "loss" in row}
    assert logged == pytest.approx(losses, rel=1e-6)


def test_a_tracker_that_fails_warns_once_and_the_log_goes_on(tmp_path, capsys):
    calls = []

    def broken(step, record):
        raise OSError(28, "No space left on device")

    logger = Logger(str(tmp_path), max_iters=3, resume=False)
    logger.trackers[:] = [("broken", broken, lambda: None), ("kept", lambda s, r: calls.append(s), lambda: None)]
    for it in range(3):
        logger.log({"iter": it, "loss": 1.0})
    assert capsys.readouterr().err.count("--log_to=broken failed") == 1
    assert calls == [0, 1, 2] and len(read_log(tmp_path)) == 3


def test_a_tracker_that_is_not_installed_is_one_line_before_training(demo_data, tmp_path):
    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path / 'out'}", *TINY_MODEL, "--max_iters=2",
            "--log_to=wandb", check=False, extra_env={"PYTHONPATH": str(tmp_path / "site")})
    assert p.returncode == 1 and "Traceback" not in p.out and "pip install wandb" in p.out
    assert "iter 1:" not in p.out
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path / 'out2'}", *TINY_MODEL,
            "--max_iters=2", "--log_to=mlflow", check=False)
    assert p.returncode == 1 and "Traceback" not in p.out and "'mlflow' is not one of wandb, tensorboard" in p.out
