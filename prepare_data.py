"""
Corpora -> tokenizer -> token files.

    python prepare_data.py                                  # the built-in demo corpus, no download
    python prepare_data.py --input=wiki.json,seq_monkey.jsonl --sft_input=belle/ --vocab_size=32000
    python prepare_data.py --tokenizer_model=chatglm3/tokenizer.model --input=corpus/

Writes into out_dir (default data/):
    tokenizer.model                   the sentencepiece model every later stage loads
    train_000.bin, val_000.bin, ...   pretraining tokens, uint16, each document as [BOS] + tokens
    train_000.json, ...               sidecar: dtype, tokens, documents, characters, tokenizer hash
    sft_{train,test}.bin              SFT conversations' tokens, uint16, concatenated
    sft_{train,test}_mask.bin         uint8, 1 exactly on assistant answer tokens and their EOS
    sft_{train,test}_index.npy        int64 offsets: conversation i is tokens[index[i]:index[i+1]]
    sft_{train,test}.json             sidecar; sft_test.jsonl holds the raw held-out conversations
    dpo_{train,test}.bin, ...         DPO pairs, the same four files: sequence 2i is prompt + chosen answer,
                                      2i + 1 prompt + rejected answer; dpo_test.jsonl the raw held-out pairs

Pretraining inputs (files, or directories searched recursively):
    .jsonl  one JSON object per line with a "text" field         {"text": "床前明月光，疑是地上霜。"}
    .json   a JSON array of objects with "completion" (or text)  [{"completion": "..."}, ...]
            (a .json file whose first character is "{" is read as JSONL)
    .txt    plain text; blank lines separate documents
SFT inputs (.jsonl or .json, as above), one conversation per object:
    Belle     {"instruction": "...", "input": "...", "output": "..."}
    ShareGPT  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}
    messages  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]} or a bare list
              of such messages
    A conversation longer than --max_len tokens is cut after its last whole answer that fits, or skipped.
DPO inputs (--dpo_input, .jsonl or .json), one preference pair per object: TRL's prompt/chosen/rejected
    (strings or messages, or chosen/rejected conversations with the prompt implicit), ShareGPT with
    chosen/rejected, hh-rlhf-cn's context, or question/response_chosen/response_rejected; answers cut
    to fit --max_len.

Every document is split into train or val by a hash of its text, so the split never depends on
file order or worker count, and the demo's SFT test questions come only from val documents.
"""
import codecs
import collections
import glob
import json
import multiprocessing
import os
import shutil
import signal
import time

import numpy as np
from tqdm import tqdm

import demo
from tokenizer import (Tokenizer, add_chinese_pieces, compatibility_warnings, is_chinese, is_val, sniff_encoding,
                       split_turns, train_tokenizer, turn_boundary_cut)

# -----------------------------------------------------------------------------
input = "demo"              # pretraining sources: "demo", or comma-separated files/directories; "": none
sft_input = "demo"          # SFT conversations: "demo", or comma-separated files/directories; "" skips SFT data
out_dir = "data"            # where the tokenizer and token files go
vocab_size = 8192           # size of the tokenizer to train (at most 65535: token files are uint16)
tokenizer_model = ""        # an existing sentencepiece .model to use instead of training one
extend_tokenizer = ""       # a .model (e.g. Llama 2's) to extend with Chinese pieces learned from --input
tokenizer_train_chars = 100_000_000  # the tokenizer trains on the first this many characters of train text
workers = os.cpu_count() or 1  # processes that parse and tokenize; 1: one process, sentencepiece threads on all cores
val_fraction = 0.01         # share of documents (and SFT conversations) held out, by hash
shard_tokens = 200_000_000  # tokens per .bin shard (400 MB)
max_len = 512               # SFT conversations are cut at a turn boundary to fit this many tokens, DPO answers too
sft_max_len: int = None     # the old name of max_len, still read (with a note)
dpo_input = "demo"          # DPO preference pairs: "demo", or comma-separated files/directories; "" skips DPO data
# -----------------------------------------------------------------------------

BATCH_CHARS = 1 << 18       # characters of text sent to a worker at a time
MAX_DOC_CHARS = 1 << 20     # a .txt "document" with no blank line for this long is cut at a line end


# ---------------------------------------------------------------------------- reading inputs

class Counts(collections.Counter):
    """
    What happened to one input file: documents kept and every kind of repair or skip. Also the
    file's text encoding (readers decode with it) and, in keys starting with "_", the characters
    kept and how many of them are U+FFFD, so that a garbled file is caught (check_replacement).
    """
    encoding = "utf-8"

    def __init__(self):
        super().__init__()
        self.notes = []  # how the file was read, where that is not what its name says

    def summary(self, name):
        issues = ", ".join(f"{n} {what}" for what, n in self.items() if what != "kept" and not what.startswith("_"))
        notes = self.notes + ([f"decoded as {self.encoding.upper()}"] if self.encoding != "utf-8" else [])
        read_as = f" ({'; '.join(notes)})" if notes else ""
        return f"  {name}{read_as}: {self['kept']} kept" + (f"; {issues}" if issues else "")

    def check_replacement(self, name, limit=0.1):
        """A file whose kept text is largely U+FFFD is garbage in another encoding: an error, not a success."""
        if self["_chars"] and self["_replaced"] > limit * self["_chars"]:
            raise SystemExit(f"error: {name}: {self['_replaced'] * 100 // self['_chars']}% of its text is U+FFFD "
                             f"(bytes that are not UTF-8); convert the file to UTF-8 or leave it out")


def clean_text(text, counts):
    """Repairs that keep a document: invalid UTF-8 (lone surrogates from JSON escapes), CRLF. None if empty."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
        counts["with invalid UTF-8 repaired"] += 1
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        counts["with CR line ends repaired"] += 1
    if not text.strip():
        counts["empty skipped"] += 1
        return None
    counts["_chars"] += len(text)
    counts["_replaced"] += text.count("\ufffd")
    return text


def read_lines(path, counts, progress):
    """Lines of a file as str (in counts.encoding), streamed; BOM, CRLF and undecodable bytes repaired and counted."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f):
            progress.update(len(raw))
            if lineno == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
                counts["BOM removed"] += 1
            try:
                line = raw.decode(counts.encoding)
            except UnicodeDecodeError:
                line = raw.decode(counts.encoding, errors="replace")
                encoding = "UTF-8" if counts.encoding == "utf-8" else counts.encoding.upper()
                counts[f"lines with invalid {encoding} repaired"] += 1
            if line.endswith("\r\n"):
                line = line[:-2] + "\n"
                counts["CRLF line ends repaired"] += 1
            yield line


def read_json_values(path, counts, progress, array=True, chunk_chars=1 << 20, max_object_chars=1 << 26):
    """
    The elements of a top-level JSON array (array=True), or a file of JSON values one after another
    (pretty-printed objects), parsed incrementally: memory stays at about one element.
    """
    decoder = json.JSONDecoder()
    bad_bytes = [0]

    def count_replace(err):
        bad_bytes[0] += 1
        return "\ufffd", err.end

    codecs.register_error("prepare_data_count", count_replace)
    with open(path, "rb") as raw:
        encoding = "utf-8-sig" if counts.encoding == "utf-8" else counts.encoding
        f = codecs.getreader(encoding)(raw, errors="prepare_data_count")
        buf, pos, eof, read_bytes = "", 0, False, 0

        def more():
            nonlocal buf, pos, eof, read_bytes
            chunk = f.read(chunk_chars)
            progress.update(raw.tell() - read_bytes)
            read_bytes = raw.tell()
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0

        more()
        while array:  # skip to "["
            buf_ws = len(buf) - len(buf[pos:].lstrip())
            pos += buf_ws
            if pos < len(buf) or eof:
                break
            more()
        if array and (pos >= len(buf) or buf[pos] != "["):
            counts["not a JSON array: file skipped"] += 1
            return
        pos += array
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buf):
                if eof:
                    if array:
                        counts["unterminated JSON array"] += 1
                    break
                more()
                continue
            if array and buf[pos] == "]":
                break
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if not eof and len(buf) - pos < max_object_chars:
                    more()  # probably an element cut by the chunk boundary
                    continue
                counts["invalid JSON: rest of file skipped"] += 1
                break
            pos = end
            yield obj
            if pos > chunk_chars:
                buf, pos = buf[pos:], 0
    if bad_bytes[0]:
        counts["invalid UTF-8 bytes repaired"] += bad_bytes[0]


def read_json_records(path, counts, progress):
    """
    JSON values of a .jsonl or .json file, whichever of the common shapes it has: JSON Lines, a JSON
    array (also when saved as .jsonl), or pretty-printed objects one after another. A shape that is
    not what the file's name says is named in its summary line.
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"["):
        if path.endswith(".jsonl"):
            counts.notes.append("a JSON array, not JSON Lines: read as an array")
        yield from read_json_values(path, counts, progress, array=True)
        return
    first, _, rest = head.partition(b"\n")
    if first.startswith(b"{") and not first.rstrip().endswith(b"}") and rest[:1] in (b" ", b"\t", b"}", b'"'):
        counts.notes.append("pretty-printed JSON, not one object per line: read object by object")
        yield from read_json_values(path, counts, progress, array=False)
        return
    for line in read_lines(path, counts, progress):
        if not line.strip():
            counts["empty lines skipped"] += 1
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            counts["invalid JSON lines skipped"] += 1


TEXT_FIELDS = ("text", "completion", "content")


def read_documents(path, counts, progress):
    """Pretraining documents (str) of one file."""
    if path.endswith(".txt"):
        lines, n = [], 0
        for line in read_lines(path, counts, progress):
            if line.strip():
                lines.append(line.rstrip("\n"))
                n += len(line)
            if (not line.strip() or n > MAX_DOC_CHARS) and lines:
                yield "\n".join(lines)
                lines, n = [], 0
        if lines:
            yield "\n".join(lines)
        return
    for record in read_json_records(path, counts, progress):
        if isinstance(record, str):
            yield record
            continue
        field = next((k for k in TEXT_FIELDS if isinstance(record, dict) and k in record), None)
        if field is None:
            counts[f"records without a {'/'.join(TEXT_FIELDS)} field skipped"] += 1
        elif not isinstance(record[field], str):
            counts[f"records with a non-string {field} skipped"] += 1
        else:
            yield record[field]


ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "bot": "assistant", "chatgpt": "assistant", "system": "system"}


def to_messages(record):
    """A conversation in any supported SFT format -> [{"role", "content"}, ...], or None."""
    if isinstance(record, list):
        messages = record
    elif not isinstance(record, dict):
        return None
    elif "messages" in record:
        messages = record["messages"]
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            return None
        messages = [{"role": ROLE_NAMES.get(str(t.get("from", "")).lower()), "content": t.get("value")} for t in turns]
        if isinstance(record.get("system"), str) and record["system"].strip():
            messages.insert(0, {"role": "system", "content": record["system"]})
    elif "instruction" in record and "output" in record:
        user = record["instruction"]
        if isinstance(record.get("input"), str) and record["input"].strip():
            user = f"{user}\n{record['input']}" if isinstance(user, str) else user
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        return None
    try:
        split_turns(messages)
    except ValueError:
        return None
    return messages


def message_list(turns, role_key, text_key):
    """[{"role", "content"}] from a list of turns spelled {role_key: ..., text_key: ...}, or None."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None
    return [{"role": ROLE_NAMES.get(str(t.get(role_key, "")).lower()), "content": t.get(text_key)} for t in turns]


def answer_text(answer):
    """The text of a chosen/rejected answer: a string, one message {from/role: ..., value/content/text: ...},
    or a list of messages ending with the answer (TRL's conversational form)."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, list) and answer and isinstance(answer[-1], dict):
        answer = answer[-1]
    if isinstance(answer, dict):
        text = next((answer[k] for k in ("content", "value", "text") if k in answer), None)
        return text if isinstance(text, str) else None
    return None


def to_preference(record):
    """
    A preference pair in any supported format -> (prompt messages ending with a user turn, chosen answer,
    rejected answer), or None:
      TRL          {"prompt": "...", "chosen": "...", "rejected": "..."}, or each a list of messages
      TRL implicit {"chosen": [messages], "rejected": [messages]}: the prompt is their shared start
      sharegpt     {"conversations": [{"from", "value"}...], "chosen": {"from": "gpt", "value"}, "rejected": {...}}
                   (LLaMA-Factory; hiyouga/DPO-En-Zh-20k), with an optional "system"
      hh-rlhf-cn   {"context": [{"role": "human", "text"}...], "chosen": {"role", "text"}, "rejected": {...}}
      question     {"system", "history": [[q, a]...], "question", "response_chosen", "response_rejected"}
    """
    if not isinstance(record, dict):
        return None
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = message_list(prompt, "role", "content")
    elif "conversations" in record:
        prompt = message_list(record["conversations"], "from", "value")
    elif "context" in record:
        prompt = message_list(record["context"], "role", "text")
    elif "question" in record:
        history = record.get("history") or []
        if not all(isinstance(h, list) and len(h) == 2 for h in history):
            return None
        prompt = [{"role": r, "content": c} for q, a in history for r, c in (("user", q), ("assistant", a))]
        prompt.append({"role": "user", "content": record["question"]})
        chosen, rejected = record.get("response_chosen"), record.get("response_rejected")
    elif isinstance(chosen, list) and isinstance(rejected, list):  # TRL's implicit prompt
        common = 0
        while common < min(len(chosen), len(rejected)) - 1 and chosen[common] == rejected[common]:
            common += 1
        prompt = message_list(chosen[:common], "role", "content")
        chosen, rejected = chosen[common:], rejected[common:]
    else:
        return None
    if prompt is None:
        return None
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not (prompt and prompt[0]["role"] == "system"):
        prompt.insert(0, {"role": "system", "content": system})
    chosen, rejected = answer_text(chosen), answer_text(rejected)
    if chosen is None or rejected is None or not prompt or prompt[-1]["role"] != "user":
        return None
    try:
        split_turns(prompt)
    except ValueError:
        return None
    return prompt, chosen, rejected


def input_files(spec, exts):
    """Files named by a comma-separated list of files and directories; a clear error for a bad path."""
    files = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                           if os.path.isfile(p) and p.endswith(exts))
            if not found:
                raise SystemExit(f"error: directory {item} has no {'/'.join(exts)} files")
            files += found
        elif os.path.isfile(item):
            if not item.endswith(exts):
                raise SystemExit(f"error: {item}: unsupported file type (expected {'/'.join(exts)})")
            files.append(item)
        else:
            raise SystemExit(f"error: input {item} does not exist")
    empty = [p for p in files if os.path.getsize(p) == 0]
    if len(empty) == len(files):
        raise SystemExit(f"error: input {empty[0]} is empty" if len(empty) == 1 else
                         f"error: all {len(empty)} input files are empty")
    for p in empty:
        print(f"  {p}: empty file skipped")
    return [p for p in files if p not in empty]


def iter_file_inputs(files, reader, label, report=True):
    """Stream records from files with one byte-based progress bar and (if report) a summary line per file."""
    total = sum(os.path.getsize(p) for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, dynamic_ncols=True) as bar:
        for path in files:
            counts = Counts()
            counts.encoding = sniff_encoding(path)
            start = bar.n
            for item in reader(path, counts, bar):
                yield item, counts
            bar.n = start + os.path.getsize(path)  # the JSON array reader reports bytes coarsely
            bar.refresh()
            if report:
                tqdm.write(counts.summary(path))
            counts.check_replacement(path)


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


def encode_conversations(batch, max_len):
    """Worker: (split, meta, messages) -> (split, raw record, [(ids, mask)] or [] when skipped, status)."""
    results = []
    for split, meta, messages in batch:
        ids, mask = _tok.encode_chat(messages)
        status = "kept"
        if len(ids) > max_len:
            cut = turn_boundary_cut(ids, _tok.bos_id, max_len)
            if cut:
                ids, mask, status = ids[:cut], mask[:cut], "truncated at a turn boundary"
            else:
                ids, status = [], "skipped: first turn longer than max_len"
        if ids and not any(mask):
            ids, status = [], "skipped: no answer tokens"
        results.append((split, dict(meta, messages=messages), [(ids, mask)] if ids else [], status))
    return results


def encode_pairs(batch, max_len):
    """Worker: (split, meta, prompt, chosen, rejected) -> (split, raw record, [(ids, mask)] x 2 or [], status)."""
    results = []
    for split, meta, prompt, chosen, rejected in batch:
        prompt_ids, _ = _tok.encode_chat(prompt)
        answers = [_tok.encode(answer, eos=True) for answer in (chosen, rejected)]
        status = "kept"
        if chosen.strip() == rejected.strip():
            status, answers = "skipped: chosen and rejected are the same", []
        elif len(prompt_ids) >= max_len:
            status, answers = "skipped: prompt alone longer than max_len", []
        elif len(prompt_ids) + max(map(len, answers)) > max_len:
            status = "answers cut to fit max_len"
            answers = [ids[:max_len - len(prompt_ids)] for ids in answers]
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
    with pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(fn, batch))
            if len(pending) >= 2 * n_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------- writing outputs

OUTPUT_KINDS = {"pretraining": ["train_[0-9]*", "val_[0-9]*"], "sft": ["sft_*"], "dpo": ["dpo_*"]}


def publish(out_dir, tmp_paths, written_kinds, tokenizer_changed):
    """
    Rename this run's outputs into place, all at the very end, and remove what an earlier run left
    that no longer belongs: its files of every kind this run wrote, and, when the tokenizer changed,
    its files of every kind (they hold ids of another tokenizer). A data directory never mixes two runs.
    """
    final = {p[:-len(".tmp")] for p in tmp_paths}
    stale_kinds = OUTPUT_KINDS if tokenizer_changed else {k: OUTPUT_KINDS[k] for k in written_kinds}
    stale = {p for patterns in stale_kinds.values() for pattern in patterns
             for p in glob.glob(os.path.join(out_dir, pattern)) if not p.endswith(".tmp")} - final
    for path in sorted(stale):
        os.remove(path)
    if stale and tokenizer_changed:
        print(f"removed {len(stale)} file(s) of an earlier run made with another tokenizer")
    for tmp in tmp_paths:
        os.replace(tmp, tmp[:-len(".tmp")])


class ShardWriter:
    """Appends uint16 tokens to {split}_000.bin, {split}_001.bin, ... in out_dir (as .tmp until publish)."""

    def __init__(self, out_dir, split, meta, shard_tokens):
        self.out_dir, self.split, self.meta, self.shard_tokens = out_dir, split, meta, shard_tokens
        self.paths, self.file = [], None
        self.total_tokens = self.total_docs = 0

    def _open(self):
        self._close_shard()
        path = os.path.join(self.out_dir, f"{self.split}_{len(self.paths) // 2:03d}.bin.tmp")
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


def prepare_tokenizer(path, documents, tokenizer_model, vocab_size, val_fraction, train_chars, workers, extend=""):
    """
    The tokenizer written to path: a copy of tokenizer_model, one trained on the train documents, or
    (extend) that existing tokenizer with Chinese pieces trained on them appended.
    """
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
    train_tokenizer(train_lines(), path, vocab_size, num_threads=workers)
    tok = Tokenizer(path)
    print(f"trained the tokenizer ({tok.n_words} pieces, sha {tok.sha}) in {time.time() - t0:.1f}s")
    return tok


def prepare_pretraining(tok, documents, out_dir, val_fraction, workers, shard_tokens):
    """Token shards of the documents, as .tmp files; returns their paths."""
    meta = {"tokenizer_sha": tok.sha, "vocab_size": tok.n_words}
    writers = {split: ShardWriter(out_dir, split, meta, shard_tokens) for split in ("train", "val")}
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


def prepare_masked(kind, tok, records, encode, out_dir, workers, max_len):
    """
    Masked sequences (kind "sft": a conversation each; "dpo": for pair i, sequence 2i is prompt + chosen
    answer and 2i + 1 prompt + rejected answer) as .tmp files per split: {kind}_{split}.bin (uint16
    tokens), _mask.bin (uint8, 1 on the tokens the loss counts: answers and their EOS), _index.npy (int64
    offsets), .json (the sidecar) and, for test, .jsonl (the raw held-out records, for evaluate.py).
    records() yields the encoder's input; encode(batch, max_len) runs in the workers.
    """
    t0 = time.time()
    label, item = {"sft": ("SFT", "conversation"), "dpo": ("DPO", "pair")}[kind]
    outputs = {}
    for split in ("train", "test"):
        prefix = os.path.join(out_dir, f"{kind}_{split}")
        outputs[split] = {"tokens": open(prefix + ".bin.tmp", "wb"), "mask": open(prefix + "_mask.bin.tmp", "wb"),
                          "raw": open(prefix + ".jsonl.tmp", "w", encoding="utf-8") if split == "test" else None,
                          "offsets": [0], "items": 0, "answer_tokens": 0, "prefix": prefix}
    counts = Counts()
    batches = ((b, max_len) for b in batched(records(), max_chars=256))
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
            json.dump({"tokenizer_sha": tok.sha, "vocab_size": tok.n_words, "dtype": "uint16", "max_len": max_len,
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


def file_records(files, val_fraction, label, convert, what):
    """
    (split, messages, answers) for every record of the SFT or DPO input files that convert(record) turns
    into (messages, answer strings); every text repaired (clean_text), records with an empty one skipped,
    and the split decided by a hash of the messages, so that pairs with one prompt fall on one side.
    """
    for record, counts in iter_file_inputs(files, read_json_records, f"reading {label}"):
        converted = convert(record)
        if converted is None:
            counts[f"records that are not a {what} skipped"] += 1
            continue
        messages, answers = converted
        contents = [clean_text(m["content"], counts) for m in messages] + [clean_text(a, counts) for a in answers]
        if None in contents:
            counts[f"{what}s with an empty message skipped"] += 1
            continue
        for m, content in zip(messages, contents):
            m["content"] = content
        counts["kept"] += 1
        split = "test" if is_val(json.dumps(messages, ensure_ascii=False), val_fraction) else "train"
        yield split, messages, contents[len(messages):]


def file_conversations(files, val_fraction):
    """(split, meta, messages) for every conversation in the SFT input files."""
    def convert(record):
        messages = to_messages(record)
        return None if messages is None else (messages, [])

    for split, messages, _ in file_records(files, val_fraction, "SFT", convert, "conversation"):
        yield split, {}, messages


def file_pairs(files, val_fraction):
    """(split, meta, prompt, chosen, rejected) for every preference pair in the DPO input files."""
    def convert(record):
        pair = to_preference(record)
        return None if pair is None else (pair[0], [pair[1], pair[2]])

    for split, prompt, (chosen, rejected) in file_records(files, val_fraction, "DPO", convert, "preference pair"):
        yield split, {}, prompt, chosen, rejected


def file_documents(files, report=True):
    """The pretraining documents of the input files, repaired, with one summary line per file if report."""
    for doc, counts in iter_file_inputs(files, read_documents, "reading" if report else "tokenizer text", report):
        doc = clean_text(doc, counts)
        if doc is not None:
            counts["kept"] += 1
            yield doc


def main():
    global max_len
    if sft_max_len is not None:
        print(f"note: --sft_max_len is now --max_len (it cuts DPO pairs too); using max_len={sft_max_len}")
        max_len = sft_max_len
    if not input and not sft_input and not dpo_input:
        raise SystemExit("error: nothing to do: --input, --sft_input and --dpo_input are all empty")
    if workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    documents = conversations = None
    if input == "demo":
        # called twice: for the tokenizer (without the per-file summaries), then for the tokens
        documents = lambda report=True: demo.documents(val_fraction)  # noqa: E731
    elif input:
        files = input_files(input, (".jsonl", ".json", ".txt"))
        documents = lambda report=True: file_documents(files, report)  # noqa: E731
    if sft_input == "demo":
        conversations = lambda: demo.sft_conversations(val_fraction)  # noqa: E731
    elif sft_input:
        sft_files = input_files(sft_input, (".jsonl", ".json"))
        conversations = lambda: file_conversations(sft_files, val_fraction)  # noqa: E731
    pairs = None
    if dpo_input == "demo":
        pairs = lambda: demo.preference_pairs(val_fraction)  # noqa: E731
    elif dpo_input:
        dpo_files = input_files(dpo_input, (".jsonl", ".json"))
        pairs = lambda: file_pairs(dpo_files, val_fraction)  # noqa: E731
    if extend_tokenizer and (tokenizer_model or documents is None):
        raise SystemExit("error: --extend_tokenizer trains the new pieces on --input: give an --input, and no "
                         "--tokenizer_model")
    tokenizer_path = os.path.join(out_dir, "tokenizer.model")
    if documents is None and not tokenizer_model and not os.path.exists(tokenizer_path):
        raise SystemExit("error: SFT or DPO data alone needs a tokenizer: pass --tokenizer_model or prepare "
                         "pretraining data first")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: --out_dir={out_dir} is a file, not a directory; choose another --out_dir")
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "*.tmp")):
        os.remove(stale)  # left by a run that was killed

    try:
        old_sha = Tokenizer(tokenizer_path).sha if os.path.exists(tokenizer_path) else None
        tmp_paths = []
        if documents is not None or tokenizer_model:
            tok = prepare_tokenizer(tokenizer_path + ".tmp", documents, tokenizer_model, vocab_size, val_fraction,
                                    tokenizer_train_chars, workers, extend_tokenizer)
            tmp_paths.append(tok.model_path)
        else:
            tok = Tokenizer(tokenizer_path)
        if documents is not None:
            tmp_paths += prepare_pretraining(tok, documents, out_dir, val_fraction, workers, shard_tokens)
        if conversations is not None:
            tmp_paths += prepare_masked("sft", tok, conversations, encode_conversations, out_dir, workers, max_len)
        if pairs is not None:
            tmp_paths += prepare_masked("dpo", tok, pairs, encode_pairs, out_dir, workers, max_len)
        written = [kind for kind, source in (("pretraining", documents), ("sft", conversations), ("dpo", pairs))
                   if source is not None]
        publish(out_dir, tmp_paths, written, tokenizer_changed=old_sha not in (None, tok.sha))
    except BaseException as e:
        # an error or Ctrl-C: nothing half-written stays behind, and the outputs of the last complete
        # run are untouched (this run's replace them only in publish(), at the very end)
        for partial in glob.glob(os.path.join(out_dir, "*.tmp")):
            os.remove(partial)
        if isinstance(e, KeyboardInterrupt):
            raise SystemExit(f"\ninterrupted: nothing was written; {out_dir}/ holds what it held before")
        raise
    print(f"wrote {len(tmp_paths)} files to {out_dir}/")


if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    main()
