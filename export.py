"""
Export a checkpoint (ours, or an imported Llama) for llama2.c, Hugging Face transformers, or llama.cpp.

    python export.py                                  # out/ckpt.pt -> out/model.bin (version 0, fp32), tokenizer.bin
    python export.py --version=2 --output=out/model_q80.bin     # int8 Q8_0 for runq.c
    python export.py --version=hf --output=hf-model   # a LlamaForCausalLM directory
    python export.py --out_dir=out-sft                # any checkpoint directory
    python export.py --version=gguf --gguf_type=q8_0  # out/model.gguf + out/Modelfile for llama.cpp and ollama
    python export.py --out_dir=out-llama-zh --version=peft   # a LoRA run's adapters alone, for Hugging Face PEFT

Then, with llama2.c built (make run / make runq):
    ./run out/model.bin -z out/tokenizer.bin -t 0 -i "床前明月光，"
    ./run out-sft/model.bin -z out-sft/tokenizer.bin -m chat
    ./runq out/model_q80.bin -z out/tokenizer.bin -i "床前明月光，"

Formats (llama2.c at commit 350e04f):
- version 0 (run.c): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len;
  vocab_size negative when the classifier is not the embedding), then fp32 tensors grouped by kind
  across layers, the two RoPE tables (run.c skips them) and the classifier if unshared.
- version 2 (runq.c): magic "ak42", version, the same 7 ints, shared-classifier byte, group size,
  zero padding to 256 bytes, fp32 norms, then each matmul weight as int8 values + fp32 group scales.
- tokenizer.bin: uint32 max piece length, then per id: float32 score, uint32 length, bytes ("▁" as a
  space; BOS/EOS as "\\n<s>\\n" / "\\n</s>\\n"). It has no count: run.c reads vocab_size entries.
"""
import json
import math
import os
import re
import shutil
import struct

import torch

from checkpoint import (HF_NAMES, checkpoint_format, find_tokenizer, hf_permute, llama2c_v0_layout, load_checkpoint,
                        load_model, ours_to_hf, writable)
from configurator import configure
from tokenizer import B_INST, B_SYS, E_INST, E_SYS, Tokenizer, write_text_file

# -----------------------------------------------------------------------------
out_dir = "out"              # the checkpoint directory (ckpt.pt, tokenizer.model), or an imported Llama
output = ""                  # the file (a directory for hf) to write; "": in out_dir, named after the version
version = "0"                # 0: fp32 for run.c; 2: int8 Q8_0 for runq.c; hf: Hugging Face directory; gguf: llama.cpp;
                             # peft: a LoRA run's adapters alone (adapter_config.json + adapter_model.safetensors)
gguf_type = "f16"            # gguf: the matrices' type, f32, f16 or q8_0 (norms stay f32)
group_size = 64              # version 2: the largest group size up to this that divides dim and hidden_dim
tokenizer_bin = True         # also write tokenizer.bin beside the model (llama2.c formats)
overwrite = False            # replace an existing --output that is not an export of this version (else refused)
# -----------------------------------------------------------------------------


def layer_weights(model, name):
    """One kind of weight across all layers, in layer order."""
    return [layer.get_submodule(name).weight for layer in model.layers]


def fp32_bytes(t):
    return t.detach().cpu().to(torch.float32).numpy().astype("<f4").tobytes()


def export_v0(model, path):
    a = model.args
    hidden_dim = model.layers[0].feed_forward.w1.weight.shape[0]
    shared = a.tie_embeddings
    header = (a.dim, hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads or a.n_heads, a.vocab_size, a.max_seq_len)
    state = model.state_dict()
    state["rope"] = torch.stack([model.rope_cos, model.rope_sin])  # (2, max_seq_len, head_dim/2)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<7i", *header[:5], a.vocab_size if shared else -a.vocab_size, a.max_seq_len))
        for name, shape in llama2c_v0_layout(*header, shared):
            assert state[name].shape == shape, (name, state[name].shape, shape)
            f.write(fp32_bytes(state[name]))
    os.replace(path + ".tmp", path)


def quantize_q80(w, gs):
    """Symmetric int8 per group of gs values: w ~ q * scale, |q| <= 127. Returns (int8 q, fp32 scales)."""
    groups = w.detach().float().reshape(-1, gs)
    scale = groups.abs().max(dim=1).values / 127.0
    q = torch.round(groups / scale.clamp(min=1e-30)[:, None]).to(torch.int8)  # an all-zero group stays zero
    return q, scale


def choose_group_size(dim, hidden_dim, limit):
    gs = limit
    while gs > 1 and (dim % gs or hidden_dim % gs):
        gs //= 2
    if gs < 8:  # runq.c has no tail handling: smaller groups would work but waste most of the file on scales
        raise SystemExit(f"error: no group size >= 8 divides both dim={dim} and hidden_dim={hidden_dim}; "
                         f"runq.c needs one (use --version=0)")
    return gs


def export_v2(model, path, gs):
    a = model.args
    hidden_dim = model.layers[0].feed_forward.w1.weight.shape[0]
    shared = a.tie_embeddings
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Ii", 0x616B3432, 2))
        f.write(struct.pack("<7i", a.dim, hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads or a.n_heads,
                            a.vocab_size, a.max_seq_len))
        f.write(struct.pack("<Bi", int(shared), gs))
        f.write(b"\0" * (256 - f.tell()))
        for t in [*layer_weights(model, "attention_norm"), *layer_weights(model, "ffn_norm"), model.norm.weight]:
            f.write(fp32_bytes(t))
        matrices = [model.tok_embeddings.weight, *layer_weights(model, "attention.wq"),
                    *layer_weights(model, "attention.wk"),
                    *layer_weights(model, "attention.wv"), *layer_weights(model, "attention.wo"),
                    *layer_weights(model, "feed_forward.w1"), *layer_weights(model, "feed_forward.w2"),
                    *layer_weights(model, "feed_forward.w3")]
        if not shared:
            matrices.append(model.output.weight)
        for w in matrices:
            q, scale = quantize_q80(w, gs)
            f.write(q.numpy().tobytes())
            f.write(fp32_bytes(scale))
    os.replace(path + ".tmp", path)


def export_tokenizer_bin(tok, path):
    pieces, scores = [], []
    for i in range(tok.n_words):
        piece = tok.id_to_piece(i)
        if i == tok.bos_id:
            piece = "\n<s>\n"
        elif i == tok.eos_id:
            piece = "\n</s>\n"
        pieces.append(piece.replace("▁", " ").encode("utf-8"))
        scores.append(tok.sp.get_score(i))
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<I", max(len(p) for p in pieces)))
        for piece, s in zip(pieces, scores):
            f.write(struct.pack("<fI", s, len(piece)))
            f.write(piece)
    os.replace(path + ".tmp", path)


# the chat templates of the Hugging Face/GGUF (Jinja) and ollama (Go) exports, spelled with tokenizer.py's
# constants so that they render what Tokenizer.encode_chat encodes (tests/test_export.py renders them)
HF_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    f"{{% for m in messages %}}{{% if m['role'] == 'user' %}}{{{{ bos_token }}}}{B_INST} "
    f"{{% if loop.first and system %}}{B_SYS}{{{{ system }}}}{E_SYS}{{% endif %}}{{{{ m['content'] }}}} {E_INST}"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def export_hf(model, tok, directory):
    a = model.args
    n_kv = a.n_kv_heads or a.n_heads
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu().float().contiguous() for k, v in ours_to_hf(model.state_dict(), a).items()}
    try:
        from safetensors.torch import save_file
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        readable_by_all(os.path.join(directory, "model.safetensors"))
    except ImportError:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
        "intermediate_size": model.layers[0].feed_forward.w1.weight.shape[0], "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": n_kv, "head_dim": a.dim // a.n_heads,
        "vocab_size": a.vocab_size, "max_position_embeddings": a.max_seq_len, "rms_norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta, "hidden_act": "silu", "tie_word_embeddings": a.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
        "torch_dtype": "float32",
    }
    write_text_file(os.path.join(directory, "config.json"), json.dumps(config, indent=1))
    # generate() stops at any of these: EOS ends a chat answer, BOS ends a base model's document (our
    # pretraining documents are [BOS] + text, so a document is over when the model predicts the next BOS)
    write_text_file(os.path.join(directory, "generation_config.json"),
                    json.dumps({"bos_token_id": tok.bos_id, "eos_token_id": [tok.eos_id, tok.bos_id]}, indent=1))
    shutil.copyfile(tok.model_path, os.path.join(directory, "tokenizer.model"))
    write_text_file(os.path.join(directory, "tokenizer_config.json"), json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
         "model_max_length": a.max_seq_len, "chat_template": HF_CHAT_TEMPLATE}, indent=1, ensure_ascii=False))


OURS_TO_HF = {ours: hf for hf, ours in HF_NAMES.items()}  # attention.wq -> self_attn.q_proj, ...


def export_peft(checkpoint, tok, directory):
    """
    A LoRA run's adapters on their own, as Hugging Face PEFT writes them (adapter_config.json and
    adapter_model.safetensors), to load with PeftModel.from_pretrained onto the base's Hugging Face export. The
    rotary layout of q and k differs there (hf_permute): their B matrices' rows are permuted alike. Embedding and
    classifier trained in full go in as PEFT's modules_to_save. Returns the notes to print.
    """
    from safetensors.torch import save_file
    config, trained, args = checkpoint["config"], checkpoint["lora"], checkpoint["model_args"]
    n_kv = args["n_kv_heads"] or args["n_heads"]
    full = "tok_embeddings.weight" in trained  # the embedding (and an untied classifier) trained in full
    tensors = {}
    for key, value in trained.items():
        if not key.startswith("layers."):
            continue  # the embedding and classifier: below
        _, i, group, matrix, kind = key.split(".")  # layers.{i}.attention.wq.lora_a
        module = f"{group}.{matrix}"
        if module in ("attention.wq", "attention.wk") and kind == "lora_b":
            value = hf_permute(value, args["n_heads"] if module == "attention.wq" else n_kv)
        name = "lora_A" if kind == "lora_a" else "lora_B"
        tensors[f"base_model.model.model.layers.{i}.{OURS_TO_HF[module]}.{name}.weight"] = value
    base = checkpoint["base"]
    base_tokenizer = find_tokenizer(base, required=False)
    added = tok.n_words - Tokenizer(base_tokenizer).n_words if base_tokenizer else 0  # pieces the run added
    if added and not full:
        raise SystemExit(f"error: the run added {added} embedding rows without training them "
                         f"(--train_embeddings=False): adapters alone cannot carry them; export the merged model "
                         f"with --version=hf")
    if full:  # PEFT keeps each module in full under its own name: a tied classifier is written twice
        embedding = trained["tok_embeddings.weight"]
        tensors["base_model.model.model.embed_tokens.weight"] = embedding
        tensors["base_model.model.lm_head.weight"] = trained.get("output.weight", embedding)
    targets = sorted(OURS_TO_HF[m].split(".")[-1] for m in OURS_TO_HF  # q_proj, ..., down_proj
                     if m.split(".")[-1] in config["lora_targets"].split(","))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config["lora_rank"], "lora_alpha": config["lora_alpha"],
        "lora_dropout": config["lora_dropout"], "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": ["embed_tokens", "lm_head"] if full else None, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base if checkpoint_format(base) == "hf" else None}
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()},
              os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    write_text_file(os.path.join(directory, "adapter_config.json"), json.dumps(adapter_config, indent=1))
    shutil.copyfile(tok.model_path, os.path.join(directory, "tokenizer.model"))
    notes = []
    if checkpoint_format(base) != "hf":
        notes.append(f"the base {base} is not a Hugging Face directory: export it first "
                     f"(python export.py --out_dir={base} --version=hf) and load the adapters onto that")
    if added:
        notes.append(f"the tokenizer has {added} pieces more than the base: call base.resize_token_embeddings"
                     f"({args['vocab_size']}) before PeftModel.from_pretrained")
    if checkpoint.get("base_dtype", "float32") != "float32":
        notes.append(f"the run kept its base in {checkpoint['base_dtype']}: on the unrounded base the adapters give "
                     f"nearly, not exactly, what the merged model (--version=hf) gives")
    return notes


GGUF_NAMES = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"}


def export_gguf(model, tok, path, qtype, name="llama2.zh"):
    """
    A GGUF file llama.cpp, llama-server and ollama run: architecture llama, every hyperparameter llama.cpp
    reads, our sentencepiece vocabulary (pieces, scores, token types: our byte pieces are llama.cpp's
    <0xNN> byte tokens), bos/eos/unk, BOS added and EOS not, BOS as an end of generation too (a base
    model's document ends there), and our chat template. The tensors keep our
    interleaved rotary layout, which is Meta's and the one llama.cpp's llama architecture uses; the
    classifier is left out when it is the embedding. qtype: "f32", "f16" or "q8_0" for the matrices.
    """
    try:
        import gguf
    except ImportError:
        raise SystemExit("error: --version=gguf needs the gguf package (llama.cpp's own writer): pip install gguf")
    a = model.args
    hidden_dim = model.layers[0].feed_forward.w1.weight.shape[0]
    if qtype == "q8_0" and (a.dim % 32 or hidden_dim % 32):
        raise SystemExit(f"error: Q8_0 packs rows in blocks of 32 values but dim={a.dim}, hidden_dim={hidden_dim}; "
                         f"use --gguf_type=f16")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer = gguf.GGUFWriter(path + ".tmp", "llama")
    writer.add_name(name)
    writer.add_context_length(a.max_seq_len)
    writer.add_embedding_length(a.dim)
    writer.add_block_count(a.n_layers)
    writer.add_feed_forward_length(hidden_dim)
    writer.add_head_count(a.n_heads)
    writer.add_head_count_kv(a.n_kv_heads or a.n_heads)
    writer.add_rope_dimension_count(a.dim // a.n_heads)
    writer.add_rope_freq_base(a.rope_theta)
    writer.add_layer_norm_rms_eps(a.norm_eps)
    writer.add_vocab_size(a.vocab_size)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("llama")
    pieces = [tok.id_to_piece(i) for i in range(tok.n_words)]
    scores = [tok.sp.get_score(i) for i in range(tok.n_words)]
    types = [gguf.TokenType.UNKNOWN if tok.sp.is_unknown(i) else gguf.TokenType.CONTROL if tok.sp.is_control(i)
             else gguf.TokenType.BYTE if tok.sp.is_byte(i) else gguf.TokenType.NORMAL for i in range(tok.n_words)]
    for i in range(tok.n_words, a.vocab_size):  # a padded vocabulary: rows no piece maps to
        pieces.append(f"[PAD{i}]")
        scores.append(-1e9)
        types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    # llama.cpp ends generation at any of its end-of-generation ids (EOS, end-of-text, end-of-message);
    # BOS as the end-of-text id makes it stop where sample.py and run.c stop, at the end of a document.
    # Prompts are tokenized as before: BOS still starts each one.
    writer.add_eot_token_id(tok.bos_id)
    writer.add_unk_token_id(tok.sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(HF_CHAT_TEMPLATE)

    def add(name, tensor):
        data = tensor.detach().cpu().float().numpy()
        if data.ndim == 1 or qtype == "f32":
            writer.add_tensor(name, data)  # norms stay f32, as llama.cpp's own converter keeps them
        elif qtype == "f16":
            writer.add_tensor(name, data.astype("float16"))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # shape from the packed rows

    add("token_embd.weight", model.tok_embeddings.weight)
    for i, layer in enumerate(model.layers):
        for ours, theirs in GGUF_NAMES.items():
            add(f"blk.{i}.{theirs}.weight", layer.get_submodule(ours).weight)
    add("output_norm.weight", model.norm.weight)
    if not a.tie_embeddings:
        add("output.weight", model.output.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(path + ".tmp", path)


OLLAMA_TEMPLATE = ("""{{- $system := "" }}
{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}{{- end }}{{- end }}
{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}{{ if not $first }}<s>{{ end }}""" + B_INST + " {{ if and $first $system }}" + B_SYS
                   + "{{ $system }}" + E_SYS + "{{ end }}{{ .Content }} " + E_INST + """{{ $first = false }}
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}""")


def write_modelfile(gguf_path, context):
    """
    An ollama Modelfile beside the GGUF (ollama's built-in llama2 template is not our chat format), with the model's
    context as num_ctx (ollama's default can exceed it) and only relative paths, so the folder can move. A Modelfile
    without our first line (one the user wrote or edited) is kept. Returns (its path, whether it was written).
    """
    path = os.path.join(os.path.dirname(os.path.abspath(gguf_path)), "Modelfile")
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        if not first.startswith((MODELFILE_MARK, "# ollama create my-model -f")):  # (the latter: older exports)
            return path, False
    write_text_file(path, f"{MODELFILE_MARK} (delete this line to keep your edits); cd here, then: "
                          f"ollama create my-model -f Modelfile\n"
                          f"FROM ./{os.path.basename(gguf_path)}\n"
                          f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
                          f'PARAMETER stop "</s>"\nPARAMETER stop "[INST]"\nPARAMETER num_ctx {context}\n')
    return path, True


MODELFILE_MARK = "# written by llama2.zh's export.py"


def refuse_for_llama2c(args, tok):
    """run.c hard-codes some constants and reads vocab_size tokenizer entries: refuse what it cannot represent."""
    if args.vocab_size != tok.n_words:
        # tokenizer.bin stores no count: run.c reads vocab_size entries, so the two must agree exactly
        raise SystemExit(f"error: the model has {args.vocab_size} embedding rows but the tokenizer "
                         f"{tok.n_words} pieces; llama2.c needs them equal (use --version=hf)")
    for name, value, runc in (("rope_theta", args.rope_theta, 10000.0), ("norm_eps", args.norm_eps, 1e-5)):
        if abs(value - runc) > 1e-3 * runc:
            raise SystemExit(f"error: the model has {name}={value:g} but llama2.c's run.c hard-codes {runc:g}; "
                             f"it would compute another model (use --version=hf)")


HF_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "pytorch_model.bin")


def output_path(output, out_dir, default_name, is_file=True):
    """--output, or out_dir/default_name; its directory is created and must be writable, or a one-line error
    says why not. A file's --output ending in a slash is a directory to write default_name into."""
    if output and is_file and output.endswith(("/", os.sep)):
        output = os.path.join(output, default_name)
    path = output or os.path.join(out_dir, default_name)
    directory = path if not is_file else os.path.dirname(os.path.abspath(path))
    if not is_file and os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: --output={path} is a file; --version={version} writes a directory: name a new one")
    if is_file and os.path.isdir(path):
        raise SystemExit(f"error: --output={path} is a directory; name the file to write")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create the directory of --output={path}: {e.strerror}")
    if not writable(directory):
        raise SystemExit(f"error: cannot write into {directory}; choose another --output")
    if is_file:
        refuse_to_replace(path, version if default_name != "tokenizer.bin" else "tokenizer.bin")
    elif os.path.abspath(path) == os.path.abspath(out_dir) or os.path.exists(os.path.join(path, "ckpt.pt")):
        raise SystemExit(f"error: --output={path} is a checkpoint's folder; the export would write over its "
                         f"tokenizer and files: name a new folder")
    if not is_file:  # our loader prefers an index: another model's shards left here would be read instead
        import glob
        stale = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*"))
                 if os.path.basename(p) in HF_WEIGHT_FILES or re.fullmatch(r"model-\d+-of-\d+\.safetensors|"
                                                                           r"pytorch_model-\d+-of-\d+\.bin",
                                                                           os.path.basename(p))]
        if stale:
            raise SystemExit(f"error: {path} holds another model's weights ({', '.join(sorted(stale)[:3])}); "
                             f"a new export beside them would be read inconsistently: choose an empty --output")
    return path


def refuse_to_replace(path, kind):
    """A one-line refusal when path is an existing file that is not an export of this kind (a checkpoint, a
    tokenizer, a log, anything else the user would lose), unless --overwrite=True."""
    if overwrite or not os.path.isfile(path) or an_export_of_ours(path, kind):
        return
    raise SystemExit(f"error: --output={path} exists and is not a --version={version} export (a checkpoint, a "
                     f"tokenizer, another file?); choose another --output, or pass --overwrite=True to replace it")


def an_export_of_ours(path, kind):
    """Whether the file at path has the layout export.py writes as kind (0, 2, gguf, tokenizer.bin)."""
    with open(path, "rb") as f:
        head = f.read(28)
        if kind == "tokenizer.bin":  # a max length, then (score, length, bytes) per piece, to the end exactly
            f.seek(4)
            while len(size := f.read(8)) == 8:
                f.seek(struct.unpack("<fI", size)[1], os.SEEK_CUR)
            return len(head) >= 4 and not size and f.tell() == os.path.getsize(path)
    if kind == "gguf":
        return head[:4] == b"GGUF"
    if kind == "2":
        return head[:8] == struct.pack("<Ii", 0x616B3432, 2)
    if len(head) < 28:
        return False
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", head)
    if min(dim, hidden, n_layers, n_heads, n_kv, seq, abs(vocab)) <= 0 or dim % n_heads or n_kv > n_heads \
            or n_layers > 1024 or n_heads > dim:
        return False
    layout = llama2c_v0_layout(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq, vocab > 0)
    return os.path.getsize(path) == 28 + 4 * sum(math.prod(shape) for _, shape in layout)


def readable_by_all(path):
    """Give a written file the permissions the umask allows (safetensors creates its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def main():
    configure(globals())
    if version not in ("0", "2", "hf", "gguf", "peft"):
        raise SystemExit(f"error: --version must be 0, 2, hf, gguf or peft, not {version!r}")
    if gguf_type not in ("f32", "f16", "q8_0"):
        raise SystemExit(f"error: --gguf_type must be f32, f16 or q8_0, not {gguf_type!r}")
    if version == "peft":
        export_adapters()
        return
    model, tok, _ = load_model(out_dir)
    try:
        write(model, tok)
    except OSError as e:  # a read-only file in the way, a full disk: one line, the file left as it was
        raise SystemExit(f"error: cannot write {e.filename or output or out_dir}: {e.strerror}; choose another "
                         f"--output")


def export_adapters():
    """--version=peft: the adapters of the LoRA run in out_dir, with its messages."""
    checkpoint = load_checkpoint(out_dir, merge=False)
    if not checkpoint.get("lora"):
        raise SystemExit(f"error: {out_dir} holds no LoRA adapters (it was not trained with --lora_rank); "
                         f"export the whole model with --version=hf")
    path = output_path(output, out_dir, "peft", is_file=False)
    try:
        notes = export_peft(checkpoint, Tokenizer(os.path.join(out_dir, "tokenizer.model")), path)
    except OSError as e:
        raise SystemExit(f"error: cannot write {e.filename or path}: {e.strerror}; choose another --output")
    print(f"wrote {path}/ (PEFT LoRA adapters, rank {checkpoint['config']['lora_rank']})")
    for note in notes:
        print("note: " + note)


def write(model, tok):
    """The export main() asked for, with its messages."""
    if version == "hf":
        path = output_path(output, out_dir, "hf", is_file=False)
        export_hf(model, tok, path)
        print(f"wrote {path}/ (LlamaForCausalLM, {model.num_params() / 1e6:.2f}M parameters)")
        return
    if version == "gguf":
        if model.args.vocab_size < tok.n_words:
            raise SystemExit(f"error: the model has {model.args.vocab_size} embedding rows but the tokenizer "
                             f"{tok.n_words} pieces")
        path = output_path(output, out_dir, "model.gguf")
        export_gguf(model, tok, path, gguf_type, name=os.path.basename(os.path.abspath(out_dir)))
        modelfile, written = write_modelfile(path, model.args.max_seq_len)
        print(f"wrote {path} (GGUF, {gguf_type}, {os.path.getsize(path) / 2**20:.1f} MB) and " +
              (modelfile if written else f"kept your {modelfile} (delete it to get ours)"))
        return
    refuse_for_llama2c(model.args, tok)
    path = output_path(output, out_dir, "model.bin" if version == "0" else "model_q80.bin")
    tpath = output_path("", os.path.dirname(os.path.abspath(path)), "tokenizer.bin") if tokenizer_bin else None
    if version == "0":
        export_v0(model, path)
        print(f"wrote {path} (version 0, fp32, {os.path.getsize(path) / 2**20:.1f} MB)")
    else:
        gs = choose_group_size(model.args.dim, model.layers[0].feed_forward.w1.weight.shape[0], group_size)
        export_v2(model, path, gs)
        print(f"wrote {path} (version 2, int8 Q8_0, group size {gs}, {os.path.getsize(path) / 2**20:.1f} MB)")
    if tpath:
        export_tokenizer_bin(tok, tpath)
        print(f"wrote {tpath} ({tok.n_words} pieces)")


if __name__ == "__main__":
    main()
