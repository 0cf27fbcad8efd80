"""sft.py, dpo.py and pretrain.py --fsdp=True: 2 sharded processes (FSDP2 over gloo) train like 1 process with
twice the accumulation, save a plain merged checkpoint, and resume exactly."""
import sys

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import TINY_MODEL, read_log, run
from model import ModelArgs, Transformer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def common(demo_data, tiny_ckpt, *extra):
    return [f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", "--batch_size=2", "--eval_iters=2",
            "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2", "--evaluate_tasks=False",
            "--eval_interval=3", "--device=cpu", "--dtype=float32", *extra]  # float32: exact whatever the threads


@pytest.mark.parametrize("tuning", [[], ["--lora_rank=4", "--base_dtype=int8", "--checkpoint_activations=True"]],
                         ids=["full", "lora-int8-checkpointing"])
def test_two_sharded_processes_train_like_one_process_with_twice_the_accumulation(demo_data, tiny_ckpt, tmp_path,
                                                                                   tuning):
    args = common(demo_data, tiny_ckpt, "--max_iters=6", *tuning)
    run("sft.py", f"--out_dir={tmp_path / 'one'}", *args, "--gradient_accumulation_steps=2")
    p = run("sft.py", f"--out_dir={tmp_path / 'two'}", *args, "--gradient_accumulation_steps=1", "--fsdp=True",
            launcher=TORCHRUN, extra_env=ONE_THREAD)
    assert "2 processes (FSDP)" in p.out
    assert_same_val_losses(tmp_path / "one", tmp_path / "two")
    if tuning:  # a LoRA run gathers and saves what it trained, not the frozen base
        saved = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
        assert saved["model"] is None and all(k.endswith(("lora_a", "lora_b")) for k in saved["lora"])
    # loading gives a plain Transformer's weights (a LoRA run's merged into its base), for sample.py and export.py
    one_ckpt, two_ckpt = (load_checkpoint(str(tmp_path / d)) for d in ("one", "two"))
    assert two_ckpt["model"].keys() == one_ckpt["model"].keys() == tiny_model_keys(one_ckpt)
    for k in one_ckpt["model"]:
        torch.testing.assert_close(two_ckpt["model"][k], one_ckpt["model"][k], atol=1e-4, rtol=1e-3)


def assert_same_val_losses(one_dir, two_dir, learned=True):
    """Both runs evaluated at iterations 0, 3 and 6, learned (or at least moved), and agree to 1e-4 at each."""
    one = {r["iter"]: r["val_loss"] for r in read_log(one_dir) if "val_loss" in r}
    two = {r["iter"]: r["val_loss"] for r in read_log(two_dir) if "val_loss" in r}
    assert sorted(one) == sorted(two) == [0, 3, 6] and (one[6] < one[0] if learned else abs(one[6] - one[0]) > 1e-3)
    for it in one:
        assert two[it] == pytest.approx(one[it], abs=1e-4), it


def tiny_model_keys(ckpt):
    return Transformer(ModelArgs(**ckpt["model_args"])).state_dict().keys()


def test_a_sharded_run_resumes_exactly(demo_data, tiny_ckpt, tmp_path):
    args = common(demo_data, tiny_ckpt, "--lora_rank=4", "--fsdp=True", "--lr_decay_iters=6")
    run("sft.py", f"--out_dir={tmp_path / 'straight'}", *args, "--max_iters=6", launcher=TORCHRUN,
        extra_env=ONE_THREAD)
    run("sft.py", f"--out_dir={tmp_path / 'resumed'}", *args, "--max_iters=3", launcher=TORCHRUN, extra_env=ONE_THREAD)
    run("sft.py", f"--out_dir={tmp_path / 'resumed'}", *[a for a in args if not a.startswith("--init_from")],
        "--init_from=resume", "--max_iters=6", launcher=TORCHRUN, extra_env=ONE_THREAD)
    straight = {r["iter"]: r["loss"] for r in read_log(tmp_path / "straight") if "loss" in r}
    resumed = {r["iter"]: r["loss"] for r in read_log(tmp_path / "resumed") if "loss" in r}
    for it in range(4, 7):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5, abs=1e-6), it


def test_resuming_a_sharded_checkpoint_unsharded_says_how(demo_data, tiny_ckpt, tmp_path):
    args = common(demo_data, tiny_ckpt, "--lora_rank=4")
    run("sft.py", f"--out_dir={tmp_path}", *args, "--fsdp=True", "--max_iters=3", launcher=TORCHRUN,
        extra_env=ONE_THREAD)
    resume = [f"--out_dir={tmp_path}", *[a for a in args if not a.startswith("--init_from")], "--init_from=resume",
              "--max_iters=6"]
    for fsdp in ([], ["--fsdp=True"]):  # without torchrun, --fsdp=True cannot help: the answer is torchrun
        p = run("sft.py", *resume, *fsdp, check=False)
        assert p.returncode != 0 and "Traceback" not in p.out
        assert "saved by a sharded run" in p.out and "torchrun --nproc_per_node=N" in p.out and "(any N)" in p.out


def test_a_refusal_under_torchrun_is_printed_once(demo_data, tmp_path):
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path / 'x'}", "--fsdp=True", "--device=cpu",
            launcher=TORCHRUN, extra_env=ONE_THREAD, check=False)
    assert p.returncode != 0 and p.out.count("Muon orthogonalizes whole weight matrices") == 1, p.out


def test_a_base_refused_by_rank_0_stops_every_process_in_one_line(demo_data, tmp_path):
    # under FSDP only rank 0 reads the base: the others wait for it, and must stop with its refusal, not a traceback
    p = run("sft.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path / 'x'}", f"--init_from={tmp_path / 'none'}",
            "--fsdp=True", "--lora_rank=4", "--device=cpu", launcher=TORCHRUN, extra_env=ONE_THREAD, check=False)
    assert p.returncode != 0 and p.out.count("error: no checkpoint at") == 1 and "[rank1]" not in p.out, p.out


@pytest.mark.parametrize("tuning", [["--muon=False"], ["--lora_rank=4", "--base_dtype=int8"]], ids=["adamw", "lora"])
def test_sharded_pretraining_matches_one_process_with_twice_the_accumulation(demo_data, tiny_ckpt, tmp_path, tuning):
    args = [f"--data_dir={demo_data}", *TINY_MODEL, "--max_iters=6", "--eval_interval=3", "--device=cpu",
            "--dtype=float32", *tuning]  # exact whatever the threads
    if "--lora_rank=4" in tuning:  # adapters for continued pretraining of an existing model
        args.append(f"--init_from={tiny_ckpt}")
    run("pretrain.py", f"--out_dir={tmp_path / 'one'}", *args, "--gradient_accumulation_steps=2")
    p = run("pretrain.py", f"--out_dir={tmp_path / 'two'}", *args, "--fsdp=True", launcher=TORCHRUN,
            extra_env=ONE_THREAD)
    assert "(FSDP)" in p.out
    assert_same_val_losses(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("reference", ["precomputed", "model"])
def test_sharded_dpo_matches_one_process_with_twice_the_accumulation(demo_data, tiny_sft, tmp_path, reference):
    # with reference=model and adapters, the reference is the sharded model itself with its adapters off
    tuning = ["--lora_rank=4", "--learning_rate=1e-2"] if reference == "model" else ["--learning_rate=3e-3"]
    args = common(demo_data, tiny_sft, "--max_iters=6", "--beta=0.1", f"--reference={reference}", *tuning)
    args.remove("--eval_iters=2")  # dpo.py evaluates on every held-out pair
    run("dpo.py", f"--out_dir={tmp_path / 'one'}", *args, "--gradient_accumulation_steps=2")
    p = run("dpo.py", f"--out_dir={tmp_path / 'two'}", *args, "--fsdp=True", launcher=TORCHRUN, extra_env=ONE_THREAD)
    assert "2 processes (FSDP)" in p.out
    assert_same_val_losses(tmp_path / "one", tmp_path / "two", learned=False)  # (six steps teach DPO little)


def test_muon_under_fsdp_is_refused_in_one_line(demo_data, tmp_path):
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path / 'x'}", "--fsdp=True", check=False)
    assert p.returncode != 0 and "--muon=False" in p.out and "Traceback" not in p.out
    assert not (tmp_path / "x").exists()
