"""
The Chinese sentencepiece tokenizer and the Llama 2 chat template.

Every setting below exists so that llama2.c's run.c tokenizes exactly as we do:
- BPE, so run.c's greedy merge-by-score reproduces sentencepiece's segmentation;
- identity normalization (the default NFKC would turn full-width ，！？ into ASCII and newlines
  into spaces) and no whitespace collapsing, so decode(encode(text)) == text;
- a dummy prefix with "▁" present as a piece (run.c looks it up and prepends it);
- byte fallback with the 256 byte pieces at ids 3..258 (run.c hard-codes byte + 3), so any UTF-8
  text is encodable and nothing maps to <unk>;
- unk 0, bos 1, eos 2, and no pad, user-defined or control pieces, which would shift the bytes.

The one string that does not round-trip is the character "▁" (U+2581) itself: sentencepiece uses it
to escape spaces, so it decodes as a space.
"""
import codecs
import hashlib
import io
import os
import re

import numpy as np
import sentencepiece as spm

UINT16_MAX_IDS = 65535  # token files are uint16; ids must be < 65536 and we keep 65535 free

# The chat template, written as run.c's `-m chat` renders it. Each user turn is its own encode()
# call with BOS in front (and sentencepiece's dummy prefix), each answer is encode(answer) + EOS.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def render_user_turn(user, system=None):
    """The text of one user turn; the system prompt belongs to the first turn only."""
    if system:
        return f"{B_INST} {B_SYS}{system}{E_SYS}{user} {E_INST}"
    return f"{B_INST} {user} {E_INST}"


def train_tokenizer(sentences, model_path, vocab_size, num_threads=None, character_coverage=0.9995):
    """Train a BPE model on an iterable of strings (one line of text each) and write it to model_path. The
    characters covering character_coverage of the text become pieces; the rarer rest are spelled in bytes."""
    if vocab_size > UINT16_MAX_IDS:
        raise SystemExit(f"error: vocab_size={vocab_size} does not fit uint16 token files (at most {UINT16_MAX_IDS})")
    if not 0.9 <= character_coverage <= 1.0:
        raise SystemExit(f"error: character_coverage={character_coverage} must be within 0.9..1.0 (the share of the "
                         f"text's characters that get their own piece)")
    if vocab_size < 300:
        raise SystemExit(f"error: vocab_size={vocab_size} is too small: 259 ids are taken by <unk>, <s>, </s> "
                         f"and the 256 bytes")
    try:
        proto = _train_bpe(sentences, vocab_size, num_threads, character_coverage)
    except RuntimeError as e:
        if "KeyboardInterrupt" in str(e):  # Ctrl-C inside the sentence iterator, wrapped by sentencepiece's C++
            raise KeyboardInterrupt from None
        msg = str(e).split("] ")[-1]
        if "required_chars" in msg:  # sentencepiece's own advice names options we do not expose
            msg = (f"the text needs more single-character pieces than vocab_size={vocab_size} leaves room for "
                   f"({msg.split('.')[1].strip()}); raise --vocab_size")
        raise SystemExit(f"error: tokenizer training failed: {msg}")
    tmp = model_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(proto)
    os.replace(tmp, model_path)


def _train_bpe(sentences, vocab_size, num_threads, character_coverage=0.9995):
    """The serialized model sentencepiece trains with our settings; its RuntimeError passes through."""
    # the template's literal strings, often enough that they become cheap pieces
    template_lines = [render_user_turn("你好", "你是一个助手") for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chain(sentences, template_lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=character_coverage,
        max_sentence_length=16384,  # bytes; news paragraphs exceed the default 4192
        input_sentence_size=2_000_000, shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count(),
        minloglevel=2,
    )
    return model.getvalue()


def is_chinese(piece):
    """A piece made of CJK characters and CJK/full-width punctuation only (a leading "▁" aside)."""
    text = piece.lstrip("▁")
    return bool(text) and all(0x3400 <= ord(c) <= 0x9FFF or 0xF900 <= ord(c) <= 0xFAFF or 0x20000 <= ord(c) <= 0x3FFFF
                              or 0x3000 <= ord(c) <= 0x303F or 0xFF00 <= ord(c) <= 0xFFEF for c in text)


def add_chinese_pieces(base_path, sentences, model_path, vocab_size, num_threads=None):
    """
    Write to model_path the tokenizer at base_path (e.g. Llama 2's) with Chinese pieces appended until it has
    vocab_size pieces (or the text offers no more). sentences() returns the training lines (it may be called twice).
    The pieces come from a BPE model trained on them with our settings, in its merge order; only pieces made
    entirely of Chinese characters and punctuation that the base lacks are added, each scored below every base
    merge. So every base piece keeps its id and score (the byte pieces stay at 3..258), text without Chinese encodes
    exactly as before, and the result is a normal sentencepiece model. Returns the number of pieces added.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # the generated module needs the protobuf package
        raise SystemExit("error: --extend_tokenizer needs the protobuf package: pip install protobuf")
    base = sentencepiece_model_pb2.ModelProto()
    with open(base_path, "rb") as f:
        base.ParseFromString(f.read())
    n_base = len(base.pieces)
    if vocab_size <= n_base:
        raise SystemExit(f"error: {base_path} already has {n_base} pieces; --vocab_size is the size after extending, "
                         f"e.g. --vocab_size={n_base + 20000}")
    if vocab_size > UINT16_MAX_IDS:
        raise SystemExit(f"error: vocab_size={vocab_size} does not fit uint16 token files (at most {UINT16_MAX_IDS})")
    # a Chinese model somewhat larger than what is added (some of its pieces are in the base already),
    # and larger still when the text has more distinct characters than that (sentencepiece says how many)
    size = vocab_size - n_base + 2000
    for attempt in range(3):
        try:
            proto = _train_bpe(sentences(), min(UINT16_MAX_IDS, size), num_threads)
            break
        except RuntimeError as e:
            msg = str(e).split("] ")[-1]
            needed, most = re.search(r"required_chars\. *\d+ vs (\d+)", msg), re.search(r"<= (\d+)", msg)
            if attempt == 2 or not (needed or most):
                raise SystemExit(f"error: training the Chinese pieces failed: {msg}")
            size = int(needed.group(1)) + vocab_size - n_base + 2000 if needed else int(most.group(1))
    chinese = sentencepiece_model_pb2.ModelProto()
    chinese.ParseFromString(proto)
    have = {p.piece for p in base.pieces}
    floor = min(p.score for p in base.pieces if p.score > -1e6)  # below every merge (not the -1e9 whitespace runs)
    added = 0
    for p in sorted(chinese.pieces, key=lambda p: -p.score):
        if len(base.pieces) == vocab_size:
            break
        if p.type == p.NORMAL and p.piece not in have and is_chinese(p.piece):
            new = base.pieces.add()
            new.piece, new.score, new.type = p.piece, floor - 1 - added, p.NORMAL
            have.add(p.piece)
            added += 1
    base.trainer_spec.vocab_size = len(base.pieces)
    with open(model_path + ".tmp", "wb") as f:
        f.write(base.SerializeToString())
    os.replace(model_path + ".tmp", model_path)
    return added


def _chain(*iterables):
    for it in iterables:
        yield from it


def compatibility_warnings(sp):
    """One line per property of a sentencepiece model that breaks llama2.c run.c compatibility."""
    warnings = []
    n = sp.get_piece_size()
    if n > UINT16_MAX_IDS:
        warnings.append(f"vocabulary of {n} ids does not fit uint16 token files")
    if (sp.unk_id(), sp.bos_id(), sp.eos_id()) != (0, 1, 2):
        warnings.append(f"special ids are unk {sp.unk_id()} / bos {sp.bos_id()} / eos {sp.eos_id()}; "
                        f"run.c expects 0 / 1 / 2")
    if n < 259 or not all(sp.is_byte(i) and sp.id_to_piece(i) == f"<0x{i - 3:02X}>" for i in range(3, 259)):
        warnings.append("byte pieces are not at ids 3..258 (no byte fallback, or other pieces before them); "
                        "run.c hard-codes byte + 3")
    if sp.piece_to_id("▁") == sp.unk_id():
        warnings.append('no "▁" piece; run.c prepends it as the dummy prefix')
    probe = "全角，！？\n  两个空格"
    if sp.decode(sp.encode(probe)) != probe:
        warnings.append("normalization is not identity or whitespace is collapsed; text does not round-trip")
    if not sp.id_to_piece(sp.encode("a")[0]).startswith("▁"):
        warnings.append("no dummy prefix; run.c always adds one")
    return warnings


class Tokenizer:
    def __init__(self, model_path):
        if not os.path.exists(model_path):
            raise SystemExit(f"error: no tokenizer at {model_path}; run `python prepare_data.py` to train one")
        with open(model_path, "rb") as f:
            proto = f.read()
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load_from_serialized_proto(proto)
        except RuntimeError:
            raise SystemExit(f"error: {model_path} is not a sentencepiece model")
        # checkpoints and token files record this, so a mismatch is caught before it trains garbage
        self.sha = hashlib.sha256(proto).hexdigest()[:16]
        self.n_words = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # where decoding stops: EOS ends a chat answer, BOS the document a base model writes (the next
        # would start with one); every decoder here, and the exported generation configs, stop at both
        self.stop_ids = (self.eos_id, self.bos_id)

    def encode(self, text, bos=False, eos=False):
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts, num_threads=-1):
        """Many texts at once; sentencepiece spreads them over num_threads threads (-1: all cores)."""
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def id_to_piece(self, i):
        return self.sp.id_to_piece(i)

    def extends(self, base):
        """True if this tokenizer is base with pieces appended: base's ids keep their pieces."""
        return self.n_words >= base.n_words and all(self.sp.id_to_piece(i) == base.sp.id_to_piece(i)
                                                    for i in range(base.n_words))

    def encode_chat(self, messages):
        """
        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], an optional system message first,
        then user/assistant alternating. Returns (ids, loss_mask): the mask is 1 exactly on assistant answer tokens
        and the EOS that ends each answer. A trailing user turn (a prompt for generation) is rendered with nothing
        after [/INST]. Raises ValueError for a malformed conversation.
        """
        ids, mask = [], []
        for turn, (user, answer, system) in enumerate(split_turns(messages)):
            prompt = self.encode(render_user_turn(user, system if turn == 0 else None), bos=True)
            ids += prompt
            mask += [0] * len(prompt)
            if answer is not None:
                reply = self.encode(answer, eos=True)
                ids += reply
                mask += [1] * len(reply)
        return ids, mask

    def fit_chat(self, messages, budget):
        """
        (prompt ids, messages kept, turns left out) of a chat ending with a user message, within budget tokens:
        its oldest (user, assistant) turns go first, the system message stays (with the first turn kept); a last
        message that alone does not fit is left whole, for the caller to cut or refuse. Each turn is encoded
        about once, and the prompt joined from those ids: the cost grows with the chat's length, not its square
        (serve.py, sample.py --chat).
        """
        head = messages[:1] if messages[0]["role"] == "system" else []
        rest = messages[len(head):]  # user, assistant, ..., user
        turns = [rest[i:i + 2] for i in range(0, len(rest), 2)]
        turn_ids = [self.encode_chat(turn)[0] for turn in turns]  # a chat's ids are its turns' one after another
        after = [0] * (len(turns) + 1)  # after[k]: the tokens of turns k.. without the system message
        for k in range(len(turns) - 1, -1, -1):
            after[k] = after[k + 1] + len(turn_ids[k])
        for dropped in range(len(turns)):
            if after[dropped] > budget:
                continue  # too long even before the system message joins the first turn
            first = len(self.encode_chat(head + turns[dropped])[0]) if head else len(turn_ids[dropped])
            if first + after[dropped + 1] <= budget:
                break
        else:
            dropped = len(turns) - 1
        first_ids = self.encode_chat(head + turns[dropped])[0] if head else turn_ids[dropped]
        kept = head + [m for turn in turns[dropped:] for m in turn]
        return first_ids + [i for ids in turn_ids[dropped + 1:] for i in ids], kept, dropped


def turn_boundary_cut(ids, bos_id, max_tokens):
    """Where to cut a conversation's ids (list or array) to at most max_tokens keeping every answer whole: the start
    (BOS) of the last user turn that leaves at most max_tokens; 0 when even the first turn does not fit."""
    bos = np.flatnonzero(np.asarray(ids[:max_tokens + 1]) == bos_id)
    bos = bos[bos > 0]
    return int(bos[-1]) if len(bos) else 0


def split_turns(messages):
    """[(user, answer or None, system or None), ...] from a message list, validating its shape."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError("each message needs a role (system, user or assistant) and a string content")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    turns = []
    for i in range(0, len(messages), 2):
        user = messages[i]
        answer = messages[i + 1] if i + 1 < len(messages) else None
        if user["role"] != "user" or (answer is not None and answer["role"] != "assistant"):
            raise ValueError("messages must alternate user, assistant after an optional system message")
        turns.append((user["content"], answer["content"] if answer else None, system))
    if not turns:
        raise ValueError("a conversation needs at least one user message")
    return turns


def is_val(text, fraction):
    """Deterministic train/val assignment by a hash of the text: the same text lands on the same side
    in every run, process and file order, and a larger fraction holds out a superset."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h < fraction * 2**64


def sniff_encoding(path, sample_bytes=1 << 20):
    """
    "utf-8" or "gb18030" for a text file, judged on its first sample_bytes: Chinese text often comes in GBK, which
    read as UTF-8 is mostly U+FFFD. Non-ASCII bytes that mostly fail as UTF-8 but decode as GB18030 (a superset of
    GBK) are that; a few bad bytes stay UTF-8 (repaired, counted); anything else is a one-line error.
    """
    with open(path, "rb") as f:
        sample = f.read(sample_bytes)
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise SystemExit(f"error: {path} is UTF-16; convert it to UTF-8 first "
                         f"(iconv -f UTF-16 -t UTF-8 {path} > new_file)")
    if len(sample) == sample_bytes and b"\n" in sample:
        sample = sample[:sample.rindex(b"\n") + 1]  # never judge a character cut at the sample's end
    non_ascii = sum(1 for b in sample if b >= 0x80)
    bad = sample.decode("utf-8", errors="replace").count("\ufffd") - sample.count("\ufffd".encode())
    if bad * 10 <= non_ascii:  # clean UTF-8, or UTF-8 with a few broken bytes
        return "utf-8"
    try:
        sample.decode("gb18030")
        return "gb18030"
    except UnicodeDecodeError:
        raise SystemExit(f"error: {path} is not UTF-8 ({bad * 100 // max(1, non_ascii)}% of its non-ASCII bytes do not "
                         f"decode) nor GBK/GB18030; convert it to UTF-8 first "
                         f"(e.g. iconv -f BIG5 -t UTF-8 {path} > new_file)")


def read_text_file(path):
    """The whole text of a small file (a prompt), UTF-8 or GB18030 as sniff_encoding decides; (text, encoding)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist or is not a file")
    encoding = sniff_encoding(path)
    with open(path, "rb") as f:
        text = f.read().decode(encoding, errors="replace")
    return text.removeprefix("\ufeff"), encoding


def write_text_file(path, text):
    """Write text as UTF-8 to a temporary file and rename it into place: a crash never leaves half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
