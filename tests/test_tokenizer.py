"""The tokenizer: exact round-trips, the ids run.c expects, and the chat template."""
import io
import os
import random

import pytest
import sentencepiece as spm

from tokenizer import Tokenizer, compatibility_warnings, render_user_turn, split_turns, train_tokenizer


@pytest.fixture(scope="module")
def tok(demo_data):
    return Tokenizer(os.path.join(demo_data, "tokenizer.model"))


def random_text(rng, n):
    """Mixed Chinese, ASCII, full-width punctuation, emoji, rare CJK, whitespace runs, control characters."""
    pools = ["床前明月光疑是地上霜举头望低思故乡的了是在人有我", "abcXYZ 0123456789,.!?", "，。！？、；：“”（）《》",
             "😀🚀👍🏽", "𠮷𪚥䶮龘", " \n\t  \r\n", "\x00\x07\x1b", "éüñßЖ語", "~`@#$%^&*"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def test_any_text_round_trips_exactly(tok):
    rng = random.Random(0)
    for n in list(range(0, 20)) + [50, 200, 1000] * 20:
        text = random_text(rng, n)
        assert tok.decode(tok.encode(text)) == text


def test_random_code_points_round_trip(tok):
    rng = random.Random(1)
    for _ in range(300):
        chars = []
        while len(chars) < 30:
            c = rng.randrange(1, 0x30000)
            if 0xD800 <= c <= 0xDFFF or c == 0x2581:  # surrogates are not text; U+2581 is sentencepiece's space
                continue
            chars.append(chr(c))
        text = "".join(chars)
        assert tok.decode(tok.encode(text)) == text


def test_the_one_exception_is_sentencepieces_space_marker(tok):
    assert tok.decode(tok.encode("a▁b")) == "a b"


def test_ids_are_where_llama2c_run_c_expects_them(tok):
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.id_to_piece(i) for i in (3, 4, 258)] == ["<0x00>", "<0x01>", "<0xFF>"]
    assert tok.sp.piece_to_id("▁") != tok.sp.unk_id()
    assert compatibility_warnings(tok.sp) == []


def test_common_hanzi_and_fullwidth_punctuation_are_whole_pieces(tok):
    for ch in "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会，。！？":
        assert tok.encode(ch)[-1] >= 259, ch  # not a byte-fallback piece
    assert 0 not in tok.encode("任何文字都不会变成 <unk> 🙂")


def test_an_nfkc_tokenizer_is_flagged_as_incompatible(tmp_path):
    model = io.BytesIO()
    lines = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。"] * 200 + ["hello world"] * 200
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=60,
                                   model_type="bpe", minloglevel=2)  # sentencepiece's defaults
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    warnings = compatibility_warnings(sp)
    assert any("byte pieces" in w for w in warnings)
    assert any("normalization" in w for w in warnings)


def test_characters_below_the_coverage_are_spelled_in_bytes(tmp_path):
    rng = random.Random(0)
    common = "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会"
    lines = ["".join(rng.choice(common) for _ in range(40)) for _ in range(2000)] + ["霜霜霜霜"] * 10 + ["龘"]
    for coverage, rare_as_bytes in ((1.0, False), (0.99, True)):
        path = str(tmp_path / f"{coverage}.model")
        train_tokenizer(iter(lines), path, 400, character_coverage=coverage)
        tok = Tokenizer(path)
        for ch in "霜龘":
            assert (min(tok.encode(ch)[1:]) < 259) == rare_as_bytes, (coverage, ch)  # ids 3..258 are bytes
        assert tok.decode(tok.encode("霜龘的")) == "霜龘的"
    with pytest.raises(SystemExit, match="character_coverage"):
        train_tokenizer(iter(lines), str(tmp_path / "x.model"), 400, character_coverage=0.5)


def test_training_refuses_a_vocabulary_that_does_not_fit_uint16(tmp_path):
    with pytest.raises(SystemExit, match="uint16"):
        train_tokenizer(iter(["你好"]), str(tmp_path / "t.model"), 70000)


def test_chat_template_renders_run_c_strings():
    assert render_user_turn("你好") == "[INST] 你好 [/INST]"
    assert render_user_turn("你好", "你是助手") == "[INST] <<SYS>>\n你是助手\n<</SYS>>\n\n你好 [/INST]"


def test_encode_chat_frames_turns_and_masks_exactly_the_answers(tok):
    messages = [{"role": "system", "content": "你是助手"},
                {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见。"}]
    ids, mask = tok.encode_chat(messages)
    first = [1] + tok.encode("[INST] <<SYS>>\n你是助手\n<</SYS>>\n\n你好 [/INST]")
    answer1 = tok.encode("你好！") + [2]
    second = [1] + tok.encode("[INST] 再见 [/INST]")  # the system prompt belongs to the first turn only
    answer2 = tok.encode("再见。") + [2]
    assert ids == first + answer1 + second + answer2
    assert mask == [0] * len(first) + [1] * len(answer1) + [0] * len(second) + [1] * len(answer2)


def test_a_trailing_user_turn_is_a_generation_prompt(tok):
    ids, mask = tok.encode_chat([{"role": "user", "content": "你好"}])
    assert ids == [1] + tok.encode("[INST] 你好 [/INST]") and not any(mask)


@pytest.mark.parametrize("messages", [
    [], [{"role": "assistant", "content": "hi"}], [{"role": "user", "content": 3}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], [{"role": "system", "content": "s"}],
])
def test_malformed_conversations_are_rejected(messages):
    with pytest.raises(ValueError):
        split_turns(messages)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="prepare_data.py"):
        Tokenizer(str(tmp_path / "nope.model"))
