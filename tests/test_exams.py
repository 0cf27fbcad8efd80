"""C-Eval and CMMLU from local folders, asked as the harnesses ask them and scored by the letters' log-probabilities;
the built-in benchmark from held-out demo documents; chance-centred scores. The fixture folders are written here in
exactly the two sets' layouts, with invented questions."""
import csv
import json
import math
import shutil

import pytest
import torch

import exams
import demo
from checkpoint import load_model, save_checkpoint
from conftest import documents_in, run
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

SHOTS = [{"question": f"{a}加{b}等于多少？", "A": str(a + b), "B": str(a + b + 1), "C": str(a + b + 2),
          "D": str(a + b + 3), "answer": "A"} for a, b in ((1, 1), (2, 3), (4, 4), (5, 2), (3, 6))]
QUESTIONS = [{"question": "中国的首都是哪座城市？", "A": "上海", "B": "北京", "C": "广州", "D": "深圳", "answer": "B"},
             {"question": "“床前明月光”的作者是谁？", "A": "杜甫", "B": "白居易", "C": "李白", "D": "王维", "answer": "C"},
             {"question": "一年有几个季节？", "A": "两个", "B": "三个", "C": "五个", "D": "四个", "answer": "D"}]


@pytest.fixture(scope="module")
def untrained(demo_data, tmp_path_factory):
    """A random tiny model with a context long enough for a few shots, as a checkpoint directory."""
    out = tmp_path_factory.mktemp("untrained")
    tok = Tokenizer(f"{demo_data}/tokenizer.model")
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.n_words, max_seq_len=512)
    save_checkpoint(str(out / "ckpt.pt"), {"model": Transformer(args).state_dict(), "model_args": vars(args),
                                           "stage": "pretrain", "tokenizer_sha": tok.sha, "config": {}})
    shutil.copy(tok.model_path, out / "tokenizer.model")
    return str(out)


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def ceval_dir(tmp_path):
    """C-Eval's layout: {subject}_{split}.csv in dev/, val/, test/; a malformed row (answer "E") in one subject."""
    root = tmp_path / "ceval-exam"
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for subject in ("high_school_geography", "chinese_language_and_literature"):
        write_csv(root / "dev" / f"{subject}_dev.csv", header,
                  [[i, r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"], "因为"]
                   for i, r in enumerate(SHOTS)])
        rows = [[i, r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"], ""] for i, r in enumerate(QUESTIONS)]
        if subject == "high_school_geography":
            rows.append([9, "哪个不是颜色？", "红", "绿", "蓝", "跑", "E", ""])
        write_csv(root / "val" / f"{subject}_val.csv", header, rows)
        write_csv(root / "test" / f"{subject}_test.csv", header,
                  [[i, r["question"], r["A"], r["B"], r["C"], r["D"], "", ""] for i, r in enumerate(QUESTIONS)])
    (root / "subject_mapping.json").write_text(json.dumps({
        "high_school_geography": ["High School Geography", "高中地理", "STEM"],
        "chinese_language_and_literature": ["Chinese Language and Literature", "中国语言文学", "Humanities"]},
        ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture
def cmmlu_dir(tmp_path):
    """CMMLU's layout: {subject}.csv in dev/ and test/, an unnamed index column first."""
    root = tmp_path / "cmmlu"
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(root / "dev" / "world_history.csv", header,
              [[i, r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]] for i, r in enumerate(SHOTS)])
    write_csv(root / "test" / "world_history.csv", header,
              [[i, r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]] for i, r in enumerate(QUESTIONS)])
    return root


def test_both_layouts_are_read_and_a_malformed_row_is_counted_and_skipped(ceval_dir, cmmlu_dir):
    subjects, malformed = exams.read_exam(str(ceval_dir), "ceval")
    assert malformed == 1 and set(subjects) == {"high_school_geography", "chinese_language_and_literature"}
    geography = subjects["high_school_geography"]
    assert geography["name"] == "高中地理" and geography["category"] == "STEM"
    assert geography["questions"] == QUESTIONS and geography["shots"] == SHOTS  # val scored, dev as shots
    subjects, malformed = exams.read_exam(str(cmmlu_dir), "cmmlu")
    assert malformed == 0 and subjects["world_history"]["questions"] == QUESTIONS
    assert subjects["world_history"]["name"] == "world history"  # no subject_mapping.json: the file name


def test_a_k_shot_prompt_is_the_harness_text():
    prompt = exams.exam_prompt("高中地理", SHOTS[:2], QUESTIONS[0])
    assert prompt == ("以下是中国关于高中地理考试的单项选择题，请选出其中的正确答案。\n\n"
                      "1加1等于多少？\nA. 2\nB. 3\nC. 4\nD. 5\n答案：A\n\n"
                      "2加3等于多少？\nA. 5\nB. 6\nC. 7\nD. 8\n答案：A\n\n"
                      "中国的首都是哪座城市？\nA. 上海\nB. 北京\nC. 广州\nD. 深圳\n答案：")


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_the_letter_scores_are_the_models_log_probabilities_at_the_answer_position(untrained, chat):
    model, tok, _ = load_model(untrained)
    prompt = exams.exam_prompt("高中地理", SHOTS[:1], QUESTIONS[1])
    ids, continuations = exams.option_tokens(tok, prompt, exams.LETTERS, chat)
    assert all(len(c) == 1 for c in continuations)  # each letter one token there: one forward pass scores all four
    scores = exams.option_logprobs(model, ids, continuations)
    # independently: the full sequence's logits, the last position, the four letters' ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens, tokens)[0][0, -1]
    if not chat:
        letter_ids = [tok.encode(prompt + letter, bos=True)[-1] for letter in "ABCD"]
    else:  # an answer starts with the "▁" piece, shared by the four: it is part of the prompt
        assert tok.decode(ids[-1:]).strip() == ""
        letter_ids = [tok.encode(letter)[-1] for letter in "ABCD"]
    expected = torch.log_softmax(logits.double(), -1)[letter_ids]
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), expected, atol=1e-5, rtol=1e-5)


def test_chance_centred_scores():
    assert exams.centred(0.25, 0.25) == 0 and exams.centred(1.0, 0.25) == 1
    assert exams.centred(0.625, 0.25) == pytest.approx(0.5) and exams.centred(0.0, 0.5) == -1
    results = {"a": {"correct": 3, "scored": 3, "skipped": 0, "shots": [5, 5]},
               "b": {"correct": 0, "scored": 1, "skipped": 0, "shots": [0, 0]}}
    summary = exams.summarize(results, {"a": {"category": "X"}, "b": {"category": "X"}})
    assert summary["overall"] == {"accuracy": 0.75, "centred": pytest.approx(2 / 3), "n": 4, "skipped": 0,
                                  "fitted_accuracy": 0.75}  # each question alike


def test_a_question_too_long_for_the_context_is_counted_and_scored_as_wrong():
    results = {"a": {"correct": 2, "scored": 2, "skipped": 2, "shots": [0, 5]}}
    summary = exams.summarize(results, {"a": {"category": "X"}})
    assert summary["overall"]["accuracy"] == 0.5 and summary["overall"]["fitted_accuracy"] == 1.0
    assert summary["overall"]["n"] == 4 and summary["overall"]["skipped"] == 2
    assert summary["subjects"]["a"]["shots"] == [0, 5]


def test_evaluate_scores_a_checkpoint_on_local_exam_folders(untrained, ceval_dir, cmmlu_dir, tmp_path):
    report = tmp_path / "exams.json"
    p = run("evaluate.py", f"--out_dir={untrained}", f"--ceval={ceval_dir}", f"--cmmlu={cmmlu_dir}", "--shots=2",
            f"--report={report}")
    assert "1 malformed rows skipped" in p.out and "overall" in p.out
    r = json.loads(report.read_text(encoding="utf-8"))
    assert r["chat"] is False and r["shots"] == 2  # a pretrained model is asked in plain text
    ceval = r["exams"]["ceval"]
    assert ceval["overall"]["n"] == 6 and set(ceval["categories"]) == {"STEM", "Humanities"}
    assert len(ceval["predictions"]) == 6 and all(q["predicted"] in "ABCD" for q in ceval["predictions"])
    correct = sum(q["predicted"] == q["answer"] for q in ceval["predictions"])
    assert ceval["overall"]["accuracy"] == pytest.approx(correct / 6)
    assert r["exams"]["cmmlu"]["overall"]["n"] == 3


def test_skipped_questions_missing_shots_and_gbk_files_are_said_in_the_output(untrained, cmmlu_dir, tmp_path):
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    long_question = "很长的题目。" * 200  # longer than the model's 512-token context on its own
    rows = [[i, r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]] for i, r in enumerate(QUESTIONS)]
    write_csv(cmmlu_dir / "test" / "world_history.csv", header, rows + [[3, long_question, "甲", "乙", "丙", "丁", "A"]])
    with open(cmmlu_dir / "test" / "ancient_chinese.csv", "w", encoding="gbk", newline="") as f:  # no dev rows
        csv.writer(f).writerows([header] + rows)
    report = tmp_path / "exams.json"
    p = run("evaluate.py", f"--out_dir={untrained}", f"--cmmlu={cmmlu_dir}", "--shots=2", f"--report={report}")
    cmmlu = json.loads(report.read_text(encoding="utf-8"))["exams"]["cmmlu"]
    assert cmmlu["overall"]["n"] == 7 and cmmlu["overall"]["skipped"] == 1 and "skipped" in p.out
    assert cmmlu["subjects"]["world_history"]["shots"] == [2, 2] and cmmlu["subjects"]["ancient_chinese"]["shots"] \
        == [0, 0] and "shots used: 0 in 1 subject(s), 2 in 1 subject(s)" in p.out
    scored = cmmlu["predictions"]
    assert len(scored) == 6 and cmmlu["overall"]["accuracy"] == pytest.approx(
        sum(q["predicted"] == q["answer"] for q in scored) / 7)  # the skipped question counts as wrong
    assert {q["subject"] for q in scored} == {"world_history", "ancient_chinese"}  # the GBK file was read
    write_csv(cmmlu_dir / "test" / "five.csv", header + ["E"], [r + ["戊"] for r in rows])
    p = run("evaluate.py", f"--out_dir={untrained}", f"--cmmlu={cmmlu_dir}", check=False)
    assert p.returncode != 0 and "Traceback" not in p.out and "five.csv has an option column E" in p.out


def test_an_exam_folder_in_the_wrong_layout_is_one_line(tiny_ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    p = run("evaluate.py", f"--out_dir={tiny_ckpt}", f"--ceval={tmp_path / 'empty'}", check=False)
    assert p.returncode != 0 and "has no val/ folder" in p.out and "Traceback" not in p.out


@pytest.fixture(scope="module")
def builtin_items():
    return demo.benchmark_items(0.01)


def test_the_builtin_benchmark_is_fixed_and_its_items_are_never_trained_on(demo_data, builtin_items):
    assert demo.benchmark_items(0.01) == builtin_items  # the same items every time
    assert all(len(items) >= 150 for items in builtin_items.values()) and len(builtin_items) == 4
    # the text pretraining really reads: the train shards prepare_data.py wrote, decoded
    tok = Tokenizer(f"{demo_data}/tokenizer.model")
    train_text = "\n".join(documents_in(demo_data, "train", tok))
    for task, items in builtin_items.items():
        for candidates, answer, mode in items:
            context, continuation = candidates[answer]
            key = {"idiom_completion": context + continuation, "idiom_meaning": continuation,
                   "news_order": continuation, "review_sentiment": context.split("\n")[0]}[task]
            assert key not in train_text, (task, key)


def test_an_untrained_model_scores_chance_on_every_builtin_task(untrained, builtin_items):
    model, tok, _ = load_model(untrained)
    results = exams.run_benchmark(model, tok, builtin_items)
    for task, (accuracy, n, chance) in results.items():
        assert n == len(builtin_items[task])
        assert abs(accuracy - chance) < 2.58 * math.sqrt(chance * (1 - chance) / n), (task, accuracy)  # 99% interval


def test_a_continuation_is_scored_by_its_mean_log_probability_and_a_shared_ending_by_its_sum(untrained):
    model, tok, _ = load_model(untrained)
    candidates = [("床前明月", "光"), ("床前明月", "亮")]
    scores = exams.choice_scores(model, tok, candidates, "continuation")
    for (context, continuation), score in zip(candidates, scores):  # by hand: every token after the shared start
        seq = tok.encode(context + continuation, bos=True)
        start = next(i for i in range(len(seq)) if any(tok.encode(c + x, bos=True)[i] != seq[i] for c, x in candidates))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq]), torch.tensor([seq]))[0][0].double(), -1)
        expected = sum(float(logp[j - 1, seq[j]]) for j in range(start, len(seq))) / (len(seq) - start)
        assert score == pytest.approx(expected, abs=1e-4)


def test_evaluate_runs_the_builtin_benchmark(untrained, tmp_path):
    p = run("evaluate.py", f"--out_dir={untrained}", "--benchmark=True", f"--report={tmp_path / 'b.json'}")
    assert "headline (centred)" in p.out
    r = json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))["models"]["pretrained"]
    assert set(r["tasks"]) == {"idiom_completion", "idiom_meaning", "news_order", "review_sentiment"}
    assert r["headline"] == pytest.approx(sum(t["centred"] for t in r["tasks"].values()) / 4)
