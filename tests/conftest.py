"""What the tests share: running a script as a user would, the demo data and a tiny checkpoint made
once per session, a tiny model, and readers for the files the scripts write."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import ModelArgs, Transformer  # noqa: E402  (after the path insert)


def run(script, *args, check=True, timeout=600, extra_env=None, launcher=None):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess (stdout+stderr in .out)."""
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, script), *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(extra_env or {})
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    p.out = p.stdout + p.stderr
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {p.returncode}:\n{p.out[-4000:]}")
    return p


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The built-in demo corpus prepared once, exactly as `python prepare_data.py` does it."""
    out = tmp_path_factory.mktemp("demo_data")
    run("prepare_data.py", f"--data_dir={out}")
    return str(out)


TINY_MODEL = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--block_size=32", "--batch_size=4",
              "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2",
              "--evaluate_tasks=False"]  # the report card without the benchmark's seconds (test_report.py runs it)


@pytest.fixture(scope="session")
def tiny_ckpt(demo_data, tmp_path_factory):
    """A tiny model pretrained for 30 steps on the demo data (context 64)."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL, "--block_size=64",
        "--max_iters=30", "--eval_interval=30")
    return str(out)


def documents_in(out_dir, split, tok):
    """Decode a split's shards back into documents: each one is framed as [BOS] + tokens."""
    docs = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith(split + "_") and name.endswith(".bin"):
            tokens = np.fromfile(os.path.join(out_dir, name), dtype=np.uint16).tolist()
            starts = [i for i, t in enumerate(tokens) if t == tok.bos_id] + [len(tokens)]
            assert not tokens or starts[0] == 0
            docs += [tok.decode(tokens[a + 1:b]) for a, b in zip(starts, starts[1:])]
    return docs


def read_log(out_dir):
    """The records of out_dir/log.jsonl."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def tiny(**kw):
    """A small random Transformer in eval mode (seeded, so two calls with the same kw build the same model)."""
    torch.manual_seed(0)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=48)
    args.update(kw)
    return Transformer(ModelArgs(**args)).eval()


def llama2_tokenizer_path():
    """Meta's Llama 2 tokenizer.model from the shared fixtures (never copied into the repo), or a skip."""
    for candidate in (os.environ.get("LLAMA2ZH_FIXTURES", ""), os.path.join(ROOT, "..", "shared", "fixtures")):
        path = os.path.join(candidate, "llama2-tokenizer.model")
        if candidate and os.path.exists(path):
            return path
    pytest.skip("Meta's Llama 2 tokenizer is not here (../shared/fixtures/llama2-tokenizer.model, or set "
                "LLAMA2ZH_FIXTURES); these tests need it")


@pytest.fixture(scope="session")
def extended_data(tmp_path_factory):
    """The demo corpus prepared with Llama 2's tokenizer extended to 40000 pieces: (directory, base, log)."""
    base = llama2_tokenizer_path()
    out = tmp_path_factory.mktemp("extended")
    p = run("prepare_data.py", f"--data_dir={out}", f"--extend_tokenizer={base}", "--vocab_size=40000")
    return str(out), base, p.out


@pytest.fixture(scope="session")
def tiny_sft(demo_data, tiny_ckpt, tmp_path_factory):
    """The tiny model instruction-tuned for 30 steps: an SFT checkpoint for the stages that need one."""
    out = tmp_path_factory.mktemp("tiny_sft")
    # no replayed text: in 30 steps its fully trained rows would outweigh the answers, and the stages that
    # use this model need one that answers (replay itself: test_sft.py)
    run("sft.py", f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--batch_size=4",
        "--eval_iters=2", "--learning_rate=1e-2", "--warmup_iters=2", "--max_iters=30", "--eval_interval=30",
        "--evaluate_tasks=False", "--replay_rows=0")
    return str(out)
