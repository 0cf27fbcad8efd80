"""prepare_data.py: every input format, bad input counted not fatal, exact token files, and masks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data_formats
from conftest import ROOT, documents_in, run
from tokenizer import Tokenizer, is_val


def prepare(tmp_path, demo_data, *args):
    out = tmp_path / "out"
    p = run("prepare_data.py", f"--data_dir={out}", f"--tokenizer_model={demo_data}/tokenizer.model", *args)
    return str(out), p.out


def test_token_files_decode_back_to_the_source_documents(tmp_path, demo_data):
    source = [f"第{i}篇：床前明月光，疑是地上霜。\n举头望明月 low  head 😀 {i * 7919}" for i in range(400)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in source), encoding="utf-8")
    out, log = prepare(tmp_path, demo_data, f"--input={path}", "--sft_input=", "--val_fraction=0.2")
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    train, val = documents_in(out, "train", tok), documents_in(out, "val", tok)
    assert sorted(train + val) == sorted(source)
    assert train == [d for d in source if d in set(train)]  # order kept within a split
    assert not set(train) & set(val) and 40 < len(val) < 130  # disjoint; about a fifth held out
    meta = json.load(open(os.path.join(out, "train_000.json")))
    assert meta["documents"] == len(train) and meta["chars"] == sum(map(len, train))
    assert meta["tokens"] == os.path.getsize(os.path.join(out, "train_000.bin")) // 2
    assert meta["tokenizer_sha"] == tok.sha and meta["dtype"] == "uint16"


def test_the_split_is_a_function_of_the_text_alone():
    docs = [f"文档{i}" for i in range(2000)]
    val = {d for d in docs if is_val(d, 0.1)}
    assert 150 < len(val) < 250  # about the fraction asked for
    # the same in another process (no dependence on Python's per-process hash seed) and in another order
    code = "import sys; sys.path.insert(0, %r); from tokenizer import is_val; " \
           "print(sum(1 << i for i in range(2000) if is_val(f'文档{i}', 0.1)))" % ROOT
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONHASHSEED="123"), check=True).stdout
    assert int(other) == sum(1 << i for i, d in enumerate(docs) if d in val)
    assert {d for d in reversed(docs) if is_val(d, 0.1)} == val
    # a larger fraction holds out a superset: the demo's 5% of reviews for the sentiment test contains the 1% val
    assert val <= {d for d in docs if is_val(d, 0.3)} and not val & {d for d in docs if not is_val(d, 0.1)}


def test_bad_lines_are_counted_and_good_ones_kept(tmp_path, demo_data):
    raw = (b"\xef\xbb\xbf" + json.dumps({"text": "第一行有BOM"}, ensure_ascii=False).encode() + b"\r\n"
           + b"\n"                                                # empty line
           + b'{"text": "broken json\n'                           # invalid JSON
           + b'{"title": "no text field"}\n'                      # missing field
           + b'{"text": 42}\n'                                    # non-string field
           + b'{"text": "bad \xff byte"}\n'                       # invalid UTF-8
           + json.dumps({"text": "行一\r\n行二"}, ensure_ascii=False).encode() + b"\n"  # CRLF inside the text
           + b'{"text": "   "}\n'                                 # whitespace only
           + json.dumps({"text": "最后一行"}, ensure_ascii=False).encode() + b"\n")
    path = tmp_path / "messy.jsonl"
    path.write_bytes(raw)
    out, log = prepare(tmp_path, demo_data, f"--input={path}", "--sft_input=", "--val_fraction=0")
    summary = next(line for line in log.splitlines() if "messy.jsonl" in line)
    for expected in ["4 kept", "1 BOM removed", "1 empty lines skipped", "1 invalid JSON lines skipped",
                     "1 records without a text/completion/content field skipped", "1 records with a non-string text skipped",
                     "1 lines with invalid UTF-8 repaired", "1 with CR line ends repaired", "1 empty skipped"]:
        assert expected in summary, (expected, summary)
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    assert documents_in(out, "train", tok) == ["第一行有BOM", "bad \ufffd byte", "行一\n行二", "最后一行"]


def test_a_json_array_is_streamed_across_chunk_boundaries(tmp_path):
    records = [{"completion": f"第{i}条" + "长" * (i % 37), "n": [i, {"x": "]"}]} for i in range(300)]
    path = tmp_path / "wiki.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    counts = data_formats.Counts()

    class NoBar:
        def update(self, n):
            pass

    got = list(data_formats.read_json_values(str(path), counts, NoBar(), chunk_chars=64))
    assert got == records and not counts


def test_plain_text_documents_are_separated_by_blank_lines(tmp_path, demo_data):
    path = tmp_path / "book.txt"
    path.write_text("第一段第一行\n第一段第二行\n\n\n第二段\n\n第三段\n", encoding="utf-8")
    out, _ = prepare(tmp_path, demo_data, f"--input={path}", "--sft_input=", "--val_fraction=0")
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    assert documents_in(out, "train", tok) == ["第一段第一行\n第一段第二行", "第二段", "第三段"]


@pytest.mark.parametrize("bad, message", [("missing.jsonl", "does not exist"), ("empty.jsonl", "is empty"),
                                          ("notes.csv", "unsupported file type")])
def test_a_bad_input_path_is_a_one_line_error(tmp_path, demo_data, bad, message):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "notes.csv").write_text("a,b\n")
    p = run("prepare_data.py", f"--input={tmp_path / bad}", f"--data_dir={tmp_path / 'o'}", check=False)
    assert p.returncode != 0 and message in p.out and "Traceback" not in p.out


def test_sft_formats_become_masked_conversations(tmp_path, demo_data):
    records = [
        {"instruction": "把这句话翻译成英文", "input": "你好", "output": "Hello"},
        {"conversations": [{"from": "human", "value": "一加一等于几？"}, {"from": "gpt", "value": "二"},
                           {"from": "human", "value": "再加一呢？"}, {"from": "gpt", "value": "三"}]},
        {"messages": [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
                      {"role": "assistant", "content": "你好！"}]},
        [{"role": "user", "content": "天空是什么颜色？"}, {"role": "assistant", "content": "蓝色"}],
        {"conversations": [{"from": "gpt", "value": "answer first is not a conversation"}]},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out, log = prepare(tmp_path, demo_data, "--input=", f"--sft_input={path}", "--val_fraction=0")
    assert "1 records that are not a conversation skipped" in log
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    tokens = np.fromfile(os.path.join(out, "sft_train.bin"), dtype=np.uint16)
    mask = np.fromfile(os.path.join(out, "sft_train_mask.bin"), dtype=np.uint8)
    index = np.load(os.path.join(out, "sft_train_index.npy"))
    assert len(index) == 5 and index[-1] == len(tokens) == len(mask)
    answers = []
    for a, b in zip(index, index[1:]):
        ids, m = tokens[a:b].tolist(), mask[a:b].tolist()
        # the masked positions are exactly the answers, each closed by EOS
        spans, cur = [], []
        for t, k in zip(ids, m):
            if k:
                cur.append(t)
                if t == tok.eos_id:
                    spans.append(tok.decode(cur[:-1]))
                    cur = []
        assert not cur
        answers.append(spans)
    assert answers == [["Hello"], ["二", "三"], ["你好！"], ["蓝色"]]
    first = tokens[index[0]:index[1]].tolist()
    assert tok.decode(first[:first.index(tok.eos_id)]).startswith("[INST] 把这句话翻译成英文\n你好 [/INST]")


def test_long_conversations_are_cut_at_a_turn_boundary_or_skipped(tmp_path, demo_data):
    long_turns = [{"role": r, "content": "很长的话" * 20} for r in ("user", "assistant") * 3]
    too_long_first = [{"role": "user", "content": "很长的话" * 200}, {"role": "assistant", "content": "好"}]
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": long_turns}, ensure_ascii=False) + "\n"
                    + json.dumps({"messages": too_long_first}, ensure_ascii=False) + "\n", encoding="utf-8")
    out, log = prepare(tmp_path, demo_data, "--input=", f"--sft_input={path}", "--val_fraction=0", "--block_size=150")
    assert "1 truncated at a turn boundary" in log and "1 skipped: first turn longer than block_size" in log
    tokens = np.fromfile(os.path.join(out, "sft_train.bin"), dtype=np.uint16)
    assert 0 < len(tokens) <= 150 and tokens[-1] == 2  # ends with a whole answer's EOS


def test_output_with_two_workers_equals_output_with_one(tmp_path, demo_data):
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run("prepare_data.py", f"--data_dir={out}", f"--workers={workers}",
            f"--tokenizer_model={demo_data}/tokenizer.model")
        outputs.append({name: (out / name).read_bytes() for name in sorted(os.listdir(out))})
    assert outputs[0].keys() == outputs[1].keys() and outputs[0] == outputs[1]


def test_demo_sft_test_questions_never_occur_in_training_text(demo_data):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    train_docs = documents_in(demo_data, "train", tok)
    train_text, train_doc_set = "\n".join(train_docs), set(train_docs)
    tests = [json.loads(line) for line in open(os.path.join(demo_data, "sft_test.jsonl"), encoding="utf-8")]
    tasks = {t["task"] for t in tests}
    assert {"sentiment", "meaning", "pinyin", "chain", "ner", "origin", "example"} <= tasks
    # enough held-out reviews for an accuracy worth quoting (~+-1.3 points, not the +-3 that val_fraction's 1% gives)
    assert sum(t["task"] == "sentiment" for t in tests) > 600
    for t in tests:
        question = t["messages"][0]["content"]
        if t["task"] == "sentiment":
            review = question.split("\n", 1)[1]
            assert review not in train_doc_set
            assert len(review) < 20 or review not in train_text  # a short review can be a common phrase
        elif t["task"] in ("meaning", "pinyin"):
            idiom = question.split("”")[0].lstrip("“")
            assert f"\n{idiom}（" not in train_text and not train_text.startswith(f"{idiom}（")
        elif t["task"] == "ner":
            assert question.split("：", 1)[1] not in train_text


def test_an_extension_that_comes_out_short_of_vocab_size_says_so(demo_data, tmp_path):
    poems = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"]
    (tmp_path / "poems.txt").write_text("\n\n".join(poems * 20), encoding="utf-8")
    p = run("prepare_data.py", f"--input={tmp_path / 'poems.txt'}", "--sft_input=", "--dpo_input=",
            f"--extend_tokenizer={demo_data}/tokenizer.model", "--vocab_size=9000", f"--data_dir={tmp_path / 'out'}")
    n = Tokenizer(str(tmp_path / "out" / "tokenizer.model")).n_words
    assert 8192 < n < 9000  # a little text has few Chinese pieces the demo tokenizer lacks
    assert f"warning: {n} pieces, {9000 - n} fewer than --vocab_size=9000" in p.out


def test_the_old_out_dir_flag_still_names_the_data_folder_with_a_note(tmp_path, demo_data):
    path = tmp_path / "docs.txt"
    path.write_text("床前明月光，疑是地上霜。\n\n举头望明月，低头思故乡。\n", encoding="utf-8")
    p = run("prepare_data.py", f"--input={path}", "--sft_input=", "--dpo_input=", "--val_fraction=0",
            f"--tokenizer_model={demo_data}/tokenizer.model", f"--out_dir={tmp_path / 'old'}")
    assert "note: --out_dir is now --data_dir" in p.out
    assert (tmp_path / "old" / "train_000.bin").stat().st_size > 0


def write_parquet(path, rows, rows_per_group):
    pa = pytest.importorskip("pyarrow", reason="pyarrow reads Parquet (pip install pyarrow)")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=rows_per_group)


@pytest.mark.parametrize("workers", [1, 2])
def test_parquet_gives_the_token_files_the_same_rows_as_jsonl_give(tmp_path, demo_data, workers):
    docs = [{"text": f"第{i}篇：床前明月光，疑是地上霜。" * (1 + i % 5), "id": i} for i in range(3000)]
    docs[5]["text"], docs[77]["text"] = None, "   "  # bad rows: counted and skipped alike
    write_parquet(tmp_path / "docs.parquet", docs, rows_per_group=500)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                         encoding="utf-8")
    outputs = {}
    for name in ("docs.parquet", "docs.jsonl"):
        out = tmp_path / name.replace(".", "_")
        p = run("prepare_data.py", f"--input={tmp_path / name}", "--sft_input=", "--dpo_input=", f"--data_dir={out}",
                f"--tokenizer_model={demo_data}/tokenizer.model", f"--workers={workers}", "--val_fraction=0.1")
        assert "1 records with a non-string text skipped" in p.out and "1 empty skipped" in p.out
        outputs[name] = {f: (out / f).read_bytes() for f in ("train_000.bin", "val_000.bin")}
    assert outputs["docs.parquet"] == outputs["docs.jsonl"]


def test_parquet_sft_rows_in_the_known_layouts_and_a_named_text_column(tmp_path, demo_data):
    belle = [{"instruction": f"问题{i}：一加一等于几？", "input": "", "output": "二。"} for i in range(40)]
    sharegpt = [{"conversations": [{"from": "human", "value": f"你好{i}"}, {"from": "gpt", "value": "你好！"}]}
                for i in range(40)]
    write_parquet(tmp_path / "belle.parquet", belle, rows_per_group=16)
    write_parquet(tmp_path / "sharegpt.parquet", sharegpt, rows_per_group=16)
    write_parquet(tmp_path / "corpus.parquet", [{"body": f"正文{i}。"} for i in range(50)], rows_per_group=16)
    p = run("prepare_data.py", f"--input={tmp_path / 'corpus.parquet'}", "--text_field=body",
            f"--sft_input={tmp_path / 'belle.parquet'},{tmp_path / 'sharegpt.parquet'}", "--dpo_input=",
            f"--data_dir={tmp_path / 'out'}", f"--tokenizer_model={demo_data}/tokenizer.model", "--val_fraction=0.1")
    assert "belle.parquet: 40 kept" in p.out and "sharegpt.parquet: 40 kept" in p.out
    assert "corpus.parquet: 50 kept" in p.out
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    p = run("prepare_data.py", f"--input={tmp_path / 'broken.parquet'}", "--sft_input=", "--dpo_input=",
            f"--data_dir={tmp_path / 'o2'}", f"--tokenizer_model={demo_data}/tokenizer.model", check=False)
    assert p.returncode == 1 and "Traceback" not in p.out and "is not a readable Parquet file" in p.out


def test_a_parquet_file_is_read_one_row_group_at_a_time(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow reads Parquet (pip install pyarrow)")
    text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 40
    write_parquet(tmp_path / "big.parquet", [{"text": f"{i}{text}"} for i in range(20_000)], rows_per_group=1000)
    file_bytes = 20_000 * len(text.encode("utf-8"))  # about 20 MB of text in 20 row groups

    class Bar:
        def update(self, n):
            pass

    peak, n = 0, 0
    for record in data_formats.read_parquet_records(str(tmp_path / "big.parquet"), data_formats.Counts(), Bar(),
                                                    columns=("text",)):
        n += 1
        peak = max(peak, pa.total_allocated_bytes())  # Arrow's own memory: the row group being read
    assert n == 20_000 and peak < 4 * file_bytes / 20, (peak, file_bytes)  # a few row groups' worth, not 20
