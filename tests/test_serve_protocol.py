"""
serve.py's OpenAI protocol as plain functions, without a socket: the request's messages, fitting a long chat
into the context (at a cost that grows with the chat, not its square), and the shapes of chunks and answers.
"""
import json
import queue

import pytest

import serve
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(demo_data):
    return Tokenizer(f"{demo_data}/tokenizer.model")


def chat(turns, system=None, last="你好"):
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages + [{"role": "user", "content": last}]


def dropping_oldest_turns(messages, tok, budget):
    """The plain way (what serve.py did before): re-encode the chat once per dropped turn."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(head):-1]
    for dropped in range(len(turns) // 2 + 1):
        kept = head + turns[2 * dropped:] + messages[-1:]
        ids = tok.encode_chat(kept)[0]
        if len(ids) <= budget:
            return ids, kept, dropped
    return ids, kept, len(turns) // 2


@pytest.mark.parametrize("system", [None, "你是一个乐于助人的助手。"])
def test_a_long_chat_loses_the_same_oldest_turns_as_re_encoding_it_would(tok, system):
    texts = [("这是第%d轮的问题，内容稍长一些。" % i) * (1 + i % 3) for i in range(24)]
    for budget in (20, 60, 100, 180, 400, 10_000):
        assert tok.fit_chat(chat(texts, system), budget) == dropping_oldest_turns(chat(texts, system), tok,
                                                                                            budget)


def test_fitting_a_chat_of_thousands_of_turns_encodes_each_turn_about_once(tok, monkeypatch):
    # one 219 KB body of 3,000 tiny turns used to be re-encoded once per dropped turn: 39 s of CPU
    messages = chat(["嗯"] * 3000, system="你是助手。")
    encoded = []
    plain_encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text, **kw: encoded.append(len(text)) or
                        plain_encode(self, text, **kw))
    ids, kept, dropped = tok.fit_chat(messages, 200)
    chat_chars = sum(len(m["content"]) + 20 for m in messages)  # each turn's text and its [INST] markers
    assert len(ids) <= 200 and dropped > 1400 and kept[0]["role"] == "system"
    assert sum(encoded) < 3 * chat_chars


def test_a_request_with_more_messages_than_the_limit_is_a_400_naming_messages():
    body = {"messages": chat(["嗯"] * 20)}
    assert len(serve.chat_messages(body, 21)) == 21
    with pytest.raises(serve.ApiError) as e:
        serve.chat_messages(body, 20)
    assert e.value.status == 400 and e.value.param == "messages" and "at most 20" in e.value.message


class FakeRequest:
    """What the engine hands the server: a queue of ("token", id) and one ("end", why)."""

    def __init__(self, events):
        self.out, self.cancelled = queue.Queue(), False
        for event in events:
            self.out.put(event)

    def cancel(self):
        self.cancelled = True


def test_an_answer_is_read_until_a_stop_string_which_frees_the_slot(tok):
    ids = tok.encode("好的。完毕。后面")
    request = FakeRequest([("token", i) for i in ids] + [("end", "cancelled")])
    pieces = []
    finish, generated = serve.read_answer(request, serve.TextStreamer(tok, ()), serve.StopStrings(["完毕"]),
                                          pieces.append)
    assert "".join(pieces) == "好的。" and finish == "stop" and request.cancelled and generated <= len(ids)


def test_chunks_and_answers_have_the_openai_shapes():
    meta = serve.response_meta(True, "demo")
    assert meta["id"].startswith("chatcmpl-")
    first = serve.stream_chunk(meta, role=True)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                           "content": ""}
    head, tail = serve.text_event_parts(meta)
    event = head + json.dumps("床前").encode() + tail
    assert json.loads(event[len(b"data: "):])["choices"][0]["delta"] == {"content": "床前"}
    usage = serve.usage_of(5, 3)
    last = serve.stream_chunk(meta, usage=usage)
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    whole = serve.full_response(meta, "你好", "length", usage)
    assert whole["object"] == "chat.completion" and whole["usage"]["total_tokens"] == 8
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "你好"}
    text = serve.full_response(serve.response_meta(False, "demo"), "你好", "stop", usage)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "你好"
    assert serve.failure("stop") is None and serve.failure("shutdown").status == 503


@pytest.mark.parametrize("body, param, phrase", [
    ({"max_tokens": 10.0}, "max_tokens", "an integer >= 1"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "an integer >= 1"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty", "from 0.01 to 10"),
])
def test_a_bad_setting_is_a_400_naming_it(body, param, phrase):
    with pytest.raises(serve.ApiError) as e:
        serve.sampling(body, max_seq_len=64, prompt_tokens=4, default_max_tokens=8)
    assert e.value.status == 400 and e.value.param == param and phrase in e.value.message


def test_the_answer_limit_and_an_overlong_prompt_name_the_fields_the_client_sent():
    assert serve.answer_limit({"max_completion_tokens": 5}, 8) == 5  # room for it is kept in a long chat too
    assert serve.answer_limit({"max_completion_tokens": 5, "max_tokens": 3}, 8) == 3
    assert serve.answer_limit({}, 8) == 8
    with pytest.raises(serve.ApiError) as e:
        serve.sampling({}, max_seq_len=64, prompt_tokens=64, default_max_tokens=8, prompt_field="prompt")
    assert e.value.param == "prompt" and e.value.code == "context_length_exceeded"


def test_bodies_that_are_not_json_text_are_400_and_one_that_stops_is_408(tiny_sft):
    import socket
    import threading
    from test_serve import raw_http, start_server
    proc, port = start_server(tiny_sft, "--idle_timeout=2")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        for body in (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b"[" * 100_000 + b"]" * 100_000):
            answer = raw_http(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(body), body))
            assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "invalid_json"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # 100 bytes announced, 10 sent
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"messages")
            assert s.recv(65536).startswith(b"HTTP/1.1 408")
        assert raw_http(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=30)
