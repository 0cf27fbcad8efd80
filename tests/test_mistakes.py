"""
What a new user does by mistake, done the way they would do it (a subprocess with the bad input, a
signal, two runs at once): each ends in a one-line message and an exit code, never a traceback, and
nothing good on disk changes.
"""
import json
import os
import shutil

import numpy as np

from conftest import TINY_MODEL, documents_in, run
from tokenizer import Tokenizer


def snapshot(directory):
    """Every file's bytes: what must not change."""
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))
            if name != "lock"}


def assert_one_line_error(p, *phrases):
    assert p.returncode != 0, p.out
    assert "Traceback" not in p.out, p.out
    for phrase in phrases:
        assert phrase in p.out, (phrase, p.out)


# ---- 1. a scratch run into a finished run

def test_a_scratch_run_into_a_directory_with_a_checkpoint_is_refused(demo_data, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_ckpt, out)
    before = snapshot(out)
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL, "--max_iters=40", check=False)
    assert_one_line_error(p, "already holds a run", "--init_from=resume", "--overwrite=True")
    assert snapshot(out) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_saves_its_first_checkpoint(demo_data, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_ckpt, out)
    before = snapshot(out)
    # a new run that diverges before its first checkpoint: the old checkpoint and its log survive
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL, "--max_iters=40",
            "--overwrite=True", "--learning_rate=1e9", "--eval_interval=20", check=False)
    assert_one_line_error(p, "diverged")
    assert {k: v for k, v in snapshot(out).items() if k != "tokenizer.model"} == \
        {k: v for k, v in before.items() if k != "tokenizer.model"}
    # one that gets to its first checkpoint replaces both
    run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL, "--max_iters=4",
        "--eval_interval=2", "--overwrite=True")
    with open(out / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert max(r["iter"] for r in log) == 4 and log[0]["iter"] == 0


def test_sft_into_its_own_base_directory_is_refused(demo_data, tiny_ckpt, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_ckpt, base)
    before = snapshot(base)
    p = run("sft.py", f"--data_dir={demo_data}", f"--init_from={base}", f"--out_dir={base}", check=False)
    assert_one_line_error(p, "would overwrite the model it starts from")
    assert snapshot(base) == before


# ---- 2. Chinese text in GBK / GB18030

POEMS = [f"第{i}首：床前明月光，疑是地上霜。举头望明月，低头思故乡。" for i in range(200)]


def test_a_gbk_corpus_is_decoded_as_gb18030_and_said_so(demo_data, tmp_path):
    path = tmp_path / "poems.txt"
    path.write_bytes("\n\n".join(POEMS).encode("gbk"))
    out = tmp_path / "out"
    p = run("prepare_data.py", f"--input={path}", "--sft_input=", f"--tokenizer_model={demo_data}/tokenizer.model",
            f"--out_dir={out}", "--val_fraction=0")
    assert "(decoded as GB18030): 200 kept" in p.out
    assert documents_in(out, "train", Tokenizer(str(out / "tokenizer.model"))) == POEMS


def test_a_gbk_jsonl_file_is_decoded_too(demo_data, tmp_path):
    path = tmp_path / "poems.jsonl"
    path.write_bytes("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in POEMS).encode("gb18030"))
    p = run("prepare_data.py", f"--input={path}", "--sft_input=", f"--tokenizer_model={demo_data}/tokenizer.model",
            f"--out_dir={tmp_path / 'out'}", "--val_fraction=0")
    assert "(decoded as GB18030): 200 kept" in p.out


def test_a_file_in_neither_encoding_is_refused_and_earlier_outputs_stay(demo_data, tmp_path):
    out = tmp_path / "out"
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in POEMS), encoding="utf-8")
    run("prepare_data.py", f"--input={good}", "--sft_input=", f"--tokenizer_model={demo_data}/tokenizer.model",
        f"--out_dir={out}")
    before = snapshot(out)
    big5 = tmp_path / "big5.txt"
    big5.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8)))  # not text at all
    p = run("prepare_data.py", f"--input={good},{big5}", "--sft_input=", f"--tokenizer_model={demo_data}/tokenizer.model",
            f"--out_dir={out}", check=False)
    assert_one_line_error(p, f"{big5} is not UTF-8", "convert it to UTF-8")
    assert snapshot(out) == before and not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_a_file_that_turns_into_another_encoding_later_is_an_error_not_a_success(demo_data, tmp_path):
    path = tmp_path / "mixed.txt"
    head = "\n\n".join(POEMS * 60).encode("utf-8")  # over a megabyte of clean UTF-8 fools the first look...
    path.write_bytes(head + b"\n\n" + "\n\n".join(POEMS * 30).encode("gbk"))  # ...then a GBK half
    p = run("prepare_data.py", f"--input={path}", "--sft_input=", f"--tokenizer_model={demo_data}/tokenizer.model",
            f"--out_dir={tmp_path / 'out'}", check=False)
    assert_one_line_error(p, "mixed.txt", "U+FFFD", "convert the file to UTF-8")


def test_sample_reads_a_gbk_prompt_file(tiny_ckpt, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes("床前明月光，".encode("gbk"))
    p = run("sample.py", f"--out_dir={tiny_ckpt}", f"--start=FILE:{path}", "--max_new_tokens=3", "--temperature=0")
    assert p.stdout.startswith("床前明月光，") and "GB18030" in p.stderr
