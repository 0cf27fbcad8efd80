"""
The held-out task evaluation: a checkpoint answers the test questions prepare_data.py held out
(data_dir/sft_test.jsonl), greedily, in the chat template it was tuned with, beside the model it
started from, so that what a stage bought is visible task by task.

    python evaluate.py                          # out-sft beside its pretrained base
    python evaluate.py --out_dir=out-dpo        # any checkpoint directory: a DPO model beside its SFT model
    python evaluate.py --base=none --per_task=100
    python evaluate.py --baselines              # also what simple classifiers score on the sentiment task
    python evaluate.py --onpolicy_pairs=data/onpolicy.jsonl   # DPO pairs from the model's own wrong answers
    python evaluate.py --out_dir=out-sft --ceval=ceval-exam/ --cmmlu=cmmlu/   # C-Eval / CMMLU from local folders
    python evaluate.py --out_dir=out --benchmark=True   # the built-in Chinese benchmark, log-likelihood scored
    python evaluate.py --out_dir=out-sft --report_card=True   # the benchmark, then out_dir/report.md (report.py)

Scores per task (demo.score): sentiment accuracy, the share of idiom-chain answers that are real idioms
with the right first character, name-extraction F1, exact match for the rest. The table is printed
and written to out_dir/eval.json ({"models": {name: {"checkpoint", "tasks": {task: {"metric", "score", "n"}}}}}).
sft.py, dpo.py and grpo.py run this at the end of training (after_training), and pretrain.py the benchmark;
each then writes its report card. --report=path writes the JSON elsewhere.
"""
import collections
import contextlib
import json
import math
import os
import random
import time

import numpy as np
import torch
from tqdm import tqdm

import demo
import exams
from checkpoint import checkpoint_format, load_model, model_name, require_model, stage_of, writable
from configurator import check_ranges, configure
from device import PTDTYPE, resolve_device
from engine import Request, complete, generate
from lora import adapters_disabled, has_adapters
from report import write_card
from tokenizer import write_text_file

# -----------------------------------------------------------------------------
out_dir = "out-sft"          # the checkpoint to evaluate (ckpt.pt, tokenizer.model); eval.json is written here
report = ""                  # where to write the JSON report; "": out_dir/eval.json
data_dir = "data"            # where the held-out questions are: data_dir/sft_test.jsonl
base = "auto"                # compare with: auto (the model the checkpoint was tuned from), none, or a directory
per_task = 1000              # held-out questions per task (the demo has 833 reviews and 200 of each other task), and
                             # at most this many of each built-in benchmark task (it has 300 at most); 0: all
batch_size = 32              # questions answered together (same-length prompts only, so answers never change)
baselines = False            # also score the sentiment task's majority label and Naive Bayes classifiers
val_fraction = 0.01          # baselines, onpolicy_pairs: the --val_fraction prepare_data.py split the demo with
onpolicy_pairs = ""          # instead: answer the demo's training questions and write, for every wrong answer, a DPO
                             # pair (the true answer chosen, the model's rejected) to this JSONL for prepare_data.py
onpolicy_tasks = "ner"       # onpolicy_pairs: the tasks asked (all their training questions); sentiment pairs
                             # cost sentiment accuracy on the demo even balanced (docs/experiments.md)
ceval = ""                   # a local C-Eval folder (dev/, val/, test/): score its val questions instead
cmmlu = ""                   # a local CMMLU folder (dev/, test/): score its test questions instead
shots = 5                    # ceval/cmmlu: answered dev questions before each question (0: zero-shot)
benchmark = False            # the built-in offline benchmark (exams.py) instead, the model beside its base
report_card = False          # instead: the built-in benchmark, then out_dir/report.md (report.py), eval.json's scores in it
pass_k = 0                   # > 0: also k sampled answers to each held-out question of the checkable tasks: pass@1
                             # (the mean score of the samples) and pass@k (the best of the k), per model
pass_temperature = 1.0       # pass_k: the sampling temperature
chat = "auto"                # ceval/cmmlu: ask in the chat template (True) or as plain text (False); auto: SFT/DPO chat
device = "auto"              # auto: cuda, then mps, then cpu
dtype = "float32"            # float32, or bfloat16 on GPUs (greedy answers can then differ in near ties)
# -----------------------------------------------------------------------------


def load_tests(data_dir):
    """The held-out conversations prepare_data.py wrote, or None when there are none."""
    path = os.path.join(data_dir, "sft_test.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def evaluate_on_tasks(model, tok, tests, idiom_words, per_task, batch_size=32, record=None, score=None):
    """
    {task: (mean score, n)} of greedy answers to the held-out questions, each (task, question, reference, answer)
    appended to record if it is a list; score replaces demo.score (grpo.py's verifiers). Prompts of one length
    are answered in one batch: no padding, so each answer is the one the model gives that question alone.
    """
    model.eval()
    device = next(model.parameters()).device
    by_task = {}
    for t in tests:
        by_task.setdefault(t.get("task", "exact"), []).append(t)
    results = {}
    for task, examples in sorted(by_task.items()):
        by_length, n, too_long = {}, 0, 0  # prompt length -> [(prompt ids, answer budget, question, reference)]
        for t in examples:
            if per_task and n == per_task:
                break
            *context, answer = t["messages"]
            ids, _ = tok.encode_chat(context)
            budget = len(tok.encode(answer["content"])) + 8  # room for the answer and a little more
            if len(ids) + budget > model.args.max_seq_len:  # skipped, as in training: a cut prompt loses the question
                too_long += 1
                continue
            by_length.setdefault(len(ids), []).append((ids, budget, context[-1]["content"], answer["content"]))
            n += 1
        scores = []
        bar = tqdm(total=n, desc=task, unit="q", leave=False, dynamic_ncols=True)  # minutes on a CPU at full size
        for group in by_length.values():
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                prompts = torch.tensor([ids for ids, *_ in chunk], device=device)
                answers, done = [[] for _ in chunk], [False] * len(chunk)
                for step in generate(model, prompts, max(b for _, b, *_ in chunk), temperature=0,
                                     stop_tokens=tok.stop_ids):
                    for r, token in enumerate(step.tolist()):
                        if done[r] or token in tok.stop_ids or len(answers[r]) == chunk[r][1]:
                            done[r] = True
                        else:
                            answers[r].append(token)
                    if all(done):
                        break
                for (_, _, question, reference), out in zip(chunk, answers):
                    scores.append(score(task, question, reference, tok.decode(out)) if score else
                                  demo.score(task, question, reference, tok.decode(out), idiom_words))
                    if record is not None:
                        record.append((task, question, reference, tok.decode(out)))
                bar.update(len(chunk))
        bar.close()
        if too_long:
            print(f"  {task}: {too_long} question(s) longer than the context skipped")
        if scores:
            results[task] = (float(np.mean(scores)), len(scores))
    return results


CHECKABLE = ("sentiment", "ner", "chain", "pinyin")  # the tasks whose answers a program checks (demo.score)


def pass_at_k(model, tok, tests, idiom_words, per_task, k, temperature, seed=0):
    """
    k answers sampled at temperature to each held-out question of the checkable tasks (the first per_task of
    each), by the batched engine with a seed per answer. Returns {task: (pass@1, pass@k, n)}: pass@1 the mean
    score of all the samples, pass@k the mean over questions of the best of its k (for right/wrong tasks,
    whether any was right; for name F1, the best F1): what reinforcement learning on the task could reach
    by making the best answer the likeliest.
    """
    by_task = {}
    for t in tests:
        task = t.get("task", "exact")
        if task in CHECKABLE and len(t["messages"]) == 2 and len(by_task.setdefault(task, [])) < (per_task or 10**9):
            ids, _ = tok.encode_chat(t["messages"][:1])
            budget = min(len(tok.encode(t["messages"][1]["content"])) + 8, model.args.max_seq_len - len(ids) - 1)
            if budget > 0:
                by_task[task].append((ids, budget, t["messages"][0]["content"], t["messages"][1]["content"]))
    results = {}
    for task, items in sorted(by_task.items()):
        requests = [Request(ids, budget, temperature, seed=seed * 1_000_003 + i * k + j, stop_tokens=tok.stop_ids)
                    for i, (ids, budget, _, _) in enumerate(items) for j in range(k)]
        answers = complete(model, requests, slots=64)
        scores = np.array([[demo.score(task, items[i][2], items[i][3], tok.decode(answers[i * k + j][0]), idiom_words)
                            for j in range(k)] for i in range(len(items))])                    # (questions, k)
        results[task] = (float(scores.mean()), float(scores.max(1).mean()), len(items))
    return results


def sentiment_baselines(tests, val_fraction):
    """{name: {"sentiment": (accuracy, n)}} without a language model: the majority label, and multinomial Naive Bayes
    over the review's characters and character bigrams, fit on the demo's training reviews."""
    train = [(m[0]["content"].split("\n", 1)[1], m[1]["content"])
             for split, task, m in demo.sft_examples(val_fraction) if split == "train" and task == "sentiment"]
    test = [(t["messages"][0]["content"].split("\n", 1)[1], t["messages"][1]["content"])
            for t in tests if t.get("task") == "sentiment"]
    if not train or not test:
        return {}
    majority = collections.Counter(label for _, label in train).most_common(1)[0][0]
    results = {"majority label": {"sentiment": (float(np.mean([label == majority for _, label in test])), len(test))}}
    for n, name in ((1, "Naive Bayes, chars"), (2, "Naive Bayes, chars+bigrams")):
        def features(review):
            return [review[i:i + k] for k in range(1, n + 1) for i in range(len(review) - k + 1)]
        counts, docs = collections.defaultdict(collections.Counter), collections.Counter()
        for review, label in train:
            docs[label] += 1
            counts[label].update(features(review))
        vocab = len(set().union(*counts.values()))
        totals = {label: sum(c.values()) for label, c in counts.items()}

        def predict(review):  # add-one smoothing
            return max(counts, key=lambda label: math.log(docs[label]) + sum(
                math.log((counts[label][f] + 1) / (totals[label] + vocab)) for f in features(review)))
        results[name] = {"sentiment": (float(np.mean([predict(r) == label for r, label in test])), len(test))}
    return results


def print_comparison(results):
    names = list(results)
    tasks = sorted({task for r in results.values() for task in r})
    width = max(18, *(len(n) + 2 for n in names))
    print(f"{'task (metric)':<28}" + "".join(f"{n:>{width}}" for n in names))
    for task in tasks:
        label = f"{task} ({demo.METRIC_NAMES.get(task, 'exact match')})"
        cells = "".join(f"{results[n][task][0] * 100:>{width - 6}.1f}% n={results[n][task][1]:<3}" if task in results[n]
                        else f"{'-':>{width}}" for n in names)
        print(f"{label:<28}{cells}")


def compare_on_tasks(models, data_dir, per_task, report_path, batch_size=32, extra=None, pass_k=0, pass_temperature=1.0,
                     tests=None, score=None):
    """
    models: {name: (Transformer, its Tokenizer, checkpoint directory[, the context it answers in])}: each model
    reads the questions with its own tokenizer (a base model does not know the pieces an extended tokenizer added);
    a LoRA model's base is the model itself in adapters_disabled. Every model answers the held-out questions; prints
    the table (with extra, e.g. baselines, as more columns) and writes report_path. pass_k > 0: also pass@1 and
    pass@k of the checkable tasks (pass_at_k), a second table and "pass_at_k" in the report. Returns {name: {task:
    (score, n)}}, or None when there are no questions. tests and score: other held-out questions (as load_tests
    reads them) and their scorer (grpo.py's task and verifier) instead of data_dir's and demo.score.
    """
    source = "the run's held-out questions" if tests is not None else os.path.join(data_dir, "sft_test.jsonl")
    tests = tests if tests is not None else load_tests(data_dir)
    if tests is None:
        print(f"no {data_dir}/sft_test.jsonl: no held-out questions to evaluate on")
        return None
    idiom_words = demo.idiom_words() if any(t.get("task") == "chain" for t in tests) else set()
    results, sampled, t0 = {}, {}, time.time()
    for name, (model, tok, _, *context) in models.items():
        with context[0]() if context else contextlib.nullcontext():
            results[name] = evaluate_on_tasks(model, tok, tests, idiom_words, per_task, batch_size, score=score)
            if pass_k:
                sampled[name] = pass_at_k(model, tok, tests, idiom_words, per_task, pass_k, pass_temperature)
    print(f"held-out task evaluation ({time.time() - t0:.0f}s, greedy, the same chat template for every model):")
    everything = dict(results, **(extra or {}))
    print_comparison(everything)
    if pass_k:
        print(f"sampled at temperature {pass_temperature}, {pass_k} answers per question: pass@1 / pass@{pass_k} "
              f"(the best of {pass_k})")
        print(f"{'task':<28}" + "".join(f"{name:>24}" for name in sampled))
        for task in sorted({t for r in sampled.values() for t in r}):
            print(f"{task:<28}" + "".join(f"{r[task][0] * 100:>9.1f}% / {r[task][1] * 100:5.1f}% n={r[task][2]:<3}"
                                          if task in r else f"{'-':>24}" for r in sampled.values()))
    sources = {name: source for name, (_, _, source, *_) in models.items()}
    report = {"data": source, "per_task": per_task, "models": {
        name: {"checkpoint": sources.get(name), "tasks": {
            task: {"metric": "verifier" if score else demo.METRIC_NAMES.get(task, "exact match"), "score": s, "n": n}
            for task, (s, n) in r.items()}}
        for name, r in everything.items()}}
    for name, r in sampled.items():
        report["models"][name]["pass_at_k"] = {"k": pass_k, "temperature": pass_temperature, "tasks": {
            task: {"pass1": p1, "passk": pk, "n": n} for task, (p1, pk, n) in r.items()}}
    write_text_file(report_path, json.dumps(report, indent=1, ensure_ascii=False))
    return results


def after_training(name, trained, out_dir, base_dir, base_stage, tok, data_dir, per_task, run, tasks=True,
                   evaluate_models=True, tests=None, score=None):
    """
    The training stages' last step: the model just trained (called name) beside the one it started
    from (base_dir, if any) on the held-out tasks (tasks: a chat model's; eval.json) and the built-in benchmark
    (benchmark.json; at most per_task items of each of its tasks); then the report card (report.md) with three
    samples. trained: the model in memory, its training state already freed by the caller; None (a sharded run)
    loads out_dir's checkpoint in the run's dtype. With LoRA adapters and the embeddings left as they were, the base
    is the same model with its adapters off (as stored for training: an int8 base answers as int8): no second model
    in memory; else the base is loaded in the run's dtype. evaluate_models=False: the card alone, from the logs
    (with samples when trained is given). tests, score: compare_on_tasks's (grpo.py's own task). Ctrl-C here leaves
    the trained model as it is.
    """
    # the decoders' dtype: on CPU float32 even after bf16 training, so the answers are evaluate.py's
    dtype = PTDTYPE[run.dtype if run.device_type != "cpu" else "float32"]
    base_name = model_name(base_stage, "base")
    base_name = "base" if base_name == name else base_name  # continued pretraining: "pretrained" twice
    try:
        if evaluate_models:
            if trained is None:
                trained, _, _ = load_model(out_dir, run.device, dtype)
            models = {name: (trained, tok, out_dir)}
            if base_dir and has_adapters(trained) and not trained.tok_embeddings.weight.requires_grad:
                models = {base_name: (trained, tok, base_dir, lambda: adapters_disabled(trained)), **models}
            elif base_dir:
                base_model, base_tok, _ = load_model(base_dir, run.device, dtype)
                models = {base_name: (base_model, base_tok, base_dir), **models}
            if tasks:
                compare_on_tasks(models, data_dir, per_task, os.path.join(out_dir, "eval.json"), tests=tests,
                                 score=score)
            exams.compare_on_benchmark(models, demo.benchmark_items(val_fraction, per_task),
                                       os.path.join(out_dir, "benchmark.json"), val_fraction, per_task)
        write_card(out_dir, trained, tok)
    except KeyboardInterrupt:
        raise SystemExit(f"\nevaluation interrupted; the model is saved: evaluate it any time with "
                         f"`python evaluate.py --out_dir={out_dir}`")


def balance_sentiment_labels(pairs, seed=0):
    """(pairs, how many were dropped): each label the chosen answer of equally many pairs, the surplus dropped at
    random. A model's errors lean one way, and DPO on them alone learned the lean: sentiment collapsed to one label
    (docs/experiments.md)."""
    by_label = {label: [] for label in demo.SENTIMENT_LABELS}  # a label no pair chooses keeps 0 of each
    for i, pair in enumerate(pairs):
        if pair["task"] == "sentiment":
            by_label[pair["chosen"]].append(i)
    keep = min(len(indices) for indices in by_label.values())
    rng = random.Random(seed)
    dropped = {i for indices in by_label.values() for i in rng.sample(indices, len(indices) - keep)}
    return [pair for i, pair in enumerate(pairs) if i not in dropped], len(dropped)


def write_onpolicy_pairs(model, tok, path, tasks, val_fraction, batch_size):
    """On-policy pairs as TRL's {"prompt", "chosen", "rejected"} JSONL (with the task): each greedy answer to a demo
    training question that scores below 1 is rejected, the true answer chosen, the sentiment labels balanced."""
    questions = [{"task": task, "messages": messages} for split, task, messages in demo.sft_examples(val_fraction)
                 if split == "train" and task in tasks]
    record, words = [], demo.idiom_words()
    t0 = time.time()
    results = evaluate_on_tasks(model, tok, questions, words, 0, batch_size, record)
    pairs = [{"prompt": question, "chosen": reference, "rejected": answer, "task": task}
             for task, question, reference, answer in record
             if answer.strip() and answer != reference and demo.score(task, question, reference, answer, words) < 1]
    pairs, dropped = balance_sentiment_labels(pairs)
    write_text_file(path, "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
    print(f"{len(record):,} training questions answered in {time.time() - t0:.0f}s ("
          + ", ".join(f"{task} {score * 100:.1f}%" for task, (score, _) in sorted(results.items()))
          + f"); {len(pairs):,} wrong answers written as DPO pairs to {path}"
          + (f" ({dropped:,} sentiment ones left out to balance the labels)" if dropped else ""))


def run_exams(model, tok, checkpoint, folders, report_path):
    """--ceval / --cmmlu: the model's accuracy on each local exam folder, printed by category and written to
    report_path with every question's prediction."""
    report_dir = os.path.dirname(os.path.abspath(report_path))
    if not writable(report_dir):
        raise SystemExit(f"error: cannot write {report_path}; pass --report=somewhere/exams.json")
    as_chat = bool(stage_of(checkpoint).chat) if chat == "auto" else chat in (True, "True", "true")
    report = {"checkpoint": out_dir, "shots": shots, "chat": as_chat, "chance": exams.CHANCE, "exams": {}}
    for kind, directory in folders:
        subjects, malformed = exams.read_exam(directory, kind)
        n_questions = sum(len(s["questions"]) for s in subjects.values())
        print(f"{kind}: {len(subjects)} subjects, {n_questions:,} questions from {directory}"
              + (f" ({malformed} malformed rows skipped)" if malformed else "")
              + f"; up to {shots} shots, {'in the chat template' if as_chat else 'as plain text'}")
        predictions, t0 = [], time.time()
        results = exams.run_exam(model, tok, subjects, shots, as_chat, model.args.max_seq_len, predictions)
        summary = exams.summarize(results, subjects)
        used = collections.Counter(tuple(r["shots"]) for r in summary["subjects"].values())
        print("shots used: " + ", ".join(f"{'-'.join(map(str, sorted(set(k)))) or 'none'} in {n} subject(s)"
                                         for k, n in sorted(used.items())))
        print(f"{'category':<24}{'accuracy':>10}{'centred':>10}{'n':>8}{'skipped':>9}{'fitted only':>13}   "
              f"({time.time() - t0:.0f}s; a skipped question, longer than the context, counts as wrong)")
        for name, r in [*summary["categories"].items(), ("overall", summary["overall"])]:
            fitted = f"{r['fitted_accuracy'] * 100:>12.1f}%" if r["fitted_accuracy"] is not None else f"{'-':>13}"
            print(f"{name:<24}{r['accuracy'] * 100:>9.1f}%{r['centred'] * 100:>9.1f}%{r['n']:>8}{r['skipped']:>9}"
                  f"{fitted}")
        report["exams"][kind] = dict(summary, directory=directory, malformed=malformed, predictions=predictions)
    write_text_file(report_path, json.dumps(report, indent=1, ensure_ascii=False))
    print(f"wrote {report_path}")


def main():
    config = configure(globals())
    check_ranges(config, at_least_0=("per_task", "shots", "pass_k", "pass_temperature"), at_least_1=("batch_size",))
    folders = [(kind, directory) for kind, directory in (("ceval", ceval), ("cmmlu", cmmlu)) if directory]
    for kind, directory in folders:
        if not os.path.isdir(directory):
            raise SystemExit(f"error: --{kind}={directory} is not a folder; pass the local {kind} folder")
    if require_model(out_dir) != "ours" and report_card:
        raise SystemExit(f"error: --report_card needs a run of this kit (out_dir/ckpt.pt) and {out_dir} holds none; "
                         f"an imported model has no run to report (--benchmark=True scores it)")
    if chat not in ("auto", "True", "true", "False", "false", True, False):
        raise SystemExit(f"error: --chat is auto, True or False, not {chat!r}")
    report_path = report or os.path.join(out_dir, "exams.json" if folders else "eval.json")
    # before minutes of answering: the questions exist, and what the run writes can be written
    target = onpolicy_pairs or (os.path.join(out_dir, "report.md") if report_card else
                                report_path if report or not benchmark else os.path.join(out_dir, "benchmark.json"))
    target_dir = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(target_dir) or not writable(target_dir):
        raise SystemExit(f"error: cannot write {target} ({target_dir} is not a writable directory); pass "
                         + ("another --onpolicy_pairs" if onpolicy_pairs else "--report=somewhere/report.json"))
    if not folders and not onpolicy_pairs and not benchmark and not report_card and load_tests(data_dir) is None:
        raise SystemExit(f"error: no {data_dir}/sft_test.jsonl: no held-out questions to evaluate on; pass the "
                         f"--data_dir prepare_data.py wrote")
    dev, dt = resolve_device(device, dtype)
    model, tok, checkpoint = load_model(out_dir, dev, PTDTYPE[dt])
    if folders:
        run_exams(model, tok, checkpoint, folders, report_path)
        return
    if base not in ("auto", "none") and not checkpoint_format(base):
        raise SystemExit(f"error: --base={base} is not a checkpoint directory or a Llama; pass an existing one, "
                         f"auto or none")
    if onpolicy_pairs:
        tasks = set(onpolicy_tasks.split(","))
        unknown = tasks - {"sentiment", "ner", "meaning", "pinyin", "origin", "example", "chain"}
        if unknown:
            raise SystemExit(f"error: --onpolicy_tasks: no demo task {sorted(unknown)[0]!r}")
        write_onpolicy_pairs(model, tok, onpolicy_pairs, tasks, val_fraction, batch_size)
        return
    models = {model_name(checkpoint.get("stage"), "model"): (model, tok, out_dir)}
    base_dir = checkpoint.get("base") if base == "auto" else None if base == "none" else base
    if base_dir:
        if checkpoint_format(base_dir):
            base_model, base_tok, base_checkpoint = load_model(base_dir, dev, PTDTYPE[dt])
            name = model_name(base_checkpoint.get("stage"), "base")
            models = {name if name not in models else "base": (base_model, base_tok, base_dir), **models}
        else:
            print(f"note: the base {base_dir} is gone; evaluating {out_dir} alone")
    try:
        if benchmark or report_card:
            exams.compare_on_benchmark(models, demo.benchmark_items(val_fraction, per_task),
                                       report if benchmark and report else os.path.join(out_dir, "benchmark.json"),
                                       val_fraction, per_task)
            if report_card:
                write_card(out_dir, model, tok)
            return
        extra = sentiment_baselines(load_tests(data_dir) or [], val_fraction) if baselines else None
        compare_on_tasks(models, data_dir, per_task, report_path, batch_size, extra, pass_k, pass_temperature)
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted: nothing was written")


if __name__ == "__main__":
    main()
