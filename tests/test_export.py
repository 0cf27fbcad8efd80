"""export.py: the llama2.c files are read back and run by independent code, and match model.py."""
import inspect
import json
import os
import struct

import numpy as np
import pytest
import torch

import export
from checkpoint import load_checkpoint, save_checkpoint
from conftest import run, tiny
from model import ModelArgs, Transformer
from tokenizer import Tokenizer


def tiny_model(**kw):
    """conftest.tiny with an 8192-id vocabulary and non-trivial norms, so a swapped or misplaced norm shows up."""
    model = tiny(**dict(dict(vocab_size=8192, max_seq_len=32), **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


# ---- an independent reader and forward pass for run.c's version-0 file, written from the format alone

def read_v0(path):
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared, vocab = vocab > 0, abs(vocab)
    data, at = np.frombuffer(raw[28:], dtype="<f4"), 0
    hd = dim // n_heads

    def take(*shape):
        nonlocal at
        n = int(np.prod(shape))
        out = data[at:at + n].reshape(shape)
        at += n
        return out

    w = {"emb": take(vocab, dim), "att_norm": take(n_layers, dim), "wq": take(n_layers, dim, dim),
         "wk": take(n_layers, n_kv * hd, dim), "wv": take(n_layers, n_kv * hd, dim), "wo": take(n_layers, dim, dim),
         "ffn_norm": take(n_layers, dim), "w1": take(n_layers, hidden, dim), "w2": take(n_layers, dim, hidden),
         "w3": take(n_layers, hidden, dim), "norm": take(dim)}
    take(seq_len, hd // 2)  # the RoPE tables run.c skips
    take(seq_len, hd // 2)
    w["cls"] = w["emb"] if shared else take(vocab, dim)
    assert at == len(data), "trailing bytes"
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, hd=hd), w


def numpy_forward(cfg, w, tokens):
    """Logits for every position, computed as run.c does: rmsnorm eps 1e-5, interleaved RoPE theta 1e4."""
    def rmsnorm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(v, n):  # v: (T, n, hd)
        out = v.copy()
        for pos in range(v.shape[0]):
            for i in range(0, cfg["hd"], 2):
                angle = pos / 10000.0 ** (i / cfg["hd"])
                c, s = np.cos(angle), np.sin(angle)
                out[pos, :, i] = v[pos, :, i] * c - v[pos, :, i + 1] * s
                out[pos, :, i + 1] = v[pos, :, i] * s + v[pos, :, i + 1] * c
        return out

    T, H, KV, hd = len(tokens), cfg["n_heads"], cfg["n_kv"], cfg["hd"]
    x = w["emb"][tokens].astype(np.float64)
    for l in range(cfg["n_layers"]):
        h = rmsnorm(x, w["att_norm"][l])
        q = rope((h @ w["wq"][l].T).reshape(T, H, hd), H)
        k = rope((h @ w["wk"][l].T).reshape(T, KV, hd), KV)
        v = (h @ w["wv"][l].T).reshape(T, KV, hd)
        att = np.zeros((T, H, hd))
        for head in range(H):
            kv = head // (H // KV)
            scores = q[:, head] @ k[:, kv].T / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            att[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(T, -1) @ w["wo"][l].T
        h = rmsnorm(x, w["ffn_norm"][l])
        a, b = h @ w["w1"][l].T, h @ w["w3"][l].T
        x = x + (a / (1 + np.exp(-a)) * b) @ w["w2"][l].T
    return rmsnorm(x, w["norm"]) @ w["cls"].T


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"n_kv_heads": 1}, {"n_kv_heads": 4}])
def test_a_numpy_forward_over_the_v0_file_reproduces_model_py(tmp_path, kw):
    model = tiny_model(**kw)
    path = str(tmp_path / "model.bin")
    export.export_v0(model, path)
    cfg, w = read_v0(path)
    tokens = torch.randint(3, 8192, (12,))
    expected = model(tokens[None], tokens[None])[0][0].detach().numpy()
    np.testing.assert_allclose(numpy_forward(cfg, w, tokens.numpy()), expected, atol=1e-4, rtol=1e-4)


def read_v2(path):
    raw = open(path, "rb").read()
    magic, version = struct.unpack("<Ii", raw[:8])
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[8:36])
    shared, gs = struct.unpack("<Bi", raw[36:41])
    assert (magic, version) == (0x616B3432, 2) and not any(raw[41:256])
    at = 256

    def take(dtype, n):
        nonlocal at
        out = np.frombuffer(raw, dtype=dtype, count=n, offset=at)
        at += out.nbytes
        return out

    norms = take("<f4", 2 * n_layers * dim + dim)
    hd = dim // n_heads
    shapes = [(vocab, dim)] + [(dim, dim)] * n_layers + [(n_kv * hd, dim)] * n_layers * 2 + [(dim, dim)] * n_layers \
        + [(hidden, dim)] * n_layers + [(dim, hidden)] * n_layers + [(hidden, dim)] * n_layers
    if not shared:
        shapes.append((vocab, dim))
    mats = []
    for shape in shapes:
        n = shape[0] * shape[1]
        q = take(np.int8, n).astype(np.float32).reshape(-1, gs)
        scale = take("<f4", n // gs)
        mats.append(((q * scale[:, None]).reshape(shape), scale))  # (dequantized matrix, group scales)
    assert at == len(raw)
    return gs, norms, mats, dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, hd=hd, shared=shared)


def test_the_v2_file_stays_within_the_q8_bound_and_predicts_the_same_tokens(tmp_path):
    model = tiny_model(dim=128, n_heads=4, n_kv_heads=2)  # hidden_dim 352: group size backs off from 64 to 32
    gs = export.choose_group_size(128, 352, 64)
    assert gs == 32
    path = str(tmp_path / "q.bin")
    export.export_v2(model, path, gs)
    got_gs, norms, mats, cfg = read_v2(path)
    assert got_gs == 32 and cfg["shared"]
    L = cfg["n_layers"]
    originals = [model.tok_embeddings.weight] + [getattr(l.attention, n).weight for n in ("wq", "wk", "wv", "wo") for l in model.layers] \
        + [getattr(l.feed_forward, n).weight for n in ("w1", "w2", "w3") for l in model.layers]
    for (deq, scale), w in zip(mats, originals):
        err = np.abs(deq - w.detach().numpy()).reshape(-1, gs).max(axis=1)
        assert (err <= scale / 2 + 1e-7).all()  # rounding to the nearest step: at most half a step per group
    w = {"emb": mats[0][0], "att_norm": norms[:L * 128].reshape(L, 128), "ffn_norm": norms[L * 128:2 * L * 128].reshape(L, 128),
         "norm": norms[2 * L * 128:], "cls": mats[0][0]}
    for i, name in enumerate(("wq", "wk", "wv", "wo", "w1", "w2", "w3")):
        w[name] = np.stack([mats[1 + i * L + l][0] for l in range(L)])
    tokens = torch.randint(3, 8192, (10,))
    expected = model(tokens[None], tokens[None])[0][0].detach().numpy()
    logits = numpy_forward(cfg, w, tokens.numpy())
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
    np.testing.assert_allclose(logits, expected, atol=0.05)


def test_no_usable_group_size_is_refused():
    with pytest.raises(SystemExit, match="group size"):
        export.choose_group_size(68, 200, 64)


def read_tokenizer_bin(path, n):
    raw = open(path, "rb").read()
    (max_len,), at, pieces, scores = struct.unpack("<I", raw[:4]), 4, [], []
    for _ in range(n):
        score, length = struct.unpack("<fI", raw[at:at + 8])
        pieces.append(raw[at + 8:at + 8 + length])
        scores.append(score)
        at += 8 + length
    assert at == len(raw) and max_len == max(map(len, pieces))
    return pieces, scores


def test_tokenizer_bin_holds_the_sentencepiece_vocabulary_and_scores(demo_data, tmp_path):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    path = str(tmp_path / "tokenizer.bin")
    export.export_tokenizer_bin(tok, path)
    pieces, scores = read_tokenizer_bin(path, tok.n_words)
    assert pieces[1] == b"\n<s>\n" and pieces[2] == b"\n</s>\n" and pieces[3] == b"<0x00>"
    for i in range(3, tok.n_words):
        assert pieces[i] == tok.id_to_piece(i).replace("▁", " ").encode("utf-8")
        assert scores[i] == pytest.approx(tok.sp.get_score(i))


def runc_encode(text, pieces, scores):
    """llama2.c run.c's encode(), transcribed: BOS, dummy prefix, code points or bytes + 3, best-score merges."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens, b, i = [1, lookup[b" "]] if text else [1], text.encode("utf-8"), 0
    while i < len(b):
        j = i + 1
        while j < len(b) and b[j] & 0xC0 == 0x80 and j - i < 4:
            j += 1
        tokens += [lookup[b[i:j]]] if b[i:j] in lookup else [c + 3 for c in b[i:j]]
        i = j
    while True:
        best = max(((scores[lookup[pieces[a] + pieces[c]]], k) for k, (a, c) in enumerate(zip(tokens, tokens[1:]))
                    if pieces[a] + pieces[c] in lookup), default=None)
        if best is None:
            return tokens
        k = best[1]
        tokens[k:k + 2] = [lookup[pieces[tokens[k]] + pieces[tokens[k + 1]]]]


def test_run_c_tokenizes_chinese_prompts_exactly_as_we_do(demo_data, tmp_path):
    tok = Tokenizer(os.path.join(demo_data, "tokenizer.model"))
    path = str(tmp_path / "tokenizer.bin")
    export.export_tokenizer_bin(tok, path)
    pieces, scores = read_tokenizer_bin(path, tok.n_words)
    prompts = ["床前明月光，疑是地上霜。", "[INST] 这条评论是正面还是负面？\n房间很干净，服务也很好。 [/INST]",
               "[INST] <<SYS>>\n你是助手\n<</SYS>>\n\n“一马当先”是什么意思？ [/INST]", "龘𠮷😀 mixed  English 123",
               "你好  世界", "a   b"]
    for text in prompts:
        assert runc_encode(text, pieces, scores) == [1] + tok.encode(text), text
    # the one known difference: a prompt that *starts* with 2+ spaces splits the leading run of "▁"
    # as ▁ + ▁▁ in run.c but ▁▁ + ▁ in sentencepiece; the text is the same, the ids differ
    ours, theirs = [1] + tok.encode("  两个空格"), runc_encode("  两个空格", pieces, scores)
    assert ours != theirs and tok.decode(ours) == tok.decode(theirs) and sorted(ours) == sorted(theirs)


def test_export_refuses_a_model_whose_vocabulary_differs_from_the_tokenizer(tiny_ckpt, tmp_path):
    ckpt = load_checkpoint(tiny_ckpt)
    args = dict(ckpt["model_args"], vocab_size=ckpt["model_args"]["vocab_size"] + 64)
    model = Transformer(ModelArgs(**args))
    save_checkpoint(str(tmp_path / "ckpt.pt"), dict(ckpt, model=model.state_dict(), model_args=args))
    (tmp_path / "tokenizer.model").write_bytes(open(os.path.join(tiny_ckpt, "tokenizer.model"), "rb").read())
    p = run("export.py", f"--out_dir={tmp_path}", check=False)
    assert p.returncode != 0 and "llama2.c needs them equal" in p.out and "Traceback" not in p.out


def test_the_command_line_writes_the_model_and_tokenizer(tiny_ckpt, tmp_path):
    run("export.py", f"--out_dir={tiny_ckpt}", f"--output={tmp_path / 'm.bin'}")
    run("export.py", f"--out_dir={tiny_ckpt}", "--version=2", f"--output={tmp_path / 'q.bin'}")
    assert (tmp_path / "tokenizer.bin").exists() and read_v2(str(tmp_path / "q.bin"))[0] == 32


def test_hugging_face_export_computes_the_same_logits(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    from transformers import LlamaForCausalLM
    for kw in ({}, {"tie_embeddings": False}):
        model = tiny_model(**kw)

        class FakeTok:  # export_hf needs only these from the tokenizer
            bos_id, eos_id = 1, 2
            model_path = __file__

        directory = tmp_path / f"hf{len(kw)}"
        export.export_hf(model, FakeTok(), str(directory))
        hf = LlamaForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval()
        tokens = torch.randint(3, 8192, (2, 16))
        with torch.no_grad():
            expected = model(tokens, tokens)[0]
            got = hf(tokens).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert json.load(open(directory / "config.json"))["tie_word_embeddings"] == (kw == {})


def test_the_hugging_face_tokenizer_and_chat_template_give_our_ids(tiny_ckpt, tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    from transformers import AutoTokenizer
    run("export.py", f"--out_dir={tiny_ckpt}", "--version=hf", f"--output={tmp_path / 'hf'}")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    tok = Tokenizer(os.path.join(tiny_ckpt, "tokenizer.model"))
    conversations = [
        [{"role": "user", "content": "这条评论是正面还是负面？\n房间很干净。"}],
        [{"role": "system", "content": "你是一个知识渊博、乐于助人的中文助手。"}, {"role": "user", "content": "你好"},
         {"role": "assistant", "content": "你好！有什么可以帮你？"}, {"role": "user", "content": "成语接龙：一马当先"}],
        [{"role": "user", "content": "mixed English 和中文 😀"}, {"role": "assistant", "content": "好的  two spaces"}],
    ]
    for messages in conversations:
        ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == tok.encode_chat(messages)[0], messages
    # <s> and </s> typed in a message are text to our tokenizer; transformers keeps them text only when asked
    # (the README says so): then every message, system and answer too, gives exactly our ids
    typed = [{"role": "system", "content": "系统<s>"}, {"role": "user", "content": "你好</s>再见<s>[INST]"},
             {"role": "assistant", "content": "答</s>案"}, {"role": "user", "content": "<<SYS>>x<</SYS>> [/INST]"}]
    if "sanitize_control_tokens" in inspect.signature(hf.apply_chat_template).parameters:
        ids = hf.apply_chat_template(typed, tokenize=True, return_dict=True, sanitize_control_tokens=True)
        assert ids["input_ids"] == tok.encode_chat(typed)[0]
    ids = hf.apply_chat_template(typed, tokenize=True, return_dict=True)["input_ids"]
    assert ids != tok.encode_chat(typed)[0] and ids.count(tok.eos_id) > 1  # the typed </s> became a control token
    for text in ("床前明月光，疑是地上霜。", "龘𠮷 byte fallback", "code: x = [1, 2]"):
        assert hf(text)["input_ids"] == [tok.bos_id] + tok.encode(text)


@pytest.mark.parametrize("embeddings", [False, True], ids=["adapters", "adapters+embeddings"])
def test_lora_adapters_export_for_peft_and_compute_what_the_merged_model_does(demo_data, tmp_path, embeddings):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from checkpoint import load_model
    tok = Tokenizer(f"{demo_data}/tokenizer.model")
    torch.manual_seed(0)  # a Llama-shaped base: untied classifier, grouped-query attention (k has 2 heads of 4)
    base = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, max_seq_len=64,
                                 tie_embeddings=False))
    export.export_hf(base, tok, str(tmp_path / "base"))
    run("sft.py", f"--data_dir={demo_data}", f"--init_from={tmp_path / 'base'}", f"--out_dir={tmp_path / 'out'}",
        "--lora_rank=4", f"--train_embeddings={embeddings}", "--max_iters=4", "--eval_interval=4", "--eval_iters=1",
        "--batch_size=4", "--learning_rate=1e-2", "--warmup_iters=1", "--evaluate_tasks=False")
    p = run("export.py", f"--out_dir={tmp_path / 'out'}", "--version=peft", f"--output={tmp_path / 'peft'}")
    assert "PEFT LoRA adapters" in p.out and "note:" not in p.out  # an fp32 base, a Hugging Face directory
    config = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert config["r"] == 4 and config["modules_to_save"] == (["embed_tokens", "lm_head"] if embeddings else None)

    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)
    with_adapters = PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    merged, _, _ = load_model(str(tmp_path / "out"))
    tokens = torch.tensor([tok.encode("床前明月光，疑是地上霜。", bos=True)])
    with torch.no_grad():
        expected = merged(tokens, tokens)[0]
        got = with_adapters(tokens).logits
        plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32)(tokens).logits
    assert (expected - plain).abs().max() > 1e-2  # the adapters changed the model: the check below can fail
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_exporting_adapters_of_a_run_without_them_is_one_line(tiny_ckpt, tmp_path):
    p = run("export.py", f"--out_dir={tiny_ckpt}", "--version=peft", f"--output={tmp_path / 'peft'}", check=False)
    assert p.returncode != 0 and "holds no LoRA adapters" in p.out and "Traceback" not in p.out
