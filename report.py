"""
The report card beside a checkpoint: out_dir/report.md, and report.json with the same numbers for programs.
It is what a user pastes into an issue or a paper's appendix, built from what the run wrote: ckpt.pt's
settings and sessions (commands, commits, wall time, peak memory), log.jsonl, the data's fingerprints,
eval.json (the held-out tasks) and benchmark.json (the built-in benchmark, beside the model the run started
from), plus three samples from the model when it is at hand. It never trains.

Every training stage writes it at the end of training; for any checkpoint of ours, on demand:

    python evaluate.py --out_dir=out-sft --report_card=True
"""
import datetime
import json
import os
import statistics

import torch

from checkpoint import STAGES, stage_of
from device import git_commit
from engine import generate
from model import ModelArgs, Transformer
from plot import plot_runs, read_log
from tokenizer import write_text_file

SPEEDS = {"tokens_per_s": "tokens/s", "answer_tokens_per_s": "answer tokens/s", "pairs_per_s": "pairs/s",
          "answers_per_s": "sampled answers/s"}
TEXT_PROMPTS = ("床前明月光，", "新华社北京电", "这家酒店的房间")  # continued by a model that does not chat
CHAT_PROMPTS = ("“一马当先”是什么意思？", "用一句话介绍北京。", "写一个以“心”开头的成语。")  # without held-out questions
SAMPLING = {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 64, "seed": 1337}


def write_card(out_dir, model=None, tok=None):
    """Write out_dir/report.md and report.json (returned as a dict) for its checkpoint; model and tok, when given,
    write three samples (a chat model answers the first held-out questions of the run's data_dir)."""
    checkpoint = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", mmap=True, weights_only=True)
    for key in ("model", "optimizer", "lora"):
        checkpoint.pop(key, None)  # the card needs the run's facts only
    config, stage = checkpoint.get("config", {}), checkpoint.get("stage", "pretrain")
    data_dir = config.get("data_dir")
    records = read_log(os.path.join(out_dir, "log.jsonl")) if os.path.exists(os.path.join(out_dir, "log.jsonl")) \
        else []
    card = {
        "out_dir": out_dir, "stage": stage,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "written_by_commit": git_commit(),
        "model": describe_model(checkpoint["model_args"], config, checkpoint.get("base_dtype")),
        "started_from": checkpoint.get("base"),
        "data": data_fingerprint(data_dir, stage, checkpoint.get("tokenizer_sha")),
        "training": training_numbers(checkpoint, records),
        "sessions": checkpoint.get("sessions", []),
        "evaluation": read_json(os.path.join(out_dir, "eval.json")),
        "benchmark": read_json(os.path.join(out_dir, "benchmark.json")),
        "loss_curve": draw_loss(out_dir, records, stage),
        "samples": samples(model, tok, bool(stage_of(checkpoint).chat), data_dir) if model is not None else [],
        "sampling": SAMPLING,
        "settings": config,
    }
    write_text_file(os.path.join(out_dir, "report.json"), json.dumps(card, indent=1, ensure_ascii=False))
    write_text_file(os.path.join(out_dir, "report.md"), markdown(card))
    print(f"report card: {os.path.join(out_dir, 'report.md')}")
    return card


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def describe_model(model_args, config, base_dtype):
    """The model's shape and size (counted on the meta device: no weights are made), and LoRA's settings
    (base_dtype: how the run stored its base, "auto" resolved)."""
    args = ModelArgs(**model_args)
    with torch.device("meta"):
        params = Transformer(args).num_params()
    lora = {"rank": config["lora_rank"], "targets": config.get("lora_targets"),
            "base_dtype": base_dtype or config.get("base_dtype"),
            "train_embeddings": config.get("train_embeddings")} if config.get("lora_rank") else None
    return {"parameters": params, "args": model_args, "lora": lora}


def data_fingerprint(data_dir, stage, tokenizer_sha):
    """The tokenizer's hash and each split's counts (prepare_data.py's .json beside its token files)."""
    found = {"dir": data_dir, "tokenizer_sha": tokenizer_sha, "splits": {}}
    if not data_dir or not os.path.isdir(data_dir):
        return found
    for split, prefix in zip(("train", "held out"), STAGES.get(stage, STAGES["pretrain"]).data):
        totals = {}
        for name in sorted(os.listdir(data_dir)):
            if name.startswith(prefix) and name.endswith(".json"):
                with open(os.path.join(data_dir, name)) as f:
                    for key, value in json.load(f).items():
                        if key in ("tokens", "documents", "chars", "conversations", "pairs", "answer_tokens"):
                            totals[key] = totals.get(key, 0) + value
        if totals:
            found["splits"][split] = totals
    return found


def training_numbers(checkpoint, records):
    """What the log and the checkpoint say about the run: iterations, tokens seen, wall time, speed, MFU, peak
    memory, and the final and best held-out loss (with bits per character where the run measured them)."""
    sessions = checkpoint.get("sessions", [])
    evals = [r for r in records if "val_loss" in r]
    speed_key = next((k for k in SPEEDS if any(r.get(k) for r in records)), None)
    mfus = [r["mfu"] for r in records if r.get("mfu")]
    peaks = [s["peak_device_gb"] for s in sessions if s.get("peak_device_gb")]
    hosts = [s["peak_host_gb"] for s in sessions if s.get("peak_host_gb")]
    final = evals[-1] if evals else None
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    return {
        "iterations": checkpoint.get("iter_num"),
        "tokens_seen": next((r["tokens"] for r in reversed(records) if "tokens" in r), None),
        "wall_s": sum(s.get("wall_s", 0) for s in sessions) if sessions else None,
        "speed": {"unit": SPEEDS[speed_key], "median": statistics.median(r[speed_key] for r in records
                                                                        if r.get(speed_key))} if speed_key else None,
        "mfu_median": statistics.median(mfus) if mfus else None,
        "peak_device_gb": max(peaks) if peaks else None,
        "peak_host_gb": max(hosts) if hosts else None,
        "loss_name": stage_of(checkpoint).loss,
        "final": {k: final[k] for k in ("iter", "val_loss", "val_bpc") if k in final} if final else None,
        "best": {k: best[k] for k in ("iter", "val_loss", "val_bpc") if k in best} if best else None,
    }


def draw_loss(out_dir, records, label):
    """out_dir/loss.png (plot.py's picture) when matplotlib is installed; the file name, or why there is none."""
    if not any("loss" in r or "val_loss" in r for r in records):
        return {"file": None, "why": "the log has no losses"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {"file": None, "why": "matplotlib is not installed (pip install matplotlib)"}
    plot_runs({label: records}, os.path.join(out_dir, "loss.png"))
    return {"file": "loss.png", "why": None}


def held_out_questions(data_dir, n, fits):
    """The first question that fits(question) of each of the first n tasks in data_dir/sft_test.jsonl, with its
    reference answer."""
    path = os.path.join(data_dir or "", "sft_test.jsonl")
    if not os.path.exists(path):
        return []
    picked, tasks = [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            example = json.loads(line)
            task, messages = example.get("task", "exact"), example["messages"]
            if task not in tasks and len(messages) == 2 and messages[0]["role"] == "user" \
                    and fits(messages[0]["content"]):
                tasks.add(task)
                picked.append((messages[0]["content"], messages[1]["content"]))
                if len(picked) == n:
                    break
    return picked


@torch.no_grad()
def samples(model, tok, chat, data_dir, n=3):
    """n generations with SAMPLING's settings, each seeded alike: a chat model answers held-out questions (the
    card shows the reference answer beside), any other model continues TEXT_PROMPTS. A prompt that leaves no
    room in the model's context for a few tokens is passed over."""
    model.eval()

    def encode(prompt):
        return tok.encode_chat([{"role": "user", "content": prompt}])[0] if chat else tok.encode(prompt, bos=True)

    def fits(prompt):
        return len(encode(prompt)) + 8 <= model.args.max_seq_len
    prompts = (held_out_questions(data_dir, n, fits) or [(p, None) for p in CHAT_PROMPTS[:n]]) if chat \
        else [(p, None) for p in TEXT_PROMPTS[:n]]
    device = next(model.parameters()).device
    written = []
    for prompt, reference in prompts:
        ids = encode(prompt)
        if not fits(prompt):
            continue
        torch.manual_seed(SAMPLING["seed"])
        new = []
        for token in generate(model, torch.tensor([ids], device=device),
                              min(SAMPLING["max_new_tokens"], model.args.max_seq_len - len(ids)),
                              SAMPLING["temperature"], top_p=SAMPLING["top_p"],
                              repetition_penalty=SAMPLING["repetition_penalty"], stop_tokens=tok.stop_ids):
            if token.item() in tok.stop_ids:
                break
            new.append(token.item())
        # a continuation is decoded with its prompt, so that a piece joining the two reads right
        text = tok.decode(new) if chat else tok.decode(ids[1:] + new)[len(tok.decode(ids[1:])):]
        written.append({"prompt": prompt, "output": text, "reference": reference})
    return written


def quote(text):
    """text as a Markdown block quote, its line breaks kept."""
    return "\n".join("> " + line for line in text.split("\n"))


def gigabytes(x):
    return f"{x:.2f} GB" if x is not None else "-"


def duration(seconds):
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def markdown(card):
    """report.md: the card for people, every number from card (report.json)."""
    out_dir, stage = card["out_dir"], card["stage"]
    lines = [f"# Report card: {out_dir}", "",
             f"{STAGES[stage].run.capitalize() if stage in STAGES else stage}. Card written {card['written']} by "
             f"llama2.zh at commit {card['written_by_commit'] or '(not a git checkout)'}.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(card)] + [""]
    curve = card["loss_curve"]
    lines += [f"![loss curves]({curve['file']})" if curve["file"] else f"No loss curve: {curve['why']}.", ""]
    lines += sessions_section(card) + tasks_section(card) + benchmark_section(card) + samples_section(card)
    lines += ["## Settings", "", "<details><summary>every setting of the run</summary>", "", "| setting | value |",
              "|---|---|"] + [f"| {k} | `{v}` |" for k, v in card["settings"].items()] + ["", "</details>", ""]
    return "\n".join(lines)


def summary_rows(card):
    """The card's first table: (what, value) for the model, its data, training, time, speed, memory and loss."""
    t, model, data, args = card["training"], card["model"], card["data"], card["model"]["args"]
    shape = (f"{model['parameters'] / 1e6:.2f}M parameters: dim {args['dim']}, {args['n_layers']} layers, "
             f"{args['n_heads']} heads ({args.get('n_kv_heads') or args['n_heads']} kv), "
             f"context {args['max_seq_len']}, "
             f"vocab {args['vocab_size']:,}" + (", tied embeddings" if args.get("tie_embeddings") else ""))
    if model["lora"]:
        lora = model["lora"]
        shape += (f"; LoRA rank {lora['rank']} on {lora['targets']}, base stored as {lora['base_dtype']}"
                  + (", embeddings trained in full" if lora["train_embeddings"] else ""))
    rows = [("model", shape), ("started from", card["started_from"] or "scratch (random initialization)")]
    splits = "; ".join(f"{split} " + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in counts.items())
                       for split, counts in data["splits"].items())
    rows.append(("data", f"{data['dir']}: tokenizer {data['tokenizer_sha']}" + (f"; {splits}" if splits else "")))
    seen = f", {t['tokens_seen']:,} {'answer tokens' if card['stage'] == 'sft' else 'tokens'} seen" \
        if t["tokens_seen"] is not None else ""
    rows.append(("trained", f"{t['iterations']:,} iterations{seen}"))
    rows.append(("wall time", f"{duration(t['wall_s'])} in {len(card['sessions'])} session(s)" if card["sessions"]
                 else "not recorded (the checkpoint predates session records)"))
    if t["speed"]:
        rows.append(("speed", f"{t['speed']['median']:,.0f} {t['speed']['unit']} (median of the logged intervals)"
                     + (f"; MFU {t['mfu_median'] * 100:.1f}%" if t["mfu_median"] else "")))
    rows.append(("peak memory", f"GPU {gigabytes(t['peak_device_gb'])} allocated; "
                                f"host {gigabytes(t['peak_host_gb'])} resident"))
    for which in ("final", "best"):
        r = t[which]
        if r:
            rows.append((f"{which} {t['loss_name']}", f"{r['val_loss']:.4f}"
                         + (f" ({r['val_bpc']:.3f} bits per character)" if "val_bpc" in r else "")
                         + f" at iteration {r['iter']:,}"))
    return rows


def sessions_section(card):
    lines = ["## Sessions", ""]
    if card["sessions"]:
        lines += ["| # | command | commit | device | iterations | wall time | peak memory (GPU / host) |",
                  "|---|---|---|---|---|---|---|"]
    else:
        lines.append("None recorded: the checkpoint was written before the kit recorded its sessions.")
    for i, s in enumerate(card["sessions"], 1):
        lines.append(f"| {i} | `{s.get('command')}` | {s.get('git_commit') or '-'} | {s.get('device')}, "
                     f"{s.get('dtype')}, {s.get('world_size')} process(es) | {s.get('first_iter')}-{s.get('last_iter')}"
                     f" | {duration(s.get('wall_s'))} | {gigabytes(s.get('peak_device_gb'))} / "
                     f"{gigabytes(s.get('peak_host_gb'))} |")
    return lines + [""]


def tasks_section(card):
    lines, evaluation = ["## Held-out tasks", ""], card["evaluation"]
    if not evaluation:
        return lines + [f"Not measured: `python evaluate.py --out_dir={card['out_dir']}` answers them (a chat "
                        f"model's).", ""]
    names = list(evaluation["models"])
    lines += ["Greedy answers to the questions prepare_data.py held out (eval.json).", "",
              "| task (metric) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    tasks = sorted({task for m in evaluation["models"].values() for task in m["tasks"]})
    for task in tasks:
        cells = []
        for name in names:
            r = evaluation["models"][name]["tasks"].get(task)
            cells.append(f"{r['score'] * 100:.1f}% (n={r['n']})" if r else "-")
        metric = next(m["tasks"][task]["metric"] for m in evaluation["models"].values() if task in m["tasks"])
        lines.append(f"| {task} ({metric}) | " + " | ".join(cells) + " |")
    return lines + [""]


def benchmark_section(card):
    lines, bench = ["## Built-in benchmark", ""], card["benchmark"]
    if not bench:
        return lines + [f"Not measured: `python evaluate.py --out_dir={card['out_dir']} --report_card=True` runs it.",
                        ""]
    names = list(bench["models"])
    lines += ["Log-likelihood choices on held-out demo documents (benchmark.json): accuracy, and in brackets the "
              "score centred on chance (0 at chance, 100 all right).", "",
              "| task | chance | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    first = bench["models"][names[0]]["tasks"]
    for task in first:
        cells = [f"{r['accuracy'] * 100:.1f}% ({r['centred'] * 100:.1f}) n={r['n']}"
                 for r in (bench["models"][name]["tasks"][task] for name in names)]
        lines.append(f"| {task} | {first[task]['chance'] * 100:.0f}% | " + " | ".join(cells) + " |")
    lines.append("| **headline** (mean centred) | | " + " | ".join(
        f"**{bench['models'][name]['headline'] * 100:.1f}**" for name in names) + " |")
    tasks_bound, bench_bound = (card["evaluation"] or {}).get("per_task"), bench.get("per_task")
    if card["evaluation"] and "per_task" in bench and tasks_bound != bench_bound:  # two runs of evaluate.py
        lines += ["", f"Note: the held-out tasks were scored with --per_task={tasks_bound} and this benchmark with "
                      f"--per_task={bench_bound} (0: all), in different runs."]
    return lines + [""]


def samples_section(card):
    lines = ["## Samples", ""]
    if not card["samples"]:
        return lines + [f"None: the model was not at hand; `python evaluate.py --out_dir={card['out_dir']} "
                        f"--report_card=True` writes them.", ""]
    s = card["sampling"]
    lines += [f"Temperature {s['temperature']}, top-p {s['top_p']}, repetition penalty {s['repetition_penalty']}, "
              f"seed {s['seed']}, at most {s['max_new_tokens']} new tokens.", ""]
    for i, sample in enumerate(card["samples"], 1):
        lines += [f"**{i}. prompt**", "", quote(sample["prompt"]), "", "**the model**", "", quote(sample["output"]), ""]
        if sample["reference"] is not None:
            lines += ["**the reference answer**", "", quote(sample["reference"]), ""]
    return lines
