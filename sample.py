"""
Generate text with any checkpoint (pretrain.py's, sft.py's, dpo.py's, or an imported Llama), streaming
tokens as they come. Decoding itself is engine.py's (the same tokens as evaluate.py and serve.py).

    python sample.py --start "床前明月光，"                  # continue a prompt
    python sample.py --start=FILE:prompt.txt --num_samples=3
    python sample.py --chat --out_dir=out-sft               # talk to an SFT model (/reset, /quit)
    python sample.py --chat --out_dir=out-sft --prompt "“一马当先”是什么意思？"   # one answer, then exit
"""
import sys
import time

import torch

from checkpoint import load_model, stage_of
from configurator import check_ranges, configure
from device import PTDTYPE, resolve_device
from engine import TextStreamer, compiled_step, generate
from tokenizer import read_text_file

# -----------------------------------------------------------------------------
out_dir = "out"              # the checkpoint directory (ckpt.pt, tokenizer.model)
tokenizer = ""               # a tokenizer .model to use instead of out_dir/tokenizer.model
start = "床前明月光，"        # the prompt to continue; "FILE:path" reads it from a file
num_samples = 1              # samples of the same prompt, one after another
max_new_tokens = 200         # tokens to generate at most (the context may end a sample sooner)
temperature = 0.8            # 0: greedy
top_k = 0                    # sample from the k likeliest tokens only; 0: off
top_p = 0.9                  # nucleus sampling: the likeliest tokens that cover top_p; 1.0: off
repetition_penalty: float = None  # >1 discourages repeats; 1.0: off; None: 1.1 sampling, off at temperature 0
chat = False                 # chat with an SFT model instead of continuing text
system = ""                  # chat: an optional system prompt
prompt = ""                  # chat: answer this one message and exit instead of reading from the terminal
use_cache = True             # the KV cache; off only to measure what it saves
compile = False              # compile a fixed-shape decode step: faster for small models on CPU (docs/benchmarks.md)
seed = 1337                  # sampling at temperature > 0 is a function of it
device = "auto"              # auto: cuda, then mps, then cpu
dtype = "auto"               # auto: bfloat16 on GPUs that support it, else float32
# -----------------------------------------------------------------------------


def cut_message(tok, messages, budget):
    """
    The messages with the last one's text cut from its front until the prompt fits budget tokens: the
    template (BOS, [INST]) and the system prompt stay, as the model was trained to see them. The most
    characters that fit are found by bisection, since tokens and characters do not map one to one.
    """
    text, head = messages[-1]["content"], messages[:-1]

    def fits(n):
        kept = {"role": "user", "content": text[len(text) - n:] if n else ""}
        return len(tok.encode_chat(head + [kept])[0]) <= budget

    keep, more = 0, len(text)  # fits(keep); not fits(more + 1) unless more == len(text)
    while keep < more:
        mid = (keep + more + 1) // 2
        keep, more = (mid, more) if fits(mid) else (keep, mid - 1)
    return head + [{"role": "user", "content": text[len(text) - keep:] if keep else ""}]


def generate_text(model, tok, ids, stream=True, answer=False, **generate_kwargs):
    """(text, tokens, seconds, why it stopped: "stop", "length" or "context") of engine.generate after ids, printed
    as it goes; answer: a chat answer (decoded on its own), not a continuation of ids."""
    x = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    streamer = TextStreamer(tok, () if answer else ids)
    out, n, t0, why = [], 0, time.time(), []
    for token in generate(model, x, stop_tokens=tok.stop_ids, why=why, **generate_kwargs):
        n += 1
        if token.item() in tok.stop_ids:
            break
        piece = streamer.put(token.item())
        out.append(piece)
        if stream and piece:
            print(piece, end="", flush=True)
    dt = time.time() - t0
    piece = streamer.end()
    out.append(piece)
    if stream and piece:
        print(piece, end="", flush=True)
    return "".join(out), n, dt, why[0] if why else "stop"


def report(n, dt, why, max_seq_len):
    note = f"; stopped: the {max_seq_len}-token context is full" if why == "context" else ""
    print(f"[{n} tokens, {n / max(dt, 1e-9):.1f} tokens/s{note}]", file=sys.stderr)


def main():
    config = configure(globals())
    check_ranges(config, at_least_1=("num_samples", "max_new_tokens"), at_least_0=("temperature", "top_k"),
                 positive=("top_p", "repetition_penalty"))
    if top_p > 1:
        raise SystemExit(f"error: --top_p must be at most 1, got {top_p}")
    torch.manual_seed(seed)
    dev, dt = resolve_device(device, dtype)
    model, tok, checkpoint = load_model(out_dir, dev, PTDTYPE[dt], tokenizer)
    max_seq_len = model.args.max_seq_len
    # temperature 0 is the plain greedy decoding other tools (llama.cpp, transformers) print, unless a penalty
    # is asked for; sampling gets a mild one by default
    penalty = repetition_penalty if repetition_penalty is not None else 1.0 if temperature == 0 else 1.1
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                    repetition_penalty=penalty, use_cache=use_cache)
    if compile and use_cache:  # compiled on first use (a minute); greedy output is the same as without
        settings["step"] = compiled_step(model)
    try:
        if chat:
            chat_loop(model, tok, checkpoint, max_seq_len, settings)
        else:
            continue_text(model, tok, max_seq_len, settings)
    except KeyboardInterrupt:
        print("\n(interrupted)", file=sys.stderr)
        raise SystemExit(130)


def continue_text(model, tok, max_seq_len, settings):
    text = start
    if text.startswith("FILE:"):
        text, encoding = read_text_file(text[len("FILE:"):])
        if encoding != "utf-8":
            print(f"note: the prompt file is not UTF-8; read it as {encoding.upper()}", file=sys.stderr)
        text = text[:-1] if text.endswith("\n") else text  # the newline an editor puts at the end of a file
    ids = [tok.bos_id] + tok.encode(text)
    room = max_seq_len - min(max_new_tokens, max_seq_len // 2)
    if len(ids) > room:
        print(f"note: the prompt has {len(ids)} tokens; keeping its last {room} so the answer fits the "
              f"{max_seq_len}-token context", file=sys.stderr)
        ids = [tok.bos_id] + ids[-(room - 1):]
    for k in range(num_samples):
        print(tok.decode(ids[1:]), end="", flush=True)
        # a document ends where the next begins (BOS), as in run.c; EOS ends SFT answers
        _, n, dt, why = generate_text(model, tok, ids, **settings)
        print()
        report(n, dt, why, max_seq_len)
        if k + 1 < num_samples:
            print("---------------")


def chat_loop(model, tok, checkpoint, max_seq_len, settings):
    if stage_of(checkpoint).chat is False:  # an imported model may be a chat model
        print(f"warning: {out_dir}/ckpt.pt is a {checkpoint.get('stage', 'unknown')} checkpoint that never saw chat "
              f"data; expect poor answers (fine-tune it with sft.py)", file=sys.stderr)
    if not prompt:
        try:
            import readline  # noqa: F401  (arrow keys and history in input(), where the platform has it)
        except ImportError:
            pass
        print(f"chatting with {out_dir} ({max_seq_len}-token context): /reset clears the history, /quit or Ctrl-D "
              f"exits, Ctrl-C stops an answer", file=sys.stderr)
    turns = []
    budget = max_seq_len - min(max_new_tokens, max_seq_len // 2)
    head = [{"role": "system", "content": system}] if system else []
    alone = len(tok.encode_chat(head + [{"role": "user", "content": ""}])[0])
    if alone > budget:
        raise SystemExit(f"error: --system takes {alone} tokens in the chat template, more than the {budget} the "
                         f"{max_seq_len}-token context keeps for a question before the answer; shorten it")
    while True:
        if prompt:
            user = prompt
        else:
            try:
                user = input("\n你: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if user in ("/quit", "/exit"):
                return
            if user == "/reset":
                turns = []
                print("(history cleared)")
                continue
            if not user:
                continue
        history = [{"role": role, "content": text} for turn in turns for role, text in zip(("user", "assistant"), turn)]
        ids, messages, dropped = tok.fit_chat(head + history + [{"role": "user", "content": user}], budget)
        if dropped:
            print(f"(dropped the {dropped} oldest turn(s) to fit the {max_seq_len}-token context)", file=sys.stderr)
        turns = turns[dropped:]
        if len(ids) > budget:
            messages = cut_message(tok, messages, budget)
            ids, _ = tok.encode_chat(messages)
            print(f"(your message is too long for the {max_seq_len}-token context; keeping its last "
                  f"{len(messages[-1]['content'])} characters)", file=sys.stderr)
        if not prompt:
            print("助手: ", end="", flush=True)
        try:
            answer, n, dt, why = generate_text(model, tok, ids, answer=True, **settings)
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            if prompt:
                raise
            print("\n(answer interrupted)")
            continue
        print()
        report(n, dt, why, max_seq_len)
        turns.append((user, answer))
        if prompt:
            return


if __name__ == "__main__":
    main()
