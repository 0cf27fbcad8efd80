"""
The 7B recipe's memory claims, held at CPU scale with a model of a few hundred MB: what the end of a run
costs on top of its training (docs/memory.md scales these by the formula).
"""
import shutil
import sys

import pytest
import torch

from checkpoint import save_checkpoint
from conftest import run
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

# a fresh process that runs a script and then prints its own peak RSS, whatever way the script ends
PEAK_RSS = ("import atexit, resource, runpy, sys; "
            "atexit.register(lambda: print('peak_rss_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def peak_rss_mb(script, *args):
    p = run(script, *args, launcher=[sys.executable, "-c", PEAK_RSS])
    return int(p.out.rsplit("peak_rss_mb", 1)[1].split()[0]), p.out


@pytest.fixture(scope="module")
def base_250mb(demo_data, tmp_path_factory):
    """A random 62M-parameter Llama (250 MB in fp32) with the demo tokenizer: big enough for RSS to show a copy."""
    out = tmp_path_factory.mktemp("base_250mb")
    tok = Tokenizer(f"{demo_data}/tokenizer.model")
    args = ModelArgs(dim=768, n_layers=8, n_heads=12, vocab_size=tok.n_words, max_seq_len=128)
    torch.manual_seed(0)
    save_checkpoint(str(out / "ckpt.pt"), {"model": Transformer(args).state_dict(), "model_args": vars(args),
                                           "stage": "pretrain", "tokenizer_sha": tok.sha, "config": {}})
    shutil.copy(tok.model_path, out / "tokenizer.model")
    return str(out)


@pytest.mark.parametrize("tuning", [[], ["--lora_rank=4"]], ids=["full", "lora"])
def test_the_evaluation_after_training_adds_no_model_copy_to_the_peak(demo_data, base_250mb, tmp_path, tuning):
    args = [f"--data_dir={demo_data}", f"--init_from={base_250mb}", "--max_iters=2", "--eval_interval=2",
            "--eval_iters=1", "--batch_size=1", "--block_size=64", "--eval_per_task=1", *tuning]
    without, _ = peak_rss_mb("sft.py", f"--out_dir={tmp_path / 'a'}", *args, "--evaluate_tasks=False")
    with_eval, out = peak_rss_mb("sft.py", f"--out_dir={tmp_path / 'b'}", *args)
    assert "held-out task evaluation" in out and (tmp_path / "b" / "eval.json").exists()
    # the model alone is 250 MB: loading the merged checkpoint and the base beside the training state (as
    # the evaluation once did) added two of them; the evaluation's own data (questions, the idiom list) less
    # than half of one
    assert with_eval - without < 125, (without, with_eval)
