"""
Corpora -> tokenizer -> token files.

    python prepare_data.py                                  # the built-in demo corpus, no download
    python prepare_data.py --input=wiki.json,seq_monkey.jsonl --sft_input=belle/ --vocab_size=32000
    python prepare_data.py --tokenizer_model=chatglm3/tokenizer.model --input=corpus/

Writes into data_dir (default data/), the folder every later stage reads as --data_dir:
    tokenizer.model                   the sentencepiece model every later stage loads
    train_000.bin, val_000.bin, ...   pretraining tokens, uint16, each document as [BOS] + tokens
    train_000.json, ...               sidecar: dtype, tokens, documents, characters, tokenizer hash
    sft_{train,test}.bin              SFT conversations' tokens, uint16, concatenated
    sft_{train,test}_mask.bin         uint8, 1 exactly on assistant answer tokens and their EOS
    sft_{train,test}_index.npy        int64 offsets: conversation i is tokens[index[i]:index[i+1]]
    sft_{train,test}.json             sidecar; sft_test.jsonl holds the raw held-out conversations
    dpo_{train,test}.bin, ...         DPO pairs, the same four files: sequence 2i is prompt + chosen answer,
                                      2i + 1 prompt + rejected answer; dpo_test.jsonl the raw held-out pairs

Inputs: --input (pretraining documents), --sft_input (conversations), --dpo_input (preference pairs),
each "demo", or comma-separated files and directories (searched recursively). The layouts read (JSONL,
JSON, Parquet, text; Belle, ShareGPT, messages; TRL's and other pair formats) are data_formats.py's. A conversation
longer than --block_size tokens is cut after its last whole answer that fits, or skipped; DPO answers are cut to fit.

Every document is split into train or val by a hash of its text, so the split never depends on
file order or worker count, and the demo's SFT test questions come only from val documents.
"""
import collections
import glob
import json
import multiprocessing
import os
import shutil
import signal
import time

import numpy as np

import demo
from data_formats import Counts, file_conversations, file_documents, file_pairs, input_files
from tokenizer import (Tokenizer, add_chinese_pieces, compatibility_warnings, is_chinese, is_val, train_tokenizer,
                       turn_boundary_cut)

# -----------------------------------------------------------------------------
input = "demo"              # pretraining sources: "demo", or comma-separated files/directories; "": none
sft_input = "demo"          # SFT conversations: "demo", or comma-separated files/directories; "" skips SFT data
text_field = ""             # the JSON field or Parquet column holding a document's text; "": text, completion or content
data_dir = "data"           # where the tokenizer and token files go (the data_dir of every later stage)
out_dir: str = None         # the old name of data_dir, still read (with a note)
vocab_size = 8192           # size of the tokenizer to train (at most 65535: token files are uint16)
character_coverage = 0.9995  # the share of the text's characters that get a piece; rarer ones are spelled in bytes
tokenizer_model = ""        # an existing sentencepiece .model to use instead of training one
extend_tokenizer = ""       # a .model (e.g. Llama 2's) to extend with Chinese pieces learned from --input
tokenizer_train_chars = 100_000_000  # the tokenizer trains on the first this many characters of train text
workers = os.cpu_count() or 1  # processes that parse and tokenize; 1: one process, sentencepiece threads on all cores
val_fraction = 0.01         # share of documents (and SFT conversations) held out, by hash
shard_tokens = 200_000_000  # tokens per .bin shard (400 MB)
block_size = 512            # SFT conversations are cut at a turn boundary to fit this many tokens (the rows sft.py
                            # trains on: the model's context or its --block_size), DPO answers too
max_len: int = None         # the old names of block_size, still read (with a note)
sft_max_len: int = None
dpo_input = "demo"          # DPO preference pairs: "demo", or comma-separated files/directories; "" skips DPO data
# -----------------------------------------------------------------------------

BATCH_CHARS = 1 << 18       # characters of text sent to a worker at a time


# ---------------------------------------------------------------------------- tokenizing in parallel

_tok = None
_threads = -1  # sentencepiece threads per process: all cores inline, one each in a pool of processes


def _init_worker(model_path, threads=1):
    global _tok, _threads
    _tok, _threads = Tokenizer(model_path), threads
    if threads != -1:  # a pool worker: Ctrl-C is the main process's to handle (a worker killed by it hangs the pool)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def encode_documents(docs, fraction):
    """Worker: documents -> per split (uint16 tokens with each document as [BOS] + ids, documents, chars)."""
    out = {"train": [[], 0, 0], "val": [[], 0, 0]}
    for doc, ids in zip(docs, _tok.encode_batch(docs, num_threads=_threads)):
        part = out["val" if is_val(doc, fraction) else "train"]
        part[0].append(_tok.bos_id)
        part[0].extend(ids)
        part[1] += 1
        part[2] += len(doc)
    return {split: (np.array(t, dtype=np.uint16), n, c) for split, (t, n, c) in out.items()}


def encode_conversations(batch, block_size):
    """Worker: (split, meta, messages) -> (split, raw record, [(ids, mask)] or [] when skipped, status)."""
    results = []
    for split, meta, messages in batch:
        ids, mask = _tok.encode_chat(messages)
        status = "kept"
        if len(ids) > block_size:
            cut = turn_boundary_cut(ids, _tok.bos_id, block_size)
            if cut:
                ids, mask, status = ids[:cut], mask[:cut], "truncated at a turn boundary"
            else:
                ids, status = [], "skipped: first turn longer than block_size"
        if ids and not any(mask):
            ids, status = [], "skipped: no answer tokens"
        results.append((split, dict(meta, messages=messages), [(ids, mask)] if ids else [], status))
    return results


def encode_pairs(batch, block_size):
    """Worker: (split, meta, prompt, chosen, rejected) -> (split, raw record, [(ids, mask)] x 2 or [], status)."""
    results = []
    for split, meta, prompt, chosen, rejected in batch:
        prompt_ids, _ = _tok.encode_chat(prompt)
        answers = [_tok.encode(answer, eos=True) for answer in (chosen, rejected)]
        status = "kept"
        if chosen.strip() == rejected.strip():
            status, answers = "skipped: chosen and rejected are the same", []
        elif len(prompt_ids) >= block_size:
            status, answers = "skipped: prompt alone longer than block_size", []
        elif len(prompt_ids) + max(map(len, answers)) > block_size:
            status = "answers cut to fit block_size"
            answers = [ids[:block_size - len(prompt_ids)] for ids in answers]
        sequences = [(prompt_ids + ids, [0] * len(prompt_ids) + [1] * len(ids)) for ids in answers]
        results.append((split, dict(meta, prompt=prompt, chosen=chosen, rejected=rejected), sequences, status))
    return results


def parallel_map(fn, batches, n_workers, init_args):
    """fn over batches, results in input order, at most 2 batches per worker in flight: memory stays flat."""
    if n_workers <= 1:
        _init_worker(*init_args, threads=-1)
        for batch in batches:
            yield fn(*batch)
        return
    # Ctrl-C stays blocked while the workers start: one that arrived before a worker's initializer ignores
    # it killed that worker holding the pool's queue lock, and the pool then hung on exit; the parent
    # gets any Ctrl-C of that moment as soon as the pool stands
    blocked = hasattr(signal, "pthread_sigmask")
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pool = multiprocessing.Pool(n_workers, initializer=_init_worker, initargs=init_args)
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # never Pool.terminate(): it was seen to hang for good when Ctrl-C came mid-stream (its task thread
    # waiting on a queue lock). The workers ignore Ctrl-C, so the few batches in flight finish, then all leave
    try:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(fn, batch))
            if len(pending) >= 2 * n_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.close()
        pool.join()


# ---------------------------------------------------------------------------- writing outputs

OUTPUT_KINDS = {"pretraining": ["train_[0-9]*", "val_[0-9]*"], "sft": ["sft_*"], "dpo": ["dpo_*"]}


def publish(data_dir, tmp_paths, written_kinds, tokenizer_changed):
    """Rename this run's outputs into place, at the very end, and remove an earlier run's files of the kinds this
    run wrote (of every kind when the tokenizer changed): a data directory never mixes two runs."""
    final = {p[:-len(".tmp")] for p in tmp_paths}
    stale_kinds = OUTPUT_KINDS if tokenizer_changed else {k: OUTPUT_KINDS[k] for k in written_kinds}
    stale = {p for patterns in stale_kinds.values() for pattern in patterns
             for p in glob.glob(os.path.join(data_dir, pattern)) if not p.endswith(".tmp")} - final
    for path in sorted(stale):
        os.remove(path)
    if stale and tokenizer_changed:
        print(f"removed {len(stale)} file(s) of an earlier run made with another tokenizer")
    for tmp in tmp_paths:
        os.replace(tmp, tmp[:-len(".tmp")])


class ShardWriter:
    """Appends uint16 tokens to {split}_000.bin, {split}_001.bin, ... in data_dir (as .tmp until publish)."""

    def __init__(self, data_dir, split, meta, shard_tokens):
        self.data_dir, self.split, self.meta, self.shard_tokens = data_dir, split, meta, shard_tokens
        self.paths, self.file = [], None
        self.total_tokens = self.total_docs = 0

    def _open(self):
        self._close_shard()
        path = os.path.join(self.data_dir, f"{self.split}_{len(self.paths) // 2:03d}.bin.tmp")
        self.paths += [path, path.replace(".bin.tmp", ".json.tmp")]
        self.file, self.tokens, self.docs, self.chars = open(path, "wb"), 0, 0, 0

    def _close_shard(self):
        if self.file is None:
            return
        self.file.close()
        with open(self.paths[-1], "w") as f:
            json.dump(dict(self.meta, dtype="uint16", tokens=self.tokens, documents=self.docs, chars=self.chars),
                      f, indent=1)

    def write(self, tokens, docs, chars):
        if self.file is None or self.tokens >= self.shard_tokens:
            self._open()
        tokens.tofile(self.file)
        self.tokens += len(tokens)
        self.docs += docs
        self.chars += chars
        self.total_tokens += len(tokens)
        self.total_docs += docs

    def close(self):
        if self.file is None:
            self._open()  # an empty split still gets a (zero-token) shard, so pretrain.py can say it is empty
        self._close_shard()
        return self.paths


def batched(items, max_chars=BATCH_CHARS, max_items=4096):
    batch, n = [], 0
    for item in items:
        batch.append(item)
        n += len(item) if isinstance(item, str) else 1
        if n >= max_chars or len(batch) >= max_items:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def prepare_tokenizer(path, documents, tokenizer_model, vocab_size, val_fraction, train_chars, workers, extend="",
                      coverage=0.9995):
    """The tokenizer written to path: a copy of tokenizer_model, one trained on the train documents, or
    (extend) that existing tokenizer with Chinese pieces trained on them appended."""
    if tokenizer_model:
        if not os.path.isfile(tokenizer_model):
            raise SystemExit(f"error: tokenizer_model {tokenizer_model} does not exist")
        shutil.copyfile(tokenizer_model, path)
        tok = Tokenizer(path)
        if tok.n_words > 65535:
            raise SystemExit(f"error: {tokenizer_model} has {tok.n_words} ids; uint16 token files hold at most 65535")
        for w in compatibility_warnings(tok.sp):
            print(f"warning: {tokenizer_model}: {w}")
        print(f"using tokenizer {tokenizer_model}: {tok.n_words} ids, sha {tok.sha}")
        return tok

    def train_lines():
        n = 0
        for doc in documents(report=False):
            if is_val(doc, val_fraction):
                continue  # the tokenizer never sees val text either
            for line in doc.split("\n"):
                if line.strip():
                    yield line
                    n += len(line)
            if n >= train_chars:
                return

    t0 = time.time()
    if extend:
        if not os.path.isfile(extend):
            raise SystemExit(f"error: extend_tokenizer {extend} does not exist")
        base = Tokenizer(extend)
        print(f"extending {extend} ({base.n_words} pieces) with Chinese pieces to {vocab_size}...")
        added = add_chinese_pieces(extend, train_lines, path, vocab_size, num_threads=workers)
        tok = Tokenizer(path)
        sample = [doc for _, doc in zip(range(2000), documents(report=False))]
        chinese = sum(is_chinese(c) for doc in sample for c in doc)
        before, after = (sum(len(ids) for ids in t.encode_batch(sample)) for t in (base, tok))
        print(f"added {added} pieces ({tok.n_words} in all, sha {tok.sha}) in {time.time() - t0:.1f}s; on the first "
              f"{len(sample)} documents: {before / max(1, chinese):.2f} tokens per Chinese character before, "
              f"{after / max(1, chinese):.2f} after")
        if tok.n_words < vocab_size:
            print(f"warning: {tok.n_words} pieces, {vocab_size - tok.n_words} fewer than --vocab_size={vocab_size}: "
                  f"the text offered no more Chinese pieces that {extend} lacks; add text, or ask for fewer")
        for w in compatibility_warnings(tok.sp):
            print(f"warning: {extend}: {w}")
        return tok
    print(f"training a {vocab_size}-piece BPE tokenizer...")
    train_tokenizer(train_lines(), path, vocab_size, num_threads=workers, character_coverage=coverage)
    tok = Tokenizer(path)
    print(f"trained the tokenizer ({tok.n_words} pieces, sha {tok.sha}) in {time.time() - t0:.1f}s")
    return tok


def prepare_pretraining(tok, documents, data_dir, val_fraction, workers, shard_tokens):
    """Token shards of the documents, as .tmp files; returns their paths."""
    meta = {"tokenizer_sha": tok.sha, "vocab_size": tok.n_words}
    writers = {split: ShardWriter(data_dir, split, meta, shard_tokens) for split in ("train", "val")}
    t0 = time.time()
    batches = ((b, val_fraction) for b in batched(documents()))
    for result in parallel_map(encode_documents, batches, workers, (tok.model_path,)):
        for split, (tokens, docs, chars) in result.items():
            if docs:
                writers[split].write(tokens, docs, chars)
    train, val = writers["train"], writers["val"]
    if train.total_docs + val.total_docs == 0:
        raise SystemExit("error: the pretraining input holds no usable document (see the summary lines above); "
                         "nothing was written")
    dt = time.time() - t0
    print(f"pretraining tokens: train {train.total_tokens:,} ({train.total_docs:,} documents), "
          f"val {val.total_tokens:,} ({val.total_docs:,} documents); "
          f"{(train.total_tokens + val.total_tokens) / dt:,.0f} tokens/s with {workers} worker(s)")
    if val.total_docs == 0:
        print("warning: no document fell into val; raise --val_fraction or add data")
    return train.close() + val.close()


def prepare_masked(kind, tok, records, encode, data_dir, workers, block_size):
    """
    Masked sequences (kind "sft": a conversation each; "dpo": for pair i, sequence 2i is prompt + chosen
    answer and 2i + 1 prompt + rejected answer) as .tmp files per split: {kind}_{split}.bin (uint16
    tokens), _mask.bin (uint8, 1 on the tokens the loss counts: answers and their EOS), _index.npy (int64
    offsets), .json (the sidecar) and, for test, .jsonl (the raw held-out records, for evaluate.py).
    records() yields the encoder's input; encode(batch, block_size) runs in the workers.
    """
    t0 = time.time()
    label, item = {"sft": ("SFT", "conversation"), "dpo": ("DPO", "pair")}[kind]
    outputs = {}
    for split in ("train", "test"):
        prefix = os.path.join(data_dir, f"{kind}_{split}")
        outputs[split] = {"tokens": open(prefix + ".bin.tmp", "wb"), "mask": open(prefix + "_mask.bin.tmp", "wb"),
                          "raw": open(prefix + ".jsonl.tmp", "w", encoding="utf-8") if split == "test" else None,
                          "offsets": [0], "items": 0, "answer_tokens": 0, "prefix": prefix}
    counts = Counts()
    batches = ((b, block_size) for b in batched(records(), max_chars=256))
    for results in parallel_map(encode, batches, workers, (tok.model_path,)):
        for split, raw, sequences, status in results:
            counts[status] += 1
            if not sequences:
                continue
            o = outputs[split]
            for ids, mask in sequences:
                np.array(ids, dtype=np.uint16).tofile(o["tokens"])
                np.array(mask, dtype=np.uint8).tofile(o["mask"])
                o["offsets"].append(o["offsets"][-1] + len(ids))
                o["answer_tokens"] += sum(mask)
            o["items"] += 1
            if o["raw"]:
                o["raw"].write(json.dumps(raw, ensure_ascii=False) + "\n")
    tmp_paths = []
    for split, o in outputs.items():
        for f in ("tokens", "mask", "raw"):
            if o[f]:
                o[f].close()
        prefix = o["prefix"]
        with open(prefix + "_index.npy.tmp", "wb") as f:
            np.save(f, np.array(o["offsets"], dtype=np.int64))
        with open(prefix + ".json.tmp", "w") as f:
            json.dump({"tokenizer_sha": tok.sha, "vocab_size": tok.n_words, "dtype": "uint16", "block_size": block_size,
                       f"{item}s": o["items"], "tokens": o["offsets"][-1],
                       "answer_tokens": int(o["answer_tokens"])}, f, indent=1)
        tmp_paths += [prefix + s for s in (".bin.tmp", "_mask.bin.tmp", "_index.npy.tmp", ".json.tmp")]
        if o["raw"]:
            tmp_paths.append(prefix + ".jsonl.tmp")
    print(counts.summary(f"{label} {item}s").strip())
    train, test = outputs["train"], outputs["test"]
    if train["items"] == 0:
        raise SystemExit(f"error: the {label} input holds no usable training {item} (see the counts above); "
                         f"nothing was written")
    print(f"{label}: train {train['items']:,} {item}s ({train['answer_tokens']:,} answer tokens), test "
          f"{test['items']:,}; {time.time() - t0:.1f}s")
    if test["items"] == 0:
        print(f"warning: no {label} {item} fell into the test split; raise --val_fraction or add data (the "
              f"training stage needs held-out {item}s)")
    return tmp_paths


def main():
    global block_size, data_dir
    if out_dir is not None:
        print(f"note: --out_dir is now --data_dir, as every later stage calls it; using data_dir={out_dir}")
        data_dir = out_dir
    for old_name, value in (("max_len", max_len), ("sft_max_len", sft_max_len)):
        if value is not None:
            print(f"note: --{old_name} is now --block_size, as sft.py and dpo.py call a row's length; "
                  f"using block_size={value}")
            block_size = value
    if not input and not sft_input and not dpo_input:
        raise SystemExit("error: nothing to do: --input, --sft_input and --dpo_input are all empty")
    if workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    documents = conversations = None
    if input == "demo":
        # called twice: for the tokenizer (without the per-file summaries), then for the tokens
        documents = lambda report=True: demo.documents(val_fraction)  # noqa: E731
    elif input:
        files = input_files(input, (".jsonl", ".json", ".txt", ".parquet"))
        documents = lambda report=True: file_documents(files, report, text_field)  # noqa: E731
    if sft_input == "demo":
        conversations = lambda: demo.sft_conversations(val_fraction)  # noqa: E731
    elif sft_input:
        sft_files = input_files(sft_input, (".jsonl", ".json", ".parquet"))
        conversations = lambda: file_conversations(sft_files, val_fraction)  # noqa: E731
    pairs = None
    if dpo_input == "demo":
        pairs = lambda: demo.preference_pairs(val_fraction)  # noqa: E731
    elif dpo_input:
        dpo_files = input_files(dpo_input, (".jsonl", ".json", ".parquet"))
        pairs = lambda: file_pairs(dpo_files, val_fraction)  # noqa: E731
    if extend_tokenizer and (tokenizer_model or documents is None):
        raise SystemExit("error: --extend_tokenizer trains the new pieces on --input: give an --input, and no "
                         "--tokenizer_model")
    tokenizer_path = os.path.join(data_dir, "tokenizer.model")
    if documents is None and not tokenizer_model and not os.path.exists(tokenizer_path):
        raise SystemExit("error: SFT or DPO data alone needs a tokenizer: pass --tokenizer_model or prepare "
                         "pretraining data first")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise SystemExit(f"error: --data_dir={data_dir} is a file, not a directory; choose another --data_dir")
    os.makedirs(data_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(data_dir, "*.tmp")):
        os.remove(stale)  # left by a run that was killed

    try:
        old_sha = Tokenizer(tokenizer_path).sha if os.path.exists(tokenizer_path) else None
        tmp_paths = []
        if documents is not None or tokenizer_model:
            tok = prepare_tokenizer(tokenizer_path + ".tmp", documents, tokenizer_model, vocab_size, val_fraction,
                                    tokenizer_train_chars, workers, extend_tokenizer, character_coverage)
            tmp_paths.append(tok.model_path)
        else:
            tok = Tokenizer(tokenizer_path)
        if documents is not None:
            tmp_paths += prepare_pretraining(tok, documents, data_dir, val_fraction, workers, shard_tokens)
        if conversations is not None:
            tmp_paths += prepare_masked("sft", tok, conversations, encode_conversations, data_dir, workers, block_size)
        if pairs is not None:
            tmp_paths += prepare_masked("dpo", tok, pairs, encode_pairs, data_dir, workers, block_size)
        written = [kind for kind, source in (("pretraining", documents), ("sft", conversations), ("dpo", pairs))
                   if source is not None]
        publish(data_dir, tmp_paths, written, tokenizer_changed=old_sha not in (None, tok.sha))
    except BaseException as e:
        # an error or Ctrl-C: nothing half-written stays behind, and the outputs of the last complete
        # run are untouched (this run's replace them only in publish(), at the very end)
        for partial in glob.glob(os.path.join(data_dir, "*.tmp")):
            os.remove(partial)
        if isinstance(e, KeyboardInterrupt):
            raise SystemExit(f"\ninterrupted: nothing was written; {data_dir}/ holds what it held before")
        raise
    print(f"wrote {len(tmp_paths)} files to {data_dir}/")


if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    main()
