"""pretrain.py end to end on the demo data with a tiny model: learning, exact resume, DDP, compile, errors."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MODEL, read_log, run
from shards import TokenShards
from tokenizer import Tokenizer


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_log(out_dir) if "loss" in r}


def val_losses(out_dir):
    return {r["iter"]: r["val_loss"] for r in read_log(out_dir) if "val_loss" in r}


def test_a_tiny_run_lowers_the_val_loss_and_writes_a_loadable_checkpoint(demo_data, tmp_path):
    out = tmp_path / "out"
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL, "--max_iters=40", "--eval_interval=20")
    val = val_losses(out)
    assert sorted(val) == [0, 20, 40] and val[40] < val[20] < val[0] - 0.3
    assert "tokens per iteration: 4 batch x 32 context x 1 accumulation x 1 processes = 128" in p.out
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # no pickled code needed to read it
    assert ckpt["iter_num"] == 40 and ckpt["model_args"]["dim"] == 32 and ckpt["tokenizer_sha"]
    assert not os.path.exists(out / "ckpt.pt.tmp")


RECIPE = ["--lr_schedule=warmdown", "--min_lr=0", "--embedding_lr_scale=2", "--muon_momentum_warmup=8",
          "--zero_init_projections=True", "--document_rows=True"]


@pytest.mark.parametrize("muon, recipe", [(True, []), (False, []), (True, RECIPE)])
def test_resume_continues_exactly_like_an_uninterrupted_run(demo_data, tmp_path, muon, recipe):
    common = [f"--data_dir={demo_data}", *TINY_MODEL, "--eval_interval=6", "--lr_decay_iters=12", "--dropout=0.1",
              *recipe]  # the recipe's schedules and document rows are functions of the iteration: they resume too
    run("pretrain.py", f"--out_dir={tmp_path / 'straight'}", *common, "--max_iters=12", f"--muon={muon}")
    run("pretrain.py", f"--out_dir={tmp_path / 'resumed'}", *common, "--max_iters=6", f"--muon={muon}")
    # no --muon when resuming: the run keeps the optimizer its checkpoint was made with
    p = run("pretrain.py", f"--out_dir={tmp_path / 'resumed'}", *common, "--max_iters=12", "--init_from=resume")
    assert ("optimizer Muon" in p.out) == muon
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 13))
    for it in range(7, 13):  # dropout included: the RNG state travels in the checkpoint
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5, abs=1e-6), it


def test_document_rows_start_at_a_document_and_the_recipe_trains(demo_data, tmp_path):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    shards = TokenShards(demo_data, "train", tok.sha)
    starts = shards.document_starts(tok.bos_id, 32)
    windows = shards.batch(np.random.default_rng(0), 64, 32, starts)
    assert windows.shape == (64, 33) and (windows[:, 0] == tok.bos_id).all()
    assert (shards.batch(np.random.default_rng(0), 64, 32)[:, 0] != tok.bos_id).any()  # else anywhere
    out = tmp_path / "out"
    run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL, *RECIPE, "--max_iters=40",
        "--eval_interval=20")
    val = val_losses(out)
    assert val[40] < val[20] < val[0] and val[40] < val[0] - 0.5
    lrs = {r["iter"]: r["lr"] for r in read_log(out) if "lr" in r}
    assert lrs[10] == lrs[20] == 1e-2 and lrs[40] < lrs[30] < lrs[20]  # the peak held, then the warmdown


def test_two_processes_match_one_process_with_twice_the_accumulation(demo_data, tmp_path):
    common = [f"--data_dir={demo_data}", *TINY_MODEL, "--max_iters=10", "--eval_interval=5", "--device=cpu",
              "--dtype=float32"]  # bf16 autocast (a CPU with bf16 instructions) rounds by thread count
    run("pretrain.py", f"--out_dir={tmp_path / 'one'}", *common, "--gradient_accumulation_steps=2")
    p = run("pretrain.py", f"--out_dir={tmp_path / 'two'}", *common, "--gradient_accumulation_steps=1",
            launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
            extra_env={"OMP_NUM_THREADS": "1"})
    assert "x 1 accumulation x 2 processes = 256" in p.out
    one, two = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [0, 5, 10]
    assert one[10] < one[5] < one[0]  # it did train
    for it in one:  # the same weights after each step: DDP averaged the gradients
        assert two[it] == pytest.approx(one[it], abs=1e-4), it


def test_a_two_node_job_matches_one_process_with_twice_the_accumulation(demo_data, tmp_path):
    # two torchrun launches, as on two machines (here both on localhost): node 0 hosts the rendezvous
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [f"--data_dir={demo_data}", *TINY_MODEL, "--max_iters=10", "--eval_interval=5", "--device=cpu",
              "--dtype=float32"]  # bf16 autocast (a CPU with bf16 instructions) rounds by thread count
    run("pretrain.py", f"--out_dir={tmp_path / 'one'}", *common, "--gradient_accumulation_steps=2")
    nodes = []
    for node_rank in (0, 1):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
                    "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
        cmd = launcher + [os.path.join(ROOT, "pretrain.py"), f"--out_dir={tmp_path / 'two'}", *common]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "x 1 accumulation x 2 processes" in outputs[0]
    one, two = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [0, 5, 10]
    for it in one:
        assert two[it] == pytest.approx(one[it], abs=1e-4), it


def test_the_compiled_model_trains_like_the_eager_one(demo_data, tmp_path):
    common = [f"--data_dir={demo_data}", *TINY_MODEL, "--max_iters=10", "--eval_interval=5"]
    run("pretrain.py", f"--out_dir={tmp_path / 'eager'}", *common, "--compile=False")
    p = run("pretrain.py", f"--out_dir={tmp_path / 'compiled'}", *common, "--compile=True")
    assert "compile True" in p.out
    eager, compiled = val_losses(tmp_path / "eager"), val_losses(tmp_path / "compiled")
    assert sorted(compiled) == [0, 5, 10] and compiled[10] < compiled[5] < compiled[0]
    for it in eager:  # the same steps from the same batches: only float rounding differs
        assert compiled[it] == pytest.approx(eager[it], abs=1e-3), it


def test_missing_data_says_how_to_make_it(tmp_path):
    p = run("pretrain.py", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", check=False)
    assert p.returncode != 0 and "prepare_data.py" in p.out and "Traceback" not in p.out


def test_a_block_size_larger_than_the_data_is_a_clear_error(demo_data, tmp_path):
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path}", "--block_size=10000000", check=False)
    assert p.returncode != 0 and "does not fit the data" in p.out and "Traceback" not in p.out


def test_resuming_with_another_tokenizer_is_refused(demo_data, tmp_path):
    run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path / 'out'}", *TINY_MODEL, "--max_iters=2",
        "--eval_interval=2")
    corpus = tmp_path / "other.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"another corpus, document {i} of many"}) + "\n" for i in range(300)))
    run("prepare_data.py", f"--input={corpus}", "--sft_input=", "--vocab_size=350", f"--data_dir={tmp_path / 'other'}")
    p = run("pretrain.py", f"--data_dir={tmp_path / 'other'}", f"--out_dir={tmp_path / 'out'}", "--init_from=resume",
            "--block_size=8", check=False)
    assert p.returncode != 0 and "tokenizer" in p.out and "Traceback" not in p.out
