"""sample.py: deterministic greedy decoding, exact streaming, chat history, and the command line."""
import os

import pytest
import torch

from conftest import run
from engine import TextStreamer, generate
from tokenizer import Tokenizer
from checkpoint import load_checkpoint, load_model, model_from_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tiny_sft_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny model relabelled as an SFT checkpoint: chat mode runs on it without the warning."""
    out = tmp_path_factory.mktemp("tiny_sft")
    ckpt = load_checkpoint(tiny_ckpt)
    ckpt["stage"] = "sft"
    save_checkpoint(str(out / "ckpt.pt"), ckpt)
    (out / "tokenizer.model").write_bytes(open(os.path.join(tiny_ckpt, "tokenizer.model"), "rb").read())
    return str(out)


def greedy(out_dir, *args):
    p = run("sample.py", f"--out_dir={out_dir}", "--temperature=0", "--repetition_penalty=1.0", *args)
    return p.stdout


def test_greedy_sampling_is_deterministic_and_equals_model_generate(tiny_ckpt):
    text = greedy(tiny_ckpt, "--start=床前明月光，", "--max_new_tokens=20")
    assert text == greedy(tiny_ckpt, "--start", "床前明月光，", "--max_new_tokens=20")
    tok = Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    model = model_from_checkpoint(load_checkpoint(tiny_ckpt)).eval()
    prompt = [tok.bos_id] + tok.encode("床前明月光，")
    new = []
    for t in generate(model, torch.tensor([prompt]), 20, temperature=0, stop_tokens=tok.stop_ids):
        if t.item() in (tok.bos_id, tok.eos_id):
            break
        new.append(t.item())
    assert text.rstrip("\n") == tok.decode(prompt[1:] + new)


def test_greedy_output_is_the_same_without_the_kv_cache(tiny_ckpt):
    assert greedy(tiny_ckpt, "--max_new_tokens=30") == greedy(tiny_ckpt, "--max_new_tokens=30", "--use_cache=False")


def test_streaming_prints_exactly_the_decoded_text_and_never_half_a_character(demo_data):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    prompt = [tok.bos_id] + tok.encode("开头")
    generated = tok.encode("😀 龘𠮷𪚥 混合 text ✓ 结尾")
    assert any(3 <= t < 259 for t in generated)  # the rare characters really are byte-fallback tokens
    streamer = TextStreamer(tok, prompt)
    pieces = [streamer.put(t) for t in generated] + [streamer.end()]
    assert "".join(pieces) == tok.decode(prompt + generated)[len(tok.decode(prompt)):]
    assert not any("\ufffd" in p for p in pieces)


def test_chat_history_drops_the_oldest_turns_and_keeps_the_system_prompt(demo_data):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    chat = [{"role": "system", "content": "你是助手"}]
    for i in range(6):
        chat += [{"role": "user", "content": f"第{i}个问题" + "很长" * 10},
                 {"role": "assistant", "content": f"第{i}个回答" + "很长" * 10}]
    chat.append({"role": "user", "content": "新问题"})
    ids, everything, dropped = tok.fit_chat(chat, budget=10_000)
    assert dropped == 0 and everything == chat and ids == tok.encode_chat(chat)[0]
    budget = len(ids) - 1  # one token short of the whole history
    ids, messages, dropped = tok.fit_chat(chat, budget)
    assert dropped == 1 and messages[0]["role"] == "system" and messages[-1]["content"] == "新问题"
    assert messages[1]["content"].startswith("第1个问题") and len(ids) <= budget
    ids, messages, dropped = tok.fit_chat(chat, budget=60)
    assert dropped > 4 and messages[0]["role"] == "system" and messages[-1]["content"] == "新问题"


def test_non_interactive_chat_answers_once_and_exits(tiny_sft_ckpt):
    question = "“一马当先”是什么意思？"
    p = run("sample.py", f"--out_dir={tiny_sft_ckpt}", "--chat", "--prompt", question, "--max_new_tokens=10",
            "--system=你是助手", "--temperature=0", "--repetition_penalty=1.0")
    assert p.stderr.count("tokens/s") == 1 and "warning" not in p.stderr  # one answer, then it exited
    model, tok, _ = load_model(tiny_sft_ckpt)
    ids, _ = tok.encode_chat([{"role": "system", "content": "你是助手"}, {"role": "user", "content": question}])
    answer = []
    for t in generate(model, torch.tensor([ids]), 10, temperature=0, stop_tokens=tok.stop_ids):
        if t.item() in (tok.eos_id, tok.bos_id):
            break
        answer.append(t.item())
    assert answer and p.stdout == tok.decode(answer) + "\n"  # the greedy answer alone: no leading space, a newline


def test_chat_with_a_pretrained_checkpoint_warns(tiny_ckpt):
    p = run("sample.py", f"--out_dir={tiny_ckpt}", "--chat", "--prompt=你好", "--max_new_tokens=5")
    assert "never saw chat data" in p.stderr


def test_a_prompt_longer_than_the_context_keeps_its_tail(tiny_ckpt, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("很长的提示。" * 200, encoding="utf-8")
    p = run("sample.py", f"--out_dir={tiny_ckpt}", f"--start=FILE:{path}", "--max_new_tokens=5")
    assert "keeping its last" in p.stderr


def test_a_missing_checkpoint_says_how_to_make_one(tmp_path):
    p = run("sample.py", f"--out_dir={tmp_path}", check=False)
    assert p.returncode != 0 and "pretrain.py" in p.out and "Traceback" not in p.out


def test_the_compiled_decode_step_prints_what_the_eager_one_does(tiny_ckpt):
    common = [f"--out_dir={tiny_ckpt}", "--temperature=0", "--max_new_tokens=20", "--start=床前明月光，"]
    eager = run("sample.py", *common).stdout
    compiled = run("sample.py", *common, "--compile=True").stdout
    assert compiled == eager and eager.strip()


def test_temperature_0_is_plain_greedy_unless_a_penalty_is_asked_for(tiny_ckpt):
    # what llama.cpp and transformers print at temperature 0: no repetition penalty slipped in. A prompt on
    # which the sampling default's penalty (1.1) changes the tiny model's greedy text shows the difference
    from checkpoint import load_model
    model, tok, _ = load_model(tiny_ckpt)

    def greedy(prompt, penalty):
        ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
        return [int(t) for t in generate(model, ids, 24, temperature=0, repetition_penalty=penalty)]

    prompt = next(p for p in ("春眠不觉晓", "北京", "床前明月光，", "这家酒店", "今天", "我们", "中国", "他说")
                  if greedy(p, 1.1) != greedy(p, 1.0))
    command = ["sample.py", f"--out_dir={tiny_ckpt}", f"--start={prompt}", "--temperature=0", "--max_new_tokens=24"]
    plain = run(*command).stdout
    assert plain == run(*command, "--repetition_penalty=1.0").stdout
    assert plain != run(*command, "--repetition_penalty=1.1").stdout  # the penalty still works when asked for
