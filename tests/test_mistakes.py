"""
What a new user does by mistake, done the way they would do it (a subprocess with the bad input, a
signal, two runs at once): each ends in a one-line message and an exit code, never a traceback, and
nothing good on disk changes.
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from checkpoint import load_checkpoint
from conftest import ROOT, TINY_MODEL, documents_in, run
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
            f"--data_dir={out}", "--val_fraction=0")
    assert "(decoded as GB18030): 200 kept" in p.out
    assert documents_in(out, "train", Tokenizer(str(out / "tokenizer.model"))) == POEMS


def test_a_gbk_jsonl_file_is_decoded_too(demo_data, tmp_path):
    path = tmp_path / "poems.jsonl"
    path.write_bytes("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in POEMS).encode("gb18030"))
    p = run("prepare_data.py", f"--input={path}", "--sft_input=", f"--tokenizer_model={demo_data}/tokenizer.model",
            f"--data_dir={tmp_path / 'out'}", "--val_fraction=0")
    assert "(decoded as GB18030): 200 kept" in p.out


def test_a_file_in_neither_encoding_is_refused_and_earlier_outputs_stay(demo_data, tmp_path):
    out = tmp_path / "out"
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in POEMS), encoding="utf-8")
    run("prepare_data.py", f"--input={good}", "--sft_input=", f"--tokenizer_model={demo_data}/tokenizer.model",
        f"--data_dir={out}")
    before = snapshot(out)
    big5 = tmp_path / "big5.txt"
    big5.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8)))  # not text at all
    p = run("prepare_data.py", f"--input={good},{big5}", "--sft_input=", f"--tokenizer_model={demo_data}/tokenizer.model",
            f"--data_dir={out}", check=False)
    assert_one_line_error(p, f"{big5} is not UTF-8", "convert it to UTF-8")
    assert snapshot(out) == before and not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_a_file_that_turns_into_another_encoding_later_is_an_error_not_a_success(demo_data, tmp_path):
    path = tmp_path / "mixed.txt"
    head = "\n\n".join(POEMS * 60).encode("utf-8")  # over a megabyte of clean UTF-8 fools the first look...
    path.write_bytes(head + b"\n\n" + "\n\n".join(POEMS * 30).encode("gbk"))  # ...then a GBK half
    p = run("prepare_data.py", f"--input={path}", "--sft_input=", f"--tokenizer_model={demo_data}/tokenizer.model",
            f"--data_dir={tmp_path / 'out'}", check=False)
    assert_one_line_error(p, "mixed.txt", "U+FFFD", "convert the file to UTF-8")


def test_sample_reads_a_gbk_prompt_file(tiny_ckpt, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes("床前明月光，".encode("gbk"))
    p = run("sample.py", f"--out_dir={tiny_ckpt}", f"--start=FILE:{path}", "--max_new_tokens=3", "--temperature=0")
    assert p.stdout.startswith("床前明月光，") and "GB18030" in p.stderr


# ---- 3. Ctrl-C during data preparation

def interrupt_after(args, seconds, timeout=60):
    """Start a script in its own process group, Ctrl-C the whole group (as a terminal does) `seconds`
    after it first prints (its imports done: how long they take depends on the machine), and return
    (exit code, output, seconds it took to exit after the signal)."""
    # Ctrl-C's default action restored in the child, as a terminal's foreground job has it: a shell without
    # job control (`bash .ci/run &`) starts its background jobs with SIGINT ignored, and Python keeps that
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2"))
    first = proc.stdout.read(1)
    time.sleep(seconds)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, first + out, time.time() - t0


@pytest.mark.parametrize("seconds", [1.5, 5.0, 8.0])  # training the tokenizer, encoding, the SFT set
def test_ctrl_c_during_data_preparation_exits_promptly_and_leaves_the_last_run_intact(demo_data, tmp_path, seconds):
    out = tmp_path / "data"
    shutil.copytree(demo_data, out)
    before = snapshot(out)
    code, log, took = interrupt_after(["prepare_data.py", f"--data_dir={out}", "--workers=2"], seconds)
    if code == 0:  # this machine finished before the signal: nothing to check
        pytest.skip(f"prepare_data.py finished within {seconds} s")
    assert took < 20 and "interrupted: nothing was written" in log and "Traceback" not in log
    assert snapshot(out) == before and not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ---- 4, 5. settings that do not parse, config files in the wrong syntax

@pytest.mark.parametrize("args, message", [
    (["--dim=abc"], "--dim expects an integer, got 'abc'"),
    (["--lr_decay_iters=abc"], "--lr_decay_iters expects an integer"),
    (["--compile=maybe"], "--compile expects true or false"),
])
def test_settings_that_do_not_parse_stop_before_anything_runs(tmp_path, args, message):
    p = run("pretrain.py", f"--out_dir={tmp_path / 'out'}", *args, check=False)
    assert_one_line_error(p, message)
    assert not (tmp_path / "out").exists()


def test_compile_false_means_off(demo_data, tmp_path):
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path}", *TINY_MODEL, "--max_iters=1",
            "--eval_interval=1", "--compile=false")
    assert "compile False" in p.out


@pytest.mark.parametrize("text, shape", [('{"max_iters": 1}\n', "JSON"), ("max_iters: 1\n", "YAML")])
def test_a_config_file_in_json_or_yaml_is_refused_before_anything_runs(tmp_path, text, shape):
    config = tmp_path / "my_config.py"
    config.write_text(text)
    p = run("pretrain.py", str(config), f"--out_dir={tmp_path / 'out'}", check=False)
    assert_one_line_error(p, "assigns no setting", "YAML/JSON", "max_iters = 1000")
    assert not (tmp_path / "out").exists()


# ---- 7, 8. no usable records; a data directory never mixes two runs

def test_input_with_no_usable_record_is_an_error_and_replaces_nothing(demo_data, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(demo_data, out)
    before = snapshot(out)
    bad_sft = tmp_path / "bad_sft.jsonl"
    bad_sft.write_text('{"question": "no conversation here"}\n{"messages": "nor here"}\n', encoding="utf-8")
    p = run("prepare_data.py", "--input=", f"--sft_input={bad_sft}", f"--data_dir={out}", check=False)
    assert_one_line_error(p, "no usable training conversation", "nothing was written")
    bad_text = tmp_path / "bad.jsonl"
    bad_text.write_text('{"title": "no text"}\nnot json\n', encoding="utf-8")
    p = run("prepare_data.py", f"--input={bad_text}", "--sft_input=", f"--tokenizer_model={out}/tokenizer.model",
            f"--data_dir={out}", check=False)
    assert_one_line_error(p, "no usable document", "nothing was written")
    assert snapshot(out) == before


def test_outputs_of_another_tokenizer_are_removed_when_the_tokenizer_changes(demo_data, tmp_path):
    out = tmp_path / "data"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in POEMS), encoding="utf-8")
    run("prepare_data.py", f"--input={corpus}", "--sft_input=", "--vocab_size=350", f"--data_dir={out}")
    assert (out / "train_000.bin").exists()
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": d, "output": "好"}, ensure_ascii=False) + "\n" for d in POEMS),
                   encoding="utf-8")
    # SFT data alone, with the demo's tokenizer: the pretraining shards of the old one must go
    p = run("prepare_data.py", "--input=", f"--sft_input={sft}", f"--tokenizer_model={demo_data}/tokenizer.model",
            f"--data_dir={out}")
    assert "made with another tokenizer" in p.out
    names = set(os.listdir(out)) - {"lock"}
    assert not any(n.startswith(("train_", "val_")) for n in names)
    sha = Tokenizer(str(out / "tokenizer.model")).sha
    assert all(json.load(open(out / n))["tokenizer_sha"] == sha for n in names if n.endswith(".json"))


# ---- 9, 17. two writers at once; SIGTERM

def start(script, *args):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    lines = []
    for line in proc.stdout:  # wait until it trains
        lines.append(line)
        if line.startswith("iter 2:"):
            break
    return proc, lines


def test_a_second_run_into_a_busy_out_dir_is_refused_and_sigterm_saves_the_first(demo_data, tmp_path):
    out = tmp_path / "out"
    first, lines = start("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL,
                         "--max_iters=100000", "--eval_interval=100000")
    try:
        second = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL, check=False)
        assert_one_line_error(second, f"is in use by another run (pid {first.pid})")
        first.send_signal(signal.SIGTERM)  # Slurm preemption, docker stop
        rest, _ = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0 and "SIGTERM: stopping at the end of this iteration" in rest
    saved = int(rest.split("interrupted: saved")[1].split("at iteration ")[1].split(";")[0])
    ckpt = load_checkpoint(str(out))
    assert ckpt["iter_num"] == saved >= 2
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL, "--init_from=resume",
            f"--max_iters={saved + 2}", "--eval_interval=100000")
    assert f"resuming at iteration {saved}" in p.out


# ---- 10. export paths

@pytest.mark.parametrize("version, name", [("0", "m.bin"), ("2", "q.bin"), ("hf", "hf")])
def test_export_into_a_directory_that_does_not_exist_creates_it(tiny_ckpt, tmp_path, version, name):
    target = tmp_path / "exports" / "nested" / name
    run("export.py", f"--out_dir={tiny_ckpt}", f"--version={version}", f"--output={target}")
    assert target.exists()
    if version == "hf" and (target / "model.safetensors").exists():
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(os.stat(target / "model.safetensors").st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("version", ["0", "2", "gguf", "hf"])
def test_an_export_never_replaces_a_checkpoint_or_a_file_it_did_not_write(tiny_ckpt, tmp_path, version):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_ckpt, run_dir)
    kept = {name: (run_dir / name).read_bytes() for name in ("ckpt.pt", "tokenizer.model", "log.jsonl")}
    for target in ("ckpt.pt", "tokenizer.model", "log.jsonl", "."):
        p = run("export.py", f"--out_dir={run_dir}", f"--version={version}", f"--output={run_dir / target}",
                check=False)
        assert p.returncode == 1 and "Traceback" not in p.out and len(p.out.strip().splitlines()) == 1, p.out
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
    run("sample.py", f"--out_dir={run_dir}", "--max_new_tokens=2")  # the run still loads
    if version != "hf":  # its own export is replaced without a word; another file only when asked to
        target = tmp_path / "exports" / "model"
        run("export.py", f"--out_dir={run_dir}", f"--version={version}", f"--output={target}")
        run("export.py", f"--out_dir={run_dir}", f"--version={version}", f"--output={target}")
        (tmp_path / "notes.txt").write_text("mine")
        p = run("export.py", f"--out_dir={run_dir}", f"--version={version}", f"--output={tmp_path / 'notes.txt'}",
                check=False)
        assert_one_line_error(p, "--overwrite=True")
        run("export.py", f"--out_dir={run_dir}", f"--version={version}", f"--output={tmp_path / 'notes.txt'}",
            "--overwrite=True")


def test_writing_into_a_file_where_a_directory_should_be_is_a_one_line_error(tiny_ckpt, demo_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = run("export.py", f"--out_dir={tiny_ckpt}", f"--output={blocker}/m.bin", check=False)
    assert_one_line_error(p, "cannot create the directory")
    for script, args in (("pretrain.py", [f"--data_dir={demo_data}"]), ("prepare_data.py", []),
                         ("sft.py", [f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}"])):
        p = run(script, *args, f"--out_dir={blocker}", check=False)
        assert_one_line_error(p, "is a file, not a directory")


def test_an_out_dir_that_cannot_be_written_is_a_one_line_error(demo_data, tmp_path):
    target = unwritable_dir(tmp_path) + "/out"
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={target}", check=False)
    assert_one_line_error(p, "cannot write to --out_dir")


# ---- 11. zero and negative values

@pytest.mark.parametrize("script, arg, message", [
    ("pretrain.py", "--eval_interval=0", "--eval_interval must be at least 1"),
    ("pretrain.py", "--log_interval=0", "--log_interval must be at least 1"),
    ("pretrain.py", "--block_size=0", "--block_size must be at least 1"),
    ("pretrain.py", "--eval_iters=0", "--eval_iters must be at least 1"),
    ("pretrain.py", "--learning_rate=-1e-3", "--learning_rate must be greater than 0"),
    ("sft.py", "--batch_size=0", "--batch_size must be at least 1"),
    ("sample.py", "--top_k=-5", "--top_k must be at least 0"),
    ("sample.py", "--repetition_penalty=0", "--repetition_penalty must be greater than 0"),
    ("sample.py", "--temperature=-1", "--temperature must be at least 0"),
    ("sample.py", "--top_p=1.5", "--top_p must be at most 1"),
    ("evaluate.py", "--batch_size=0", "--batch_size must be at least 1"),
])
def test_zero_and_negative_values_are_refused_up_front(tmp_path, script, arg, message):
    p = run(script, f"--out_dir={tmp_path / 'out'}", arg, check=False)
    assert_one_line_error(p, message)


# ---- 12, 14, 16. resuming the wrong thing, hints that name the fix, ignored settings

def test_sft_resume_of_a_pretraining_directory_says_what_to_do(demo_data, tiny_ckpt):
    p = run("sft.py", f"--data_dir={demo_data}", f"--out_dir={tiny_ckpt}", "--init_from=resume", check=False)
    assert_one_line_error(p, "is a pretrain checkpoint, not an SFT run to resume", f"--init_from={tiny_ckpt}")


def test_a_missing_base_names_init_from(demo_data, tmp_path):
    p = run("sft.py", f"--data_dir={demo_data}", f"--init_from={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'o'}",
            check=False)
    assert_one_line_error(p, "point --init_from at a directory")


def test_sampling_with_the_wrong_tokenizer_names_the_tokenizer_setting(tiny_ckpt, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in POEMS), encoding="utf-8")
    run("prepare_data.py", f"--input={corpus}", "--sft_input=", "--vocab_size=350", f"--data_dir={tmp_path / 'd'}")
    p = run("sample.py", f"--out_dir={tiny_ckpt}", f"--tokenizer={tmp_path / 'd' / 'tokenizer.model'}", check=False)
    assert_one_line_error(p, "--tokenizer=")


def test_max_iters_zero_claims_no_checkpoint(demo_data, tmp_path):
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path}", *TINY_MODEL, "--max_iters=0")
    assert "no checkpoint written" in p.out and not (tmp_path / "ckpt.pt").exists()


def test_a_diverged_run_names_only_a_checkpoint_it_wrote(demo_data, tmp_path):
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={tmp_path}", *TINY_MODEL, "--max_iters=50",
            "--learning_rate=1e9", check=False)
    assert_one_line_error(p, "diverged", "This run saved no checkpoint")
    assert "last good checkpoint" not in p.out


def test_resume_warns_about_ignored_settings_and_says_when_there_is_nothing_to_do(demo_data, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_ckpt, out)
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", "--init_from=resume", "--dim=64",
            "--muon=False", "--max_iters=31", "--eval_interval=100")
    assert "warning: --dim=64 is ignored: the run being resumed has dim=32" in p.out
    assert "warning: --muon=False is ignored" in p.out and "optimizer Muon" in p.out
    p = run("pretrain.py", f"--data_dir={demo_data}", f"--out_dir={out}", "--init_from=resume", "--max_iters=3")
    assert "nothing to do" in p.out and "is at iteration 31" in p.out
    assert "warning" not in p.out  # settings left at their defaults are not the user asking for something else


def test_resume_keeps_the_frozen_bases_storage(demo_data, tiny_ckpt, tmp_path):
    # an int8 base resumed without (or against) --base_dtype=int8 would be another model, and on a GPU more memory
    common = [f"--data_dir={demo_data}", "--lora_rank=4", "--batch_size=2", "--eval_iters=1", "--evaluate_tasks=False",
              "--eval_interval=2"]
    run("sft.py", f"--init_from={tiny_ckpt}", f"--out_dir={tmp_path}", *common, "--base_dtype=int8", "--max_iters=2")
    p = run("sft.py", "--init_from=resume", f"--out_dir={tmp_path}", *common, "--base_dtype=float32", "--max_iters=4")
    assert "warning: --base_dtype=float32 is ignored: the run being resumed has base_dtype=int8" in p.out
    assert load_checkpoint(str(tmp_path))["config"]["base_dtype"] == "int8"


# ---- 13. input directories with an empty file, JSON in the wrong shape

def test_an_empty_file_is_skipped_and_mis_saved_json_is_recognised(demo_data, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.jsonl").write_bytes(b"")
    (corpus / "array.jsonl").write_text(json.dumps([{"text": p} for p in POEMS[:3]], ensure_ascii=False),
                                        encoding="utf-8")
    (corpus / "pretty.json").write_text("\n".join(json.dumps({"text": p}, ensure_ascii=False, indent=2)
                                                  for p in POEMS[3:5]), encoding="utf-8")
    p = run("prepare_data.py", f"--input={corpus}", "--sft_input=", f"--tokenizer_model={demo_data}/tokenizer.model",
            f"--data_dir={tmp_path / 'out'}", "--val_fraction=0")
    assert "empty.jsonl: empty file skipped" in p.out
    assert "array.jsonl (a JSON array, not JSON Lines: read as an array): 3 kept" in p.out
    assert "pretty.json (pretty-printed JSON, not one object per line: read object by object): 2 kept" in p.out
    out = tmp_path / "out"
    assert sorted(documents_in(out, "train", Tokenizer(str(out / "tokenizer.model")))) == sorted(POEMS[:5])


# ---- 15. Ctrl-C while sampling and while evaluating

def test_ctrl_c_while_sampling_ends_without_a_traceback(tiny_ckpt):
    code, out, took = interrupt_after(["sample.py", f"--out_dir={tiny_ckpt}", "--num_samples=100000"], 1)
    assert code == 130 and "(interrupted)" in out and "Traceback" not in out and took < 10


def test_ctrl_c_while_evaluating_ends_without_a_traceback(demo_data, tiny_ckpt):
    code, out, took = interrupt_after(["evaluate.py", f"--out_dir={tiny_ckpt}", f"--data_dir={demo_data}",
                                       "--per_task=0", "--batch_size=1"], 2)
    assert code != 0 and "interrupted: nothing was written" in out and "Traceback" not in out and took < 10


# ---- 19. the details of sampling and chat

def test_sampling_says_when_the_context_is_full(tiny_ckpt):
    p = run("sample.py", f"--out_dir={tiny_ckpt}", "--max_new_tokens=1000", "--temperature=0",
            "--repetition_penalty=1.0", "--start=床前")
    assert "stopped: the 64-token context is full" in p.stderr


def test_a_prompt_files_final_newline_is_not_part_of_the_prompt(tiny_ckpt, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("床前明月光，\n", encoding="utf-8")
    greedy = ["--temperature=0", "--repetition_penalty=1.0", "--max_new_tokens=8"]
    from_file = run("sample.py", f"--out_dir={tiny_ckpt}", f"--start=FILE:{path}", *greedy).stdout
    typed = run("sample.py", f"--out_dir={tiny_ckpt}", "--start=床前明月光，", *greedy).stdout
    assert from_file == typed


# ---- 21. one summary line per file

def test_each_file_is_summed_up_once_and_crlf_repairs_are_counted(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes("第一段\r\n还是第一段\r\n\r\n第二段\r\n".encode("utf-8") * 50)
    p = run("prepare_data.py", f"--input={path}", "--sft_input=", "--vocab_size=300", f"--data_dir={tmp_path / 'o'}")
    summaries = [line for line in p.out.replace("\r", "\n").splitlines() if line.strip().startswith(str(path))]
    assert len(summaries) == 1 and "200 CRLF line ends repaired" in summaries[0]


def unwritable_dir(tmp_path):
    """A directory this process cannot write into: /sys for root (who writes anywhere else), else a locked one."""
    if os.geteuid() == 0:
        return "/sys"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return str(locked)


def test_export_into_an_unwritable_directory_is_a_one_line_error(tiny_ckpt, tmp_path):
    for version, name in (("0", "m.bin"), ("gguf", "m.gguf")):
        p = run("export.py", f"--out_dir={tiny_ckpt}", f"--version={version}",
                f"--output={unwritable_dir(tmp_path)}/{name}", check=False)
        assert_one_line_error(p, "cannot write into", "choose another --output")


def test_export_output_paths_a_user_types(tiny_ckpt, tmp_path):
    # an existing file where --version=hf wants a directory
    (tmp_path / "hf_file").write_text("x")
    p = run("export.py", f"--out_dir={tiny_ckpt}", "--version=hf", f"--output={tmp_path / 'hf_file'}", check=False)
    assert_one_line_error(p, "is a file", "--version=hf writes a directory")
    # a trailing slash: a new directory to write the file into
    run("export.py", f"--out_dir={tiny_ckpt}", "--version=gguf", f"--output={tmp_path / 'newdir'}/")
    assert (tmp_path / "newdir" / "model.gguf").exists()
    # a directory holding another model's shards: our loader would prefer their index to the new weights
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text("{}")
    (sharded / "model-00001-of-00002.safetensors").write_text("")
    before = sorted(os.listdir(sharded))
    p = run("export.py", f"--out_dir={tiny_ckpt}", "--version=hf", f"--output={sharded}", check=False)
    assert_one_line_error(p, "holds another model's weights", "choose an empty --output")
    assert sorted(os.listdir(sharded)) == before


def test_the_modelfile_sets_the_context_uses_relative_paths_and_keeps_a_users_edits(tiny_ckpt, tmp_path):
    out = tmp_path / "gguf"
    run("export.py", f"--out_dir={tiny_ckpt}", "--version=gguf", f"--output={out}/model.gguf")
    modelfile = (out / "Modelfile").read_text()
    assert "PARAMETER num_ctx 64" in modelfile and str(tmp_path) not in modelfile  # the folder can move
    edited = "FROM ./model.gguf\nPARAMETER temperature 0.3\n"  # the user's own, without our first line
    (out / "Modelfile").write_text(edited)
    p = run("export.py", f"--out_dir={tiny_ckpt}", "--version=gguf", f"--output={out}/model.gguf")
    assert (out / "Modelfile").read_text() == edited and "kept your" in p.out


def test_evaluate_refuses_before_answering_what_would_fail_after(tiny_sft, demo_data, tmp_path):
    p = run("evaluate.py", f"--out_dir={tiny_sft}", f"--data_dir={demo_data}",
            f"--report={unwritable_dir(tmp_path)}/eval.json", check=False)
    assert_one_line_error(p, "cannot write", "--report=")
    p = run("evaluate.py", f"--out_dir={tiny_sft}", f"--data_dir={tmp_path}", check=False)  # no questions there
    assert_one_line_error(p, "no held-out questions")
    p = run("evaluate.py", f"--out_dir={tiny_sft}", f"--data_dir={demo_data}", "--base=out-sfft", check=False)
    assert_one_line_error(p, "--base=out-sfft is not a checkpoint")


def test_sample_chat_cuts_a_long_message_and_keeps_the_template_and_system_prompt(tiny_sft):
    from sample import cut_message
    tok = Tokenizer(os.path.join(tiny_sft, "tokenizer.model"))
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "很长的问题" * 40 + "最后一句？"}]
    cut = cut_message(tok, messages, 48)
    ids = tok.encode_chat(cut)[0]
    assert len(ids) <= 48 and ids[0] == tok.bos_id and cut[0] == messages[0]
    assert cut[1]["content"].endswith("最后一句？") and len(cut[1]["content"]) < len(messages[1]["content"])
    assert len(tok.encode_chat(cut_message(tok, messages, len(ids) + 3))[0]) >= len(ids)  # the most that fits
    p = run("sample.py", f"--out_dir={tiny_sft}", "--chat", "--prompt", "很长的问题" * 40, "--max_new_tokens=4",
            "--temperature=0")
    assert "keeping its last" in p.out and "Traceback" not in p.out


def test_evaluate_refuses_a_bad_chat_flag_and_an_unwritable_report_before_any_work(tiny_ckpt, tmp_path):
    p = run("evaluate.py", f"--out_dir={tiny_ckpt}", "--cmmlu=.", "--chat=yes", check=False)
    assert_one_line_error(p, "--chat is auto, True or False, not 'yes'")
    for flags in (["--benchmark=True", f"--report={unwritable_dir(tmp_path)}/b.json"],
                  [f"--report={unwritable_dir(tmp_path)}/eval.json"]):
        p = run("evaluate.py", f"--out_dir={tiny_ckpt}", *flags, check=False)
        assert_one_line_error(p, "is not a writable directory")
        assert "built-in benchmark" not in p.out and "held-out task evaluation" not in p.out


def test_a_system_prompt_longer_than_the_context_is_one_line(tiny_sft):
    p = run("sample.py", f"--out_dir={tiny_sft}", "--chat", "--prompt=你好", "--system=" + "很长的系统提示。" * 100,
            check=False)
    assert_one_line_error(p, "--system takes", "shorten it")
