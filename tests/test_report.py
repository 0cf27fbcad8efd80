"""The report card (report.py): written beside every checkpoint at the end of training and on demand, from what
the run logged, naming the numbers in it."""
import json
import os

from conftest import TINY_MODEL, read_log, run


def read_card(out_dir):
    with open(os.path.join(out_dir, "report.json"), encoding="utf-8") as f:
        card = json.load(f)
    with open(os.path.join(out_dir, "report.md"), encoding="utf-8") as f:
        return card, f.read()


def split_totals(data_dir, prefix, key):
    total = 0
    for name in os.listdir(data_dir):
        if name.startswith(prefix) and name.endswith(".json"):
            with open(os.path.join(data_dir, name)) as f:
                total += json.load(f)[key]
    return total


def test_a_pretraining_run_resumed_once_reports_both_sessions_its_losses_benchmark_and_samples(demo_data, tmp_path):
    out = str(tmp_path / "out")
    common = [f"--data_dir={demo_data}", f"--out_dir={out}", *TINY_MODEL, "--eval_interval=2"]
    run("pretrain.py", *common, "--max_iters=4")
    p = run("pretrain.py", *common, "--max_iters=8", "--init_from=resume", "--evaluate_tasks=True")
    card, md = read_card(out)
    assert f"report card: {out}/report.md" in p.out

    # the two commands that made it, each with the iterations it trained and its peak memory
    first, second = card["sessions"]
    assert "--max_iters=4" in first["command"] and "--init_from=resume" not in first["command"]
    assert "--max_iters=8" in second["command"] and "--init_from=resume" in second["command"]
    assert (first["first_iter"], first["last_iter"], second["first_iter"], second["last_iter"]) == (0, 4, 4, 8)
    assert all(s["peak_host_gb"] > 0.05 and s["wall_s"] > 0 for s in (first, second))
    assert first["command"] in md and second["command"] in md

    # the numbers are the log's
    evals = [r for r in read_log(out) if "val_loss" in r]
    assert card["training"]["final"] == {"iter": 8, "val_loss": evals[-1]["val_loss"], "val_bpc": evals[-1]["val_bpc"]}
    assert card["training"]["best"]["val_loss"] == min(r["val_loss"] for r in evals)
    assert f"final val loss | {evals[-1]['val_loss']:.4f} ({evals[-1]['val_bpc']:.3f} bits per character)" in md
    assert card["training"]["iterations"] == 8
    assert card["training"]["tokens_seen"] == 8 * 4 * 32  # iterations x batch_size x block_size
    assert "8 iterations, 1,024 tokens seen" in md
    assert card["data"]["splits"]["train"]["tokens"] == split_totals(demo_data, "train_", "tokens")
    assert card["settings"]["max_iters"] == 8 and card["model"]["args"]["dim"] == 32

    # the benchmark of the model, beside nothing (it started from scratch), and three continuations
    with open(os.path.join(out, "benchmark.json"), encoding="utf-8") as f:
        benchmark = json.load(f)
    assert card["benchmark"] == benchmark and list(benchmark["models"]) == ["pretrained"]
    assert f"**{benchmark['models']['pretrained']['headline'] * 100:.1f}**" in md
    assert [s["prompt"] for s in card["samples"]] == ["床前明月光，", "新华社北京电", "这家酒店的房间"]
    assert all(s["output"] and s["reference"] is None for s in card["samples"])
    assert "started from | scratch" in md


def test_an_sft_card_shows_tasks_and_benchmark_beside_the_pretrained_model_and_is_the_same_on_demand(
        demo_data, tiny_ckpt, tmp_path):
    out = str(tmp_path / "sft")
    run("sft.py", f"--data_dir={demo_data}", f"--init_from={tiny_ckpt}", f"--out_dir={out}", "--batch_size=4",
        "--eval_iters=2", "--learning_rate=1e-2", "--warmup_iters=2", "--max_iters=6", "--eval_interval=3",
        "--eval_per_task=3")
    card, md = read_card(out)
    with open(os.path.join(out, "eval.json"), encoding="utf-8") as f:
        evaluation = json.load(f)
    assert card["evaluation"] == evaluation and list(evaluation["models"]) == ["pretrained", "SFT"]
    assert list(card["benchmark"]["models"]) == ["pretrained", "SFT"]
    assert "| task (metric) | pretrained | SFT |" in md and "| task | chance | pretrained | SFT |" in md
    assert card["started_from"] == tiny_ckpt and card["sessions"][0]["last_iter"] == 6
    assert card["training"]["tokens_seen"] == read_log(out)[-1]["tokens"] > 0  # answer tokens, to iteration 6

    # the samples answer held-out questions, shown with their reference answers
    with open(os.path.join(demo_data, "sft_test.jsonl"), encoding="utf-8") as f:
        held_out = {(m["messages"][0]["content"], m["messages"][1]["content"]) for m in map(json.loads, f)}
    assert len(card["samples"]) == 3 and all((s["prompt"], s["reference"]) in held_out for s in card["samples"])

    # on demand, from the checkpoint: the same card (the benchmark and the samples computed again)
    os.remove(os.path.join(out, "report.md"))
    run("evaluate.py", f"--out_dir={out}", f"--data_dir={demo_data}", "--report_card=True", "--per_task=3")
    again, md_again = read_card(out)
    for key in ("benchmark", "samples", "evaluation", "training", "sessions", "settings", "data"):
        assert again[key] == card[key], key
    assert md_again.split("\n", 3)[3] == md.split("\n", 3)[3]  # all but the line saying when it was written


def test_the_card_of_an_imported_model_is_refused_in_one_line(tmp_path):
    os.makedirs(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{}")
    p = run("evaluate.py", f"--out_dir={tmp_path / 'hf'}", "--report_card=True", check=False)
    assert p.returncode != 0 and p.out.strip().splitlines()[-1].startswith("error: --report_card needs a run")


def test_the_card_says_when_its_tasks_and_benchmark_were_bounded_differently():
    import report
    task = {"ner": {"metric": "name F1", "score": 0.4, "n": 200}}
    bench = {"t": {"accuracy": 0.5, "centred": 1 / 3, "n": 50, "chance": 0.25}}
    card = {"out_dir": "x", "evaluation": {"per_task": 200, "models": {"SFT": {"tasks": task}}},
            "benchmark": {"per_task": 50, "models": {"SFT": {"headline": 1 / 3, "tasks": bench}}}}
    assert any("--per_task=200" in line and "--per_task=50" in line for line in report.benchmark_section(card))
    card["benchmark"]["per_task"] = 200
    assert not any(line.startswith("Note") for line in report.benchmark_section(card))
