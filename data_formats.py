"""
The input layouts prepare_data.py reads: the part to extend for a new kind of file. Each reader streams,
so memory stays flat on files of any size, and counts what it repairs or skips (Counts), one summary
line per file.

Pretraining documents (file_documents):
    .jsonl    one JSON object per line with a "text" field         {"text": "床前明月光，疑是地上霜。"}
    .json     a JSON array of objects with "completion" (or text)  [{"completion": "..."}, ...]
              (a .json file whose first character is "{" is read as JSONL; pretty-printed objects too)
    .parquet  a "text" (or completion, content, or --text_field) column, read a row group at a time (pyarrow)
    .txt      plain text; blank lines separate documents
SFT conversations (file_conversations: to_messages), one per object (or per Parquet row):
    Belle     {"instruction": "...", "input": "...", "output": "..."}
    ShareGPT  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}
    messages  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]} or a bare list of them
DPO preference pairs (file_pairs: to_preference): TRL's prompt/chosen/rejected, ShareGPT with
    chosen/rejected, hh-rlhf-cn's context, question/response_chosen/response_rejected.
Text is UTF-8 or GB18030 (tokenizer.sniff_encoding decides per file).
"""
import codecs
import collections
import glob
import json
import os

from tqdm import tqdm

from tokenizer import is_val, sniff_encoding, split_turns


MAX_DOC_CHARS = 1 << 20     # a .txt "document" with no blank line for this long is cut at a line end


class Counts(collections.Counter):
    """What happened to one input file: documents kept, every kind of repair or skip, its encoding, and ("_" keys)
    the characters kept and how many are U+FFFD, so that a garbled file is caught (check_replacement)."""
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
    """The elements of a top-level JSON array (array=True), or a file of JSON values one after another
    (pretty-printed objects), parsed incrementally: memory stays at about one element."""
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


def read_records(path, counts, progress, columns=None):
    """The records of a .jsonl, .json or .parquet file (read_json_records, read_parquet_records)."""
    if path.endswith(".parquet"):
        return read_parquet_records(path, counts, progress, columns)
    return read_json_records(path, counts, progress)


def read_parquet_records(path, counts, progress, columns=None, batch_rows=1024):
    """The rows of a Parquet file as dicts (nested columns as JSON would give them), a batch at a time, one row group
    after another: memory stays at about one row group. columns: only these, where the file has them."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit(f"error: {path}: reading Parquet needs pyarrow: pip install pyarrow")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends: not a Parquet file, or a damaged one
        raise SystemExit(f"error: {path} is not a readable Parquet file: {str(e).splitlines()[0][:200]}")
    names = parquet.schema_arrow.names
    wanted = [c for c in columns if c in names] if columns else None
    for group in range(parquet.num_row_groups):
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=wanted or None):
            yield from batch.to_pylist()
        progress.update(os.path.getsize(path) // parquet.num_row_groups)  # near enough: the bar is set at the end


def read_json_records(path, counts, progress):
    """The JSON values of a .jsonl or .json file in any common shape: JSON Lines, an array, or pretty-printed objects
    one after another; a shape other than the file's name says is named in its summary line."""
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


def read_documents(path, counts, progress, fields=TEXT_FIELDS):
    """Pretraining documents (str) of one file: a record's first field of fields that it has."""
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
    for record in read_records(path, counts, progress, columns=fields):
        if isinstance(record, str):
            yield record
            continue
        field = next((k for k in fields if isinstance(record, dict) and k in record), None)
        if field is None:
            counts[f"records without a {'/'.join(fields)} field skipped"] += 1
        elif not isinstance(record[field], str):
            counts[f"records with a non-string {field} skipped"] += 1
        else:
            yield record[field]


def file_documents(files, report=True, text_field=""):
    """The pretraining documents of the input files, repaired, with one summary line per file if report.
    text_field: the field (a Parquet file's column) that holds the text; "": the first of TEXT_FIELDS."""
    fields = (text_field,) if text_field else TEXT_FIELDS
    reader = lambda path, counts, bar: read_documents(path, counts, bar, fields)  # noqa: E731
    for doc, counts in iter_file_inputs(files, reader, "reading" if report else "tokenizer text", report):
        doc = clean_text(doc, counts)
        if doc is not None:
            counts["kept"] += 1
            yield doc


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


def file_records(files, val_fraction, label, convert, what):
    """(split, messages, answers) for every record of the SFT or DPO files that convert(record) reads, texts repaired
    (clean_text), records with an empty one skipped, split by a hash of the messages (one prompt, one side)."""
    for record, counts in iter_file_inputs(files, read_records, f"reading {label}"):
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
            counts.encoding = "utf-8" if path.endswith(".parquet") else sniff_encoding(path)
            start = bar.n
            for item in reader(path, counts, bar):
                yield item, counts
            bar.n = start + os.path.getsize(path)  # the JSON array reader reports bytes coarsely
            bar.refresh()
            if report:
                tqdm.write(counts.summary(path))
            counts.check_replacement(path)
