"""
export.py --version=gguf: the file read back with the gguf package (always), and run by llama.cpp
itself through llama-cpp-python: its tokenizer, logits, greedy text and chat template against ours.
"""
import os
import shutil

import numpy as np
import pytest
import torch

from checkpoint import load_model
from conftest import run

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

CHAT = [{"role": "system", "content": "你是一个知识渊博、乐于助人的中文助手。"},
        {"role": "user", "content": "这条评论是正面还是负面？\n房间很干净，服务也很好。"},
        {"role": "assistant", "content": "正面"}, {"role": "user", "content": "成语接龙：一马当先"}]
TEXTS = ["床前明月光，疑是地上霜。", "English mixed 和中文 123, code: x = [1, 2]", "龘𠮷😀 byte fallback ✓",
         "[INST] <<SYS>>\n你是助手\n<</SYS>>\n\n“一马当先”是什么意思？ [/INST]", "两个  空格\n换行"]


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint as GGUF files of each type: {type: path}."""
    out = tmp_path_factory.mktemp("gguf")
    paths = {}
    for qtype in ("f32", "f16", "q8_0"):
        paths[qtype] = str(out / qtype / "model.gguf")
        run("export.py", f"--out_dir={tiny_ckpt}", "--version=gguf", f"--gguf_type={qtype}", f"--output={paths[qtype]}")
    return paths


def fields(path):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_the_gguf_file_holds_every_key_and_tensor_llama_cpp_reads(exported, tiny_ckpt):
    model, tok, _ = load_model(tiny_ckpt)
    a = model.args
    kv, tensors = fields(exported["f32"])
    expected = {"general.architecture": "llama", "llama.context_length": a.max_seq_len, "llama.embedding_length": a.dim,
                "llama.block_count": a.n_layers, "llama.feed_forward_length": model.layers[0].feed_forward.w1.out_features,
                "llama.attention.head_count": a.n_heads, "llama.attention.head_count_kv": a.n_kv_heads,
                "llama.rope.dimension_count": a.dim // a.n_heads, "llama.vocab_size": a.vocab_size,
                "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.add_eos_token": False, "general.file_type": 0}
    for key, value in expected.items():
        assert kv[key] == value, key
    assert kv["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert kv["tokenizer.ggml.tokens"][:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert len(kv["tokenizer.ggml.tokens"]) == tok.n_words
    assert kv["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6] and set(kv["tokenizer.ggml.token_type"][259:]) == {1}
    assert kv["tokenizer.ggml.scores"][500] == pytest.approx(tok.sp.get_score(500))
    assert "[INST]" in kv["tokenizer.chat_template"]
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(a.n_layers) for n in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names  # tied: no separate output.weight
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"].data,
                                  model.layers[1].attention.wq.weight.detach().numpy())  # our layout, unpermuted
    assert fields(exported["q8_0"])[1]["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"
    assert fields(exported["q8_0"])[1]["blk.0.ffn_norm.weight"].tensor_type.name == "F32"
    assert fields(exported["f16"])[1]["blk.0.ffn_up.weight"].tensor_type.name == "F16"
    modelfile = open(os.path.join(os.path.dirname(exported["f32"]), "Modelfile")).read()
    assert "FROM ./model.gguf" in modelfile and "[INST]" in modelfile and 'PARAMETER stop "</s>"' in modelfile


def test_q8_0_needs_rows_in_blocks_of_32(tmp_path, tiny_ckpt):
    from export import export_gguf
    from model import ModelArgs, Transformer
    model, tok, _ = load_model(tiny_ckpt)
    odd = Transformer(ModelArgs(dim=48, n_layers=1, n_heads=4, vocab_size=tok.n_words, hidden_dim=120))
    with pytest.raises(SystemExit, match="blocks of 32"):
        export_gguf(odd, tok, str(tmp_path / "x.gguf"), "q8_0")


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, tiny_ckpt, demo_data):
    from checkpoint import load_checkpoint, save_checkpoint
    ckpt = load_checkpoint(tiny_ckpt)
    state = dict(ckpt["model"])
    state["tok_embeddings.weight"] = state["output.weight"] = state["tok_embeddings.weight"][:8000].clone()
    save_checkpoint(str(tmp_path / "ckpt.pt"), dict(ckpt, model=state, model_args=dict(ckpt["model_args"], vocab_size=8000)))
    shutil.copy(os.path.join(tiny_ckpt, "tokenizer.model"), tmp_path)
    p = run("export.py", f"--out_dir={tmp_path}", "--version=gguf", check=False)
    assert p.returncode != 0 and "8192 pieces" in p.out and "Traceback" not in p.out


# ---- llama.cpp itself

llama_cpp = None


def llama(path, **kw):
    global llama_cpp
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    return llama_cpp.Llama(model_path=path, verbose=False, n_threads=2, seed=0, **kw)


def test_llama_cpp_tokenizes_as_we_do(exported, tiny_ckpt):
    _, tok, _ = load_model(tiny_ckpt)
    llm = llama(exported["f32"], vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text), text
        assert llm.detokenize(tok.encode(text)).decode("utf-8").lstrip(" ") == text.lstrip(" ")


def test_llama_cpp_renders_our_chat_template_to_our_ids(exported, tiny_ckpt):
    _, tok, _ = load_model(tiny_ckpt)
    llm = llama(exported["f32"], vocab_only=True)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    template = llm.metadata["tokenizer.chat_template"]  # read back from the GGUF file by llama.cpp
    formatter = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")
    for messages in (CHAT, CHAT[1:], CHAT[1:3] + [{"role": "user", "content": "再见"}]):
        prompt = formatter(messages=messages).prompt
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        assert ids == tok.encode_chat(messages)[0], messages
    # llama.cpp tokenizes the rendered chat as one text with control tokens parsed (llama-cli and llama-server
    # do as llama-cpp-python does here): </s> typed in a message becomes EOS there, as the README warns
    typed = [{"role": "user", "content": "你好</s>再见"}]
    ids = llm.tokenize(formatter(messages=typed).prompt.encode("utf-8"), add_bos=False, special=True)
    assert tok.eos_id in ids and tok.eos_id not in tok.encode_chat(typed)[0]


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_llama_cpp_computes_our_logits(exported, tiny_ckpt, qtype):
    model, tok, _ = load_model(tiny_ckpt)
    ids = [tok.bos_id] + tok.encode("床前明月光，疑是地上霜。举头望明月，低头思故乡。")
    llm = llama(exported[qtype], n_ctx=64, logits_all=True)
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]), torch.tensor([ids]))[0][0].numpy()
    if qtype == "f32":
        np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=1e-3)
    else:
        assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_llama_cpp_continues_a_prompt_with_sample_pys_greedy_text(exported, tiny_ckpt):
    llm = llama(exported["f32"], n_ctx=64)
    for prompt in ("床前明月光，", "这家酒店的服务"):
        ours = run("sample.py", f"--out_dir={tiny_ckpt}", f"--start={prompt}", "--temperature=0",
                   "--repetition_penalty=1.0", "--max_new_tokens=16").stdout.rstrip("\n")
        theirs = llm.create_completion(prompt, max_tokens=16, temperature=0.0, repeat_penalty=1.0, top_k=1)
        assert prompt + theirs["choices"][0]["text"] == ours


def test_an_extended_tokenizer_and_an_untied_classifier_round_trip(extended_data, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    out, base_path, _ = extended_data
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=40000, rms_norm_eps=1e-5,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    shutil.copy(os.path.join(out, "tokenizer.model"), tmp_path / "hf" / "tokenizer.model")
    run("export.py", f"--out_dir={tmp_path / 'hf'}", "--version=gguf", "--gguf_type=f32",
        f"--output={tmp_path / 'model.gguf'}")
    model, tok, _ = load_model(str(tmp_path / "hf"))
    assert "output.weight" in fields(str(tmp_path / "model.gguf"))[1]
    text = "床前明月光，疑是地上霜。人民日报记者报道 English"
    ids = [tok.bos_id] + tok.encode(text)
    assert max(ids) >= 32000  # the extension's pieces are in use
    llm = llama(str(tmp_path / "model.gguf"), n_ctx=64, logits_all=True)
    assert llm.tokenize(text.encode("utf-8"), add_bos=True) == ids
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), torch.tensor([ids]))[0][0].numpy()
    np.testing.assert_allclose(np.array(llm.scores[:len(ids)]), ours, atol=1e-3, rtol=1e-3)


ENDING_PROMPTS = ["床前明月光，", "这家酒店的服务", "今天天气", "中国的", "一马当先", "我们", "北京是", "他说",
                  "春眠不觉晓，", "房间很干净", "这部电影", "成语接龙"]


def greedy_with_margin(model, ids, n, stop):
    """Our greedy tokens after ids (up to a stop token, which is included) and the smallest gap between the
    best and second-best logit on the way: how far every decision is from a tie another runtime could break."""
    out, gap = [], float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0][0, -1]
            top = logits.topk(2).values
            gap = min(gap, float(top[0] - top[1]))
            out.append(int(logits.argmax()))
            if out[-1] in stop:
                break
    return out, gap


@pytest.fixture(scope="module")
def ends_documents(tiny_ckpt, tmp_path_factory):
    """
    The tiny model changed so that it ends some documents: untied, one residual dimension held constant
    and read by the BOS row of the classifier only, with the strength chosen so that after some prompts
    the greedy text goes on to the length limit and after others the next token is BOS (the start of the
    next document, where sample.py and run.c stop). Only prompts whose every greedy decision is clear of
    a tie (a gap of 0.005 between the best two logits) are kept. Returns (model, tok, {prompt: our greedy
    tokens}, GGUF path, Hugging Face directory).
    """
    from export import export_gguf, export_hf
    from model import ModelArgs, Transformer
    model, tok, _ = load_model(tiny_ckpt)
    untied = Transformer(ModelArgs(**{**vars(model.args), "tie_embeddings": False})).eval()
    state = model.state_dict()
    untied.load_state_dict(dict(state, **{"output.weight": state["tok_embeddings.weight"].clone()}))
    stop = (tok.bos_id, tok.eos_id)
    with torch.no_grad():
        untied.tok_embeddings.weight[:, 0] = 1.0
        untied.output.weight[:, 0] = 0.0
        for strength in [x / 1000 for x in range(40, 120)]:
            untied.output.weight[tok.bos_id, 0] = strength
            outcomes = {p: greedy_with_margin(untied, [tok.bos_id] + tok.encode(p), 16, stop) for p in ENDING_PROMPTS}
            clear = {p: t for p, (t, gap) in outcomes.items() if gap > 0.005}
            if any(t[-1] == tok.bos_id for t in clear.values()) and any(t[-1] not in stop for t in clear.values()):
                break
        else:
            pytest.fail(f"no strength makes the tiny model end some documents clearly: {outcomes}")
    out = tmp_path_factory.mktemp("ends_documents")
    export_gguf(untied, tok, str(out / "model.gguf"), "f32")
    export_hf(untied, tok, str(out / "hf"))
    return untied, tok, clear, str(out / "model.gguf"), str(out / "hf")


def test_llama_cpp_and_transformers_stop_at_the_end_of_a_document_where_sample_py_does(ends_documents):
    from sample import generate_text
    model, tok, ours, gguf_path, hf_dir = ends_documents
    kv = fields(gguf_path)[0]
    assert kv["tokenizer.ggml.eot_token_id"] == tok.bos_id  # BOS ends generation...
    assert kv["tokenizer.ggml.bos_token_id"] == tok.bos_id and kv["tokenizer.ggml.add_bos_token"]  # ...starts prompts
    llm = llama(gguf_path, n_ctx=64)
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    for prompt, tokens in ours.items():
        ids = [tok.bos_id] + tok.encode(prompt)
        assert llm.tokenize(prompt.encode("utf-8")) == ids  # prompts are tokenized as before: BOS first
        # what sample.py prints and why it stopped
        text, _, _, why = generate_text(model, tok, ids, stream=False, max_new_tokens=16, temperature=0)
        assert why == ("stop" if tokens[-1] == tok.bos_id else "length")
        theirs = llm.create_completion(prompt, max_tokens=16, temperature=0.0, repeat_penalty=1.0, top_k=1)
        assert (theirs["choices"][0]["text"], theirs["choices"][0]["finish_reason"]) == (text, why), prompt
        with torch.no_grad():
            generated = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        assert generated == tokens, prompt  # the same tokens, ending with the BOS where ours end
