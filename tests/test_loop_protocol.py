"""
pretrain.py, sft.py and dpo.py share one loop protocol (training.Stopper and its neighbours), held here
to the same behaviour: a resumed run continues exactly, whatever its fixed settings are asked to be; Ctrl-C saves at an iteration boundary and leaves
a checkpoint that resumes; a diverging loss stops the run with its message and no checkpoint of its own;
a scratch run never overwrites a finished one; another stage's checkpoint is refused on resume.
"""
import importlib
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL, read_log, run

SMALL_STEPS = ["--batch_size=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2", "--device=cpu"]


def stage_args(stage, demo_data, tiny_ckpt, tiny_sft):
    """What each stage needs to train a few tiny steps on the demo data."""
    if stage == "pretrain.py":
        return [f"--data_dir={demo_data}", *TINY_MODEL, *SMALL_STEPS]
    if stage == "sft.py":
        return [f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", "--eval_iters=2", "--evaluate_tasks=False",
                *SMALL_STEPS]
    if stage == "grpo.py":  # a reward the tiny model's answers spread over, so that every step has a signal
        questions = os.path.join(ROOT, "tests", "grpo_questions.jsonl")
        return [f"--data_dir={demo_data}", f"--init_from={tiny_sft}", f"--questions={questions}",
                f"--test_questions={questions}", "--group_size=4", "--max_new_tokens=6", "--eval_per_task=4",
                "--verifier=tests.grpo_checks:shorter", "--evaluate_tasks=False", *SMALL_STEPS]
    return [f"--data_dir={demo_data}", f"--init_from={tiny_sft}", "--beta=0.1", "--evaluate_tasks=False",
            *SMALL_STEPS]


def without_init(args):
    return [a for a in args if not a.startswith("--init_from")]


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_log(out_dir) if "loss" in r}


STAGES = ["pretrain.py", "sft.py", "dpo.py", "grpo.py"]


# settings fixed on resume, asked for otherwise when resuming: the run must go on as it started
CHANGED_ON_RESUME = {"pretrain.py": ["--dim=48", "--n_layers=3", "--block_size=16"],
                     "sft.py": ["--block_size=48", "--dropout=0.2"], "dpo.py": ["--beta=0.5", "--loss_type=ipo"],
                     "grpo.py": ["--questions=", "--test_questions=", "--verifier=", "--tasks=sentiment",
                                 "--group_size=3", "--max_new_tokens=3"]}


def with_fixed_settings_changed(stage, args):
    """args without the settings a resumed run takes from its checkpoint, and other values for some of them."""
    fixed = importlib.import_module(stage[:-3]).FIXED_ON_RESUME
    return [a for a in without_init(args) if a[2:].split("=")[0] not in fixed] + CHANGED_ON_RESUME[stage]


@pytest.mark.parametrize("stage", STAGES)
def test_resume_continues_exactly_and_a_scratch_run_never_overwrites_it(stage, demo_data, tiny_ckpt, tiny_sft,
                                                                        tmp_path):
    args = stage_args(stage, demo_data, tiny_ckpt, tiny_sft) + ["--eval_interval=3", "--lr_decay_iters=6"]
    run(stage, f"--out_dir={tmp_path / 'straight'}", *args, "--max_iters=6")
    run(stage, f"--out_dir={tmp_path / 'resumed'}", *args, "--max_iters=3")
    p = run(stage, f"--out_dir={tmp_path / 'resumed'}", *with_fixed_settings_changed(stage, args),
            "--init_from=resume", "--max_iters=6")
    assert "resuming at iteration 3" in p.out and p.out.count(" is ignored: the run being resumed has ") >= 2
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    for it in range(4, 7):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5, abs=1e-6), it

    finished = (tmp_path / "resumed" / "ckpt.pt").read_bytes()
    p = run(stage, f"--out_dir={tmp_path / 'resumed'}", *args, "--max_iters=6", check=False)
    assert p.returncode == 1 and "already holds a run" in p.out and "Traceback" not in p.out
    assert (tmp_path / "resumed" / "ckpt.pt").read_bytes() == finished


@pytest.mark.parametrize("stage", STAGES)
def test_ctrl_c_saves_at_an_iteration_boundary_and_the_checkpoint_resumes(stage, demo_data, tiny_ckpt, tiny_sft,
                                                                          tmp_path):
    args = stage_args(stage, demo_data, tiny_ckpt, tiny_sft) + ["--eval_interval=1000"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, stage), f"--out_dir={tmp_path}", *args,
                             "--max_iters=1000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    try:
        for line in proc.stdout:  # wait until it trains
            if line.startswith("iter 2:"):
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in rest, rest
    saved = int(rest.split("interrupted: saved")[1].split("at iteration ")[1].split(";")[0])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == saved >= 2
    p = run(stage, f"--out_dir={tmp_path}", *without_init(args), "--init_from=resume", f"--max_iters={saved + 2}")
    assert f"resuming at iteration {saved}" in p.out and "done:" in p.out


@pytest.mark.parametrize("stage", STAGES)
def test_a_diverging_loss_stops_the_run_with_its_message(stage, demo_data, tiny_ckpt, tiny_sft, tmp_path):
    args = stage_args(stage, demo_data, tiny_ckpt, tiny_sft)
    p = run(stage, f"--out_dir={tmp_path}", *args, "--learning_rate=1e12", "--warmup_iters=0", "--max_iters=40",
            "--eval_interval=1000", "--grad_clip=0", check=False)
    assert p.returncode == 1 and "Traceback" not in p.out
    assert "training diverged" in p.out and "This run saved no checkpoint" in p.out, p.out[-2000:]
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("stage, other", [("sft.py", "pretrain"), ("dpo.py", "sft"), ("pretrain.py", "sft"),
                                          ("grpo.py", "sft")])
def test_resuming_another_stages_checkpoint_is_refused_in_one_line(stage, other, demo_data, tiny_ckpt, tiny_sft,
                                                                   tmp_path):
    ckpt_dir = tiny_ckpt if other == "pretrain" else tiny_sft
    args = without_init(stage_args(stage, demo_data, tiny_ckpt, tiny_sft))
    p = run(stage, f"--out_dir={ckpt_dir}", *args, "--init_from=resume", check=False)
    assert p.returncode == 1 and "Traceback" not in p.out
    assert f"is a {other} checkpoint, not a" in p.out and "run to resume" in p.out
