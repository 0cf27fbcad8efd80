"""
Starting from an existing Llama 2: Hugging Face, Meta and llama2.c checkpoints load into our
Transformer and compute what transformers computes; Llama 2's tokenizer extended with Chinese pieces
keeps every old id; and an imported model with an extended tokenizer fine-tunes and exports.
"""
import json
import os
import shutil

import pytest
import torch

import export
from checkpoint import META_SPLIT, load_checkpoint, load_model, model_from_checkpoint
from conftest import run
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

SHAPES = {
    "gqa, tied, rope theta 50000": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=50000.0),
    "no gqa, untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
}


def hf_llama(directory, vocab_size=300, save=None, **kw):
    """A random LlamaForCausalLM saved with save_pretrained (save: its keyword arguments); returns it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=vocab_size, rms_norm_eps=1e-5, max_position_embeddings=64, **kw)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory), **(save or {}))
    return model


def assert_same_logits(model, reference, vocab_size=300):
    tokens = torch.randint(0, vocab_size, (2, 24))
    with torch.no_grad():
        ours = model.eval()(tokens, tokens)[0]
        theirs = reference(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("files", ["safetensors", "sharded safetensors", "bin", "sharded bin"])
def test_a_hugging_face_llama_computes_what_transformers_computes(tmp_path, shape, files):
    save = {"safe_serialization": "safetensors" in files}
    if "sharded" in files:
        save["max_shard_size"] = "100KB"
    reference = hf_llama(tmp_path, save=save, **SHAPES[shape])
    names = os.listdir(tmp_path)
    assert any("index.json" in n for n in names) == ("sharded" in files)
    model = model_from_checkpoint(load_checkpoint(str(tmp_path)))
    assert_same_logits(model, reference)
    assert (model.output.weight is model.tok_embeddings.weight) == SHAPES[shape]["tie_word_embeddings"]


def write_meta(directory, state, args, n_shards):
    """Meta's release layout from our state dict: params.json and consolidated.NN.pth, split as Meta splits."""
    os.makedirs(directory, exist_ok=True)
    for r in range(n_shards):
        shard = {}
        for key, tensor in state.items():
            kind = key.split(".")[-2]
            if kind in META_SPLIT:
                shard[key] = tensor.chunk(n_shards, dim=META_SPLIT[kind])[r].clone()
            else:
                shard[key] = tensor.clone()
        shard["rope.freqs"] = torch.ones(args["dim"] // args["n_heads"] // 2)
        torch.save(shard, os.path.join(directory, f"consolidated.{r:02d}.pth"))
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump({"dim": args["dim"], "n_layers": args["n_layers"], "n_heads": args["n_heads"],
                   "n_kv_heads": args["n_kv_heads"], "multiple_of": 32, "norm_eps": args["norm_eps"],
                   "vocab_size": -1, "rope_theta": args["rope_theta"]}, f)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoints_load_with_their_model_parallel_shards_joined(tmp_path, n_shards):
    reference = hf_llama(tmp_path / "hf", num_key_value_heads=2, tie_word_embeddings=False, rope_theta=20000.0)
    imported = load_checkpoint(str(tmp_path / "hf"))
    write_meta(tmp_path / "meta", imported["model"], imported["model_args"], n_shards)
    model = model_from_checkpoint(load_checkpoint(str(tmp_path / "meta")))
    assert model.args.rope_theta == 20000.0 and model.args.hidden_dim == 160
    assert_same_logits(model, reference)


def test_a_llama2c_file_loads_back_to_the_same_model(tmp_path, tiny_ckpt):
    model, tok, _ = load_model(tiny_ckpt)
    export.export_v0(model, str(tmp_path / "model.bin"))
    again, _, meta = load_model(str(tmp_path / "model.bin"), tokenizer_path=tok.model_path)
    assert meta["stage"] == "imported"
    tokens = torch.randint(0, tok.n_words, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, tokens)[0], model(tokens, tokens)[0], atol=1e-5, rtol=1e-5)


def test_our_hugging_face_export_imports_back_to_identical_logits_and_samples_alike(tmp_path, tiny_ckpt):
    run("export.py", f"--out_dir={tiny_ckpt}", "--version=hf", f"--output={tmp_path / 'hf'}")
    ours, tok, _ = load_model(tiny_ckpt)
    back, _, _ = load_model(str(tmp_path / "hf"))
    tokens = torch.randint(0, tok.n_words, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens, tokens)[0], ours(tokens, tokens)[0], atol=1e-5, rtol=1e-5)
    greedy = ["--temperature=0", "--repetition_penalty=1.0", "--max_new_tokens=12"]
    assert run("sample.py", f"--out_dir={tmp_path / 'hf'}", *greedy).stdout == \
        run("sample.py", f"--out_dir={tiny_ckpt}", *greedy).stdout


# ---- what cannot be loaded is said in one line

def one_line_error(p, *phrases):
    assert p.returncode != 0 and "Traceback" not in p.out, p.out
    for phrase in phrases:
        assert phrase in p.out, (phrase, p.out)


def test_a_path_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(run("sample.py", f"--out_dir={tmp_path}", check=False), "is not a model this kit reads",
                   "config.json", "params.json")


def test_a_truncated_safetensors_file_is_refused(tmp_path):
    hf_llama(tmp_path, **SHAPES["no gqa, untied"])
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    one_line_error(run("sample.py", f"--out_dir={tmp_path}", check=False), "model.safetensors", "download it again")


def test_a_shard_missing_from_the_index_is_refused(tmp_path):
    hf_llama(tmp_path, save={"max_shard_size": "100KB"}, **SHAPES["no gqa, untied"])
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    one_line_error(run("sample.py", f"--out_dir={tmp_path}", check=False), shard.name, "download it again")


@pytest.mark.parametrize("field, value", [("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                          ("attention_bias", True), ("hidden_act", "gelu"), ("model_type", "mistral")])
def test_a_config_we_cannot_compute_exactly_is_refused_by_name(tmp_path, field, value):
    hf_llama(tmp_path, **SHAPES["no gqa, untied"])
    config = json.load(open(tmp_path / "config.json"))
    config.pop("rope_parameters" if field == "rope_scaling" else field, None)
    config[field] = value
    json.dump(config, open(tmp_path / "config.json", "w"))
    one_line_error(run("sample.py", f"--out_dir={tmp_path}", check=False),
                   "model_type" if field == "model_type" else field)


def test_a_tokenizer_with_more_pieces_than_the_model_has_rows_is_refused(tmp_path, tiny_ckpt):
    hf_llama(tmp_path, vocab_size=300, **SHAPES["no gqa, untied"])  # fewer rows than the demo's 8192 pieces
    shutil.copy(os.path.join(tiny_ckpt, "tokenizer.model"), tmp_path)
    one_line_error(run("sample.py", f"--out_dir={tmp_path}", check=False), "8192 pieces", "300 embedding rows")


def test_a_tokenizer_with_other_special_ids_is_refused(tmp_path, tiny_ckpt):
    hf_llama(tmp_path, vocab_size=8192, bos_token_id=5, eos_token_id=6, **SHAPES["no gqa, untied"])
    shutil.copy(os.path.join(tiny_ckpt, "tokenizer.model"), tmp_path)
    one_line_error(run("sample.py", f"--out_dir={tmp_path}", check=False), "bos/eos ids 5/6")


def test_more_embedding_rows_than_pieces_is_fine(tmp_path, tiny_ckpt):
    hf_llama(tmp_path, vocab_size=8192 + 64, **SHAPES["no gqa, untied"])  # a padded vocabulary
    shutil.copy(os.path.join(tiny_ckpt, "tokenizer.model"), tmp_path)
    run("sample.py", f"--out_dir={tmp_path}", "--max_new_tokens=3")


# ---- extending Llama 2's tokenizer with Chinese pieces

def test_an_extended_tokenizer_keeps_every_base_id_and_halves_chinese(extended_data):
    out, base_path, log = extended_data
    base, ext = Tokenizer(base_path), Tokenizer(os.path.join(out, "tokenizer.model"))
    assert base.n_words == 32000 and ext.n_words == 40000
    for i in range(base.n_words):  # every base piece keeps its id and its score
        assert ext.id_to_piece(i) == base.id_to_piece(i) and ext.sp.get_score(i) == base.sp.get_score(i)
    assert all(ext.sp.is_byte(i) for i in range(3, 259))
    for text in ("The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x ** 2  # squared\n",
                 "  leading spaces, trailing tab\t", "naïve café 😀"):
        assert ext.encode(text) == base.encode(text)  # text without Chinese: exactly the same ids
    chinese = "床前明月光，疑是地上霜。举头望明月，低头思故乡。人民日报记者报道，香港特别行政区今天举行庆祝活动。"
    assert ext.decode(ext.encode(chinese)) == chinese
    assert len(ext.encode(chinese)) <= 0.6 * len(base.encode(chinese))  # at least 40% fewer tokens
    assert "tokens per Chinese character before" in log


def test_run_c_tokenizes_the_extended_vocabulary_as_sentencepiece_does(extended_data, tmp_path):
    from test_export import read_tokenizer_bin, runc_encode
    out, _, _ = extended_data
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    export.export_tokenizer_bin(tok, str(tmp_path / "tokenizer.bin"))
    pieces, scores = read_tokenizer_bin(str(tmp_path / "tokenizer.bin"), tok.n_words)
    for text in ("床前明月光，疑是地上霜。", "[INST] 这条评论是正面还是负面？\n房间很干净，服务也很好。 [/INST]",
                 "English mixed 和中文 123", "龘𠮷😀"):
        assert runc_encode(text, pieces, scores) == [1] + tok.encode(text), text


def test_an_imported_llama_with_the_extended_tokenizer_fine_tunes_and_exports(extended_data, tmp_path):
    """The CPU rehearsal of the 7B workflow: import, extend, LoRA + new embedding rows, merge, export."""
    from test_export import numpy_forward, read_v0
    out, base_path, _ = extended_data
    hf_dir = tmp_path / "llama"
    hf_llama(hf_dir, vocab_size=32000, num_key_value_heads=2, tie_word_embeddings=False)
    shutil.copy(base_path, hf_dir / "tokenizer.model")
    p = run("sft.py", f"--data_dir={out}", f"--init_from={hf_dir}", f"--out_dir={tmp_path / 'sft'}", "--lora_rank=4",
            "--block_size=64", "--max_iters=30", "--eval_interval=30", "--eval_iters=4", "--learning_rate=5e-3",
            "--warmup_iters=2", "--evaluate_tasks=False")
    assert "added 8000 embedding rows" in p.out and "with the embeddings in full" in p.out
    val = {r["iter"]: r["val_loss"] for r in map(json.loads, open(tmp_path / "sft" / "log.jsonl")) if "val_loss" in r}
    assert val[30] < val[0] - 0.5
    model, tok, _ = load_model(str(tmp_path / "sft"))
    assert model.args.vocab_size == tok.n_words == 40000
    run("export.py", f"--out_dir={tmp_path / 'sft'}", "--version=hf", f"--output={tmp_path / 'hf'}")
    reference = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert_same_logits(model, reference, vocab_size=40000)
    run("export.py", f"--out_dir={tmp_path / 'sft'}", f"--output={tmp_path / 'run_c' / 'model.bin'}")
    cfg, weights = read_v0(str(tmp_path / "run_c" / "model.bin"))
    tokens = torch.randint(0, 40000, (12,))
    with torch.no_grad():
        expected = model(tokens[None], tokens[None])[0][0].numpy()
    torch.testing.assert_close(torch.from_numpy(numpy_forward(cfg, weights, tokens.numpy())).float(),
                               torch.from_numpy(expected), atol=1e-4, rtol=1e-4)


def test_run_c_formats_are_refused_for_a_model_run_c_would_compute_differently(tmp_path, tiny_ckpt):
    hf_llama(tmp_path, vocab_size=8192, **SHAPES["gqa, tied, rope theta 50000"])
    shutil.copy(os.path.join(tiny_ckpt, "tokenizer.model"), tmp_path)
    one_line_error(run("export.py", f"--out_dir={tmp_path}", check=False), "rope_theta=50000", "--version=hf")
