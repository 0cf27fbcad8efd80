"""
Multiple-choice yardsticks, scored by log-likelihood (evaluate.py's --ceval, --cmmlu): C-Eval and CMMLU
read from local folders (their licences forbid shipping them, and nothing downloads at run time), asked as
the common harnesses ask them, and scored by the log-probability the model gives each option's letter.

    python evaluate.py --out_dir=out-sft --ceval=ceval-exam/ --shots=5
    python evaluate.py --out_dir=llama/llama-2-7b --cmmlu=cmmlu/ --shots=0

Layouts, as the two sets are distributed:
- C-Eval: dev/, val/, test/ of {subject}_{split}.csv, columns id,question,A,B,C,D,answer,explanation.
  Scored on val (test has no answers); dev's five rows per subject are the shots.
- CMMLU: dev/ and test/ of {subject}.csv, an unnamed index column then Question,A,B,C,D,Answer. Scored on
  test; dev's rows are the shots.
A subject_mapping.json beside the folders ({subject: [English name, Chinese name, category]}, as C-Eval's
repository ships one) gives the subjects' Chinese names for the prompt and their categories; without
one, the file name stands in for both.

Every score is reported raw and centred on chance, (accuracy - chance) / (1 - chance): 0 at chance, 1
when every answer is right, so that tasks with different numbers of options average fairly.
"""
import contextlib
import csv
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from tokenizer import sniff_encoding, write_text_file

LETTERS = "ABCD"
CHANCE = 1 / len(LETTERS)
EXAMS = {"ceval": ("val", "{subject}_{split}.csv"), "cmmlu": ("test", "{subject}.csv")}  # scored split, file name


def centred(accuracy, chance):
    """Accuracy rescaled so that chance is 0 and a perfect score 1 (negative below chance)."""
    return (accuracy - chance) / (1 - chance)


def read_rows(path):
    """(the rows of one subject file as {question, A, B, C, D, answer}, how many were malformed). UTF-8 or
    GB18030 (as prepare_data.py decides); a file with a fifth option column is refused: these exams have four."""
    rows, malformed = [], 0
    encoding = sniff_encoding(path)
    with open(path, encoding="utf-8-sig" if encoding == "utf-8" else encoding, errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        if "e" in {(k or "").strip().lower() for k in reader.fieldnames or []}:
            raise SystemExit(f"error: {path} has an option column E; C-Eval and CMMLU questions have four options "
                             f"(A-D), and a fifth would never be chosen: leave the file out")
        for record in reader:
            fields = {k.strip().lower(): (v or "").strip() for k, v in record.items() if k is not None}
            row = {key: fields.get(key, "") for key in ("question", "a", "b", "c", "d", "answer")}
            if not all(row.values()) or row["answer"] not in LETTERS or None in record:
                malformed += 1  # a missing field, an answer that is not a letter, a row with extra columns
                continue
            rows.append({"question": row["question"], "A": row["a"], "B": row["b"], "C": row["c"], "D": row["d"],
                         "answer": row["answer"]})
    return rows, malformed


def read_exam(directory, kind):
    """{subject: {"name": Chinese name, "category": str, "questions": rows, "shots": rows}} from a local C-Eval
    or CMMLU folder (kind "ceval" or "cmmlu"), and the number of malformed rows skipped."""
    split, pattern = EXAMS[kind]
    folder = os.path.join(directory, split)
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {directory} has no {split}/ folder; --{kind} takes the folder that holds "
                         f"{'dev/, val/ and test/' if kind == 'ceval' else 'dev/ and test/'} as the set is distributed")
    mapping = {}
    for candidate in (os.path.join(directory, "subject_mapping.json"),
                      os.path.join(os.path.dirname(os.path.abspath(directory)), "subject_mapping.json")):
        if os.path.exists(candidate):
            with open(candidate, encoding="utf-8") as f:
                mapping = json.load(f)
            break
    suffix = pattern.format(subject="", split=split)
    subjects, malformed = {}, 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(suffix):
            continue
        subject = name[:-len(suffix)]
        questions, bad = read_rows(os.path.join(folder, name))
        shots_path = os.path.join(directory, "dev", pattern.format(subject=subject, split="dev"))
        shots, bad_shots = read_rows(shots_path) if os.path.exists(shots_path) else ([], 0)
        malformed += bad + bad_shots
        _, zh_name, category = (mapping.get(subject) or [subject, subject.replace("_", " "), "all"])[:3]
        subjects[subject] = {"name": zh_name, "category": category, "questions": questions, "shots": shots}
    if not subjects:
        raise SystemExit(f"error: {folder} holds no {pattern.format(subject='*', split=split)} files")
    return subjects, malformed


def exam_prompt(subject_name, shots, row):
    """The question as the harnesses ask it: the header, each shot answered, then the question up to 答案：."""
    def block(r):
        return r["question"] + "".join(f"\n{letter}. {r[letter]}" for letter in LETTERS) + "\n答案："
    header = f"以下是中国关于{subject_name}考试的单项选择题，请选出其中的正确答案。\n\n"
    return header + "".join(block(shot) + shot["answer"] + "\n\n" for shot in shots) + block(row)


def option_tokens(tok, prompt, options, chat):
    """
    (prompt ids, [continuation ids of each option]). A base model reads the prompt as plain text, each option as
    what encoding prompt + option adds (refused where an option merges with the prompt's last piece); a chat
    model reads the prompt as a user turn, each option as an answer begins.
    """
    if chat:
        ids, _ = tok.encode_chat([{"role": "user", "content": prompt}])
        continuations = [tok.encode(option) for option in options]
    else:
        ids = tok.encode(prompt, bos=True)
        continuations = []
        for option in options:
            full = tok.encode(prompt + option, bos=True)
            if full[:len(ids)] != ids:  # the option merged into the prompt's last piece: options not comparable
                raise SystemExit(f"error: {tok.model_path} merges the answer {option!r} with the end of the prompt "
                                 f"({prompt[-10:]!r}); this prompt cannot be scored option by option with it")
            continuations.append(full[len(ids):])
    # a start all options share (an answer's leading "▁" piece) adds the same log-probability to each: it joins the
    # prompt, so that one-letter options are one token each and one forward pass scores them all
    while all(len(c) > 1 and c[0] == continuations[0][0] for c in continuations):
        ids = ids + continuations[0][:1]
        continuations = [c[1:] for c in continuations]
    return ids, continuations


@torch.no_grad()
def option_logprobs(model, ids, continuations):
    """The log-probability of each continuation after ids (the sum over its tokens): one forward pass when each
    is one token (the letters), else one per continuation."""
    device = next(model.parameters()).device
    if all(len(cont) == 1 for cont in continuations):
        logits = model(torch.tensor([ids], device=device))[0][0, -1].float()  # (V,): the next token after ids
        logp = torch.log_softmax(logits, dim=-1)
        return [float(logp[cont[0]]) for cont in continuations]
    scores = []
    for cont in continuations:
        tokens = torch.tensor([ids + cont[:-1]], device=device)
        targets = torch.tensor([[-1] * (len(ids) - 1) + cont], device=device)
        scores.append(-float(model(tokens, targets, reduction="none")[1].sum()))  # minus the cross-entropy
    return scores


def run_exam(model, tok, subjects, shots, chat, max_seq_len, predictions=None):
    """
    {subject: {"correct", "scored", "skipped", "shots"}} for the model on every subject's questions with up to
    `shots` dev rows before each (fewer where the subject has fewer). A prompt longer than the context drops
    shots (from the first) until it fits; a question that does not fit alone is skipped, and counted (it
    scores as wrong in the headline). "shots": the fewest and most shots its questions were asked with.
    predictions: a list to append {subject, index, answer, predicted, logprobs} to.
    """
    results = {}
    total = sum(len(s["questions"]) for s in subjects.values())
    bar = tqdm(total=total, desc="questions", unit="q", leave=False, dynamic_ncols=True)
    for subject, s in subjects.items():
        r = results[subject] = {"correct": 0, "scored": 0, "skipped": 0, "shots": []}
        for index, row in enumerate(s["questions"]):
            bar.update(1)
            for k in range(min(shots, len(s["shots"])), -1, -1):
                ids, continuations = option_tokens(tok, exam_prompt(s["name"], s["shots"][:k], row), LETTERS, chat)
                if len(ids) + max(map(len, continuations)) <= max_seq_len:
                    break
            else:
                r["skipped"] += 1
                continue
            logprobs = option_logprobs(model, ids, continuations)
            predicted = LETTERS[int(np.argmax(logprobs))]
            r["correct"] += predicted == row["answer"]
            r["scored"] += 1
            r["shots"] = [min(r["shots"] + [k]), max(r["shots"] + [k])]
            if predictions is not None:
                predictions.append({"subject": subject, "index": index, "answer": row["answer"],
                                    "predicted": predicted, "logprobs": [round(x, 4) for x in logprobs]})
    bar.close()
    return results


def summarize(results, subjects):
    """
    {"subjects": ..., "categories": ..., "overall": ...}, each {accuracy, centred, n, skipped, fitted_accuracy}:
    accuracy counts a skipped question (too long for the context) as wrong, so that a model is never scored on
    an easier, shorter subset without a word; fitted_accuracy is over the questions asked. Categories and the
    overall score weigh every question alike.
    """
    def entry(rs):
        correct, scored, skipped = (sum(r[key] for r in rs) for key in ("correct", "scored", "skipped"))
        accuracy = correct / (scored + skipped) if scored + skipped else 0.0
        return {"accuracy": accuracy, "centred": centred(accuracy, CHANCE), "n": scored + skipped,
                "skipped": skipped, "fitted_accuracy": correct / scored if scored else None}
    categories = {}
    for subject, r in results.items():
        categories.setdefault(subjects[subject]["category"], []).append(r)
    return {"subjects": {s: dict(entry([r]), shots=r["shots"]) for s, r in results.items()},
            "categories": {c: entry(rs) for c, rs in sorted(categories.items())},
            "overall": entry(list(results.values()))}


# ---------------------------------------------------------------------------- the built-in benchmark

@torch.no_grad()
def choice_scores(model, tok, candidates, mode):
    """
    The score of each candidate (context, continuation) of one item, all in one batch. The candidates are
    encoded whole ([BOS] + context + continuation, so that no tokenization seam differs between them);
    mode "continuation": the mean log-probability of the tokens after the candidates' common start (a mean,
    so that a candidate split into more tokens is not worse for it: an untrained model scores chance);
    mode "context": the summed log-probability of their common ending, the text they all predict.
    """
    seqs = [tok.encode(context + continuation, bos=True) for context, continuation in candidates]
    shortest = min(map(len, seqs))
    start = next((i for i in range(shortest) if len({s[i] for s in seqs}) > 1), shortest)
    end = next((i for i in range(1, shortest - start + 1) if len({s[-i] for s in seqs}) > 1), shortest - start + 1) - 1
    device = next(model.parameters()).device
    T = max(map(len, seqs)) - 1
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    targets = torch.full((len(seqs), T), -1, dtype=torch.long)
    for row, s in enumerate(seqs):
        tokens[row, :len(s) - 1] = torch.tensor(s[:-1])
        first = max(start, 1) if mode == "continuation" else len(s) - max(end, 1)  # the first scored token
        targets[row, first - 1:len(s) - 1] = torch.tensor(s[first:])  # position j predicts token j + 1
    logp = -model(tokens.to(device), targets.to(device), reduction="none")[1].float().cpu()  # (B, T), 0 off target
    sums, counts = logp.sum(1), (targets >= 0).sum(1)
    return (sums / counts if mode == "continuation" else sums).tolist()


def run_benchmark(model, tok, items):
    """{task: (accuracy, n, chance)} of the model on the built-in benchmark's items (demo.benchmark_items);
    an item longer than the model's context is skipped."""
    results = {}
    for task, task_items in items.items():
        correct, n = 0, 0
        for candidates, answer, mode in tqdm(task_items, desc=task, unit="item", leave=False, dynamic_ncols=True):
            if max(len(tok.encode(c + x, bos=True)) for c, x in candidates) > model.args.max_seq_len:
                continue
            scores = choice_scores(model, tok, candidates, mode)
            correct += int(np.argmax(scores)) == answer
            n += 1
        results[task] = (correct / n if n else 0.0, n, 1 / len(task_items[0][0]))
    return results


def headline(results):
    """The mean of the tasks' chance-centred scores: one number (nanochat's CORE does the same)."""
    return float(np.mean([centred(accuracy, chance) for accuracy, _, chance in results.values()]))


def compare_on_benchmark(models, items, report_path, val_fraction, per_task=0):
    """
    {name: {task: (accuracy, n, chance)}} of every model (as evaluate.compare_on_tasks takes them) on the built-in
    benchmark: prints raw and chance-centred scores with the headline (the mean centred score), and writes them
    to report_path with per_task (the bound the items were drawn with, for the report card).
    """
    t0 = time.time()
    results = {}
    for name, (model, tok, _, *context) in models.items():
        with context[0]() if context else contextlib.nullcontext():
            results[name] = run_benchmark(model, tok, items)
    print(f"built-in benchmark ({time.time() - t0:.0f}s; accuracy, and centred: 0 at chance, 100 all right):")
    print(f"{'task':<20}{'chance':>8}" + "".join(f"{name:>22}" for name in results))
    for task in items:
        cells = "".join(f"{a * 100:>8.1f}% ({centred(a, c) * 100:>5.1f}) n={n:<3}"
                        for a, n, c in (r[task] for r in results.values()))
        print(f"{task:<20}{next(iter(results.values()))[task][2] * 100:>7.0f}%{cells}")
    print(f"{'headline (centred)':<28}" + "".join(f"{headline(r) * 100:>22.1f}" for r in results.values()))
    report = {"val_fraction": val_fraction, "per_task": per_task, "models": {
        name: {"checkpoint": source, "headline": headline(results[name]), "tasks": {
            task: {"accuracy": a, "centred": centred(a, c), "chance": c, "n": n}
            for task, (a, n, c) in results[name].items()}}
        for name, (_, _, source, *_) in models.items()}}
    write_text_file(report_path, json.dumps(report, indent=1, ensure_ascii=False))
    return results
