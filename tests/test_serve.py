"""
serve.py and engine.py: batched decoding that changes no answer, the OpenAI API as the official client
sees it (sync, async, streamed, concurrent), exact usage, freed slots, errors in OpenAI's shape under a
few hundred malformed requests, and the chat page in a real browser.
"""
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from checkpoint import load_model
from conftest import ROOT, run
from engine import Engine, Request, generate

QUESTIONS = ["这条评论是正面还是负面？\n房间很干净，服务也很好。", "“一马当先”是什么意思？", "成语接龙：一马当先",
             "找出这句话中的人名、地名和机构名：江泽民在北京会见了新华社记者。", "你好"]


def greedy_alone(model, tok, ids, n):
    out = []
    for t in generate(model, torch.tensor([ids]), n, temperature=0, stop_tokens=tok.stop_ids):
        if t.item() in (tok.eos_id, tok.bos_id):
            break
        out.append(t.item())
    return out


def collect(request):
    tokens = []
    while True:
        kind, value = request.out.get(timeout=60)
        if kind == "end":
            return tokens, value
        tokens.append(value)


def test_greedy_answers_are_the_same_alone_and_beside_others(tiny_sft):
    model, tok, _ = load_model(tiny_sft)
    prompts = [tok.encode_chat([{"role": "user", "content": q}])[0] for q in QUESTIONS]
    expected = [greedy_alone(model, tok, ids, 24) for ids in prompts]
    engine = Engine(model, slots=3)  # five requests, three rows: two wait, then take freed rows
    requests = [Request(ids, 24, stop_tokens=tok.stop_ids) for ids in prompts]
    for r in requests:
        assert engine.submit(r)
    results = [collect(r) for r in requests]
    assert [tokens for tokens, _ in results] == expected
    assert all(finish in ("stop", "length") for _, finish in results)
    alone = Engine(model, slots=1)
    for ids, want in zip(prompts, expected):
        r = Request(ids, 24, stop_tokens=tok.stop_ids)
        alone.submit(r)
        assert collect(r)[0] == want


def test_a_full_queue_is_refused_and_a_cancelled_request_frees_its_row(tiny_sft):
    model, tok, _ = load_model(tiny_sft)
    ids = tok.encode_chat([{"role": "user", "content": "你好"}])[0]
    engine = Engine(model, slots=1, max_queue=1)
    first, second, third = (Request(ids, 10_000) for _ in range(3))  # no stop token: runs to the context's end
    assert engine.submit(first)
    assert first.out.get(timeout=60)[0] == "token"  # admitted: its row is busy
    assert engine.submit(second) and not engine.submit(third)  # one waits, the next is refused
    first.cancel()
    tokens, finish = collect(first)
    assert finish == "cancelled"
    assert second.out.get(timeout=60)[0] == "token"  # the freed row went to the waiting request
    second.cancel()
    assert collect(second)[1] == "cancelled"


# ---- the server, as clients see it

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(out_dir, *flags):
    """serve.py on a free port, started as a user starts it; (the process, its port) once it listens."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={out_dir}", f"--port={port}",
                             *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="2"))
    line = proc.stdout.readline()
    assert "serving" in line, line
    return proc, port


def long_context_checkpoint(tiny_sft, out):
    """A random tiny model with a 4096-token context (and tiny_sft's tokenizer) in out: answers that take seconds."""
    from checkpoint import save_checkpoint
    from model import ModelArgs, Transformer
    _, tok, _ = load_model(tiny_sft)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.n_words, max_seq_len=4096)
    torch.manual_seed(0)
    save_checkpoint(str(out / "ckpt.pt"), {"model": Transformer(args).state_dict(), "model_args": vars(args),
                                           "stage": "sft", "tokenizer_sha": tok.sha, "config": {}})
    shutil.copy(tok.model_path, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def server(tiny_sft):
    proc, port = start_server(tiny_sft, "--slots=4", "--max_tokens=32", "--cors_origin=http://example.test")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def post(url, payload, raw=None, timeout=60):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat_cli_answer(tiny_sft, question, max_tokens=32):
    return run("sample.py", f"--out_dir={tiny_sft}", "--chat", "--prompt", question, "--temperature=0",
               "--repetition_penalty=1.0", f"--max_new_tokens={max_tokens}").stdout.rstrip("\n")


def test_the_openai_client_gets_sample_pys_answers_streamed_and_not(server, tiny_sft):
    openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install openai)")
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    assert [m.id for m in client.models.list()] == [os.path.basename(tiny_sft)]
    for question in QUESTIONS[:3]:
        want = chat_cli_answer(tiny_sft, question)
        assert want.strip() or question == QUESTIONS[0]  # (the tiny model answers that one with spaces)
        reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=32)
        assert reply.choices[0].message.content == want and reply.choices[0].finish_reason in ("stop", "length")
        stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": question}],
                                                temperature=0, max_tokens=32, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_sample_evaluate_and_serve_give_the_same_greedy_answer(server, tiny_sft):
    from evaluate import evaluate_on_tasks
    model, tok, _ = load_model(tiny_sft)
    question, reference = QUESTIONS[1], "一马当先：比喻工作走在群众前面。"
    budget = len(tok.encode(reference)) + 8  # what evaluate.py lets an answer run to
    record = []
    evaluate_on_tasks(model, tok, [{"task": "meaning", "messages": [{"role": "user", "content": question},
                                                                    {"role": "assistant", "content": reference}]}],
                      set(), 0, record=record)
    from_evaluate = record[0][3]
    from_sample = chat_cli_answer(tiny_sft, question, max_tokens=budget)
    status, reply = post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                                           "temperature": 0, "max_tokens": budget})
    assert status == 200 and from_evaluate.strip()
    assert from_evaluate == from_sample == reply["choices"][0]["message"]["content"]


def test_top_k_and_repetition_penalty_are_honoured_as_sample_py_applies_them(server, tiny_sft):
    question = QUESTIONS[2]
    ask = lambda **settings: post(server + "/v1/chat/completions", {  # noqa: E731
        "messages": [{"role": "user", "content": question}], "max_tokens": 32, **settings})
    greedy = ask(temperature=0)[1]["choices"][0]["message"]["content"]
    # top_k=1 leaves one candidate: sampling at temperature 1 is then greedy
    assert all(ask(temperature=1.0, top_k=1)[1]["choices"][0]["message"]["content"] == greedy for _ in range(3))
    penalized = run("sample.py", f"--out_dir={tiny_sft}", "--chat", "--prompt", question, "--temperature=0",
                    "--repetition_penalty=1.5", "--max_new_tokens=32").stdout.rstrip("\n")
    assert penalized != greedy  # the penalty changes this answer, and serve.py changes it the same way
    assert ask(temperature=0, repetition_penalty=1.5)[1]["choices"][0]["message"]["content"] == penalized
    for bad in ({"top_k": -1}, {"top_k": 1.5}, {"repetition_penalty": 0}):
        status, body = ask(**bad)
        assert status == 400 and body["error"]["param"] == next(iter(bad))


def test_usage_counts_are_exact(server, tiny_sft):
    model, tok, _ = load_model(tiny_sft)
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": QUESTIONS[0]}]
    status, reply = post(server + "/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 20})
    ids = tok.encode_chat(messages)[0]
    answer = greedy_alone(model, tok, ids, 20)
    assert status == 200 and reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(answer),
                                                "total_tokens": len(ids) + len(answer)}


def test_four_concurrent_async_clients_all_get_complete_answers(server, tiny_sft):
    openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install openai)")
    wants = {q: chat_cli_answer(tiny_sft, q) for q in QUESTIONS[:4]}

    async def ask(client, question):
        stream = await client.chat.completions.create(model="any", messages=[{"role": "user", "content": question}],
                                                      temperature=0, max_tokens=32, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none")
        return await asyncio.gather(*(ask(client, q) for q in wants))

    assert asyncio.run(main()) == list(wants.values())


def test_completions_stop_strings_and_the_context_limit(server, tiny_sft):
    want = run("sample.py", f"--out_dir={tiny_sft}", "--start=床前明月光，", "--temperature=0", "--repetition_penalty=1.0",
               "--max_new_tokens=16").stdout.rstrip("\n")
    status, reply = post(server + "/v1/completions", {"prompt": "床前明月光，", "temperature": 0, "max_tokens": 16})
    assert status == 200 and "床前明月光，" + reply["choices"][0]["text"] == want
    full = reply["choices"][0]["text"]
    stop = full[3:5]  # a stop string from inside the answer: the text ends just before it
    status, reply = post(server + "/v1/completions", {"prompt": "床前明月光，", "temperature": 0, "max_tokens": 16,
                                                      "stop": [stop]})
    assert reply["choices"][0]["text"] == full[:full.index(stop)] and reply["choices"][0]["finish_reason"] == "stop"
    status, reply = post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": "很长" * 200}]})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded" and "more than fit" in \
        reply["error"]["message"]


@pytest.fixture(scope="module")
def long_server(tiny_sft, tmp_path_factory):
    """A server for a random tiny model with a 4096-token context: an answer that takes seconds."""
    proc, port = start_server(long_context_checkpoint(tiny_sft, tmp_path_factory.mktemp("long_context")))
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def active(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
        return json.loads(r.read())["active"]


def test_a_client_that_goes_away_frees_its_slot(long_server):
    body = json.dumps({"prompt": "床前", "max_tokens": 4000, "stream": True, "temperature": 1.0}).encode()
    client = socket.create_connection(("127.0.0.1", long_server), timeout=30)
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    while received.count(b"data: ") < 3:  # it is generating
        received += client.recv(4096)
    assert active(long_server) == 1
    client.close()  # the user closed the tab
    deadline = time.time() + 20
    while active(long_server) != 0:
        assert time.time() < deadline, "the slot of a client that went away was not freed"
        time.sleep(0.1)


def malformed_requests(rng):
    """(path, raw body) pairs that a server must answer with an error, not a crash."""
    good = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
    bad_values = [None, 1, -1, 0, 3.5, "x", "", [], {}, [1], {"a": 1}, True, "🙂" * 10, 10 ** 30]
    yield "/v1/chat/completions", b"{not json"
    yield "/v1/chat/completions", b"[1, 2, 3]"
    yield "/v1/chat/completions", "\ud800".encode("utf-8", "surrogatepass")
    yield "/v1/nowhere", json.dumps(good).encode()
    for _ in range(300):
        body = json.loads(json.dumps(good))
        key = rng.choice(["messages", "max_tokens", "temperature", "top_p", "stop", "n", "stream", "seed", "tools",
                          "max_completion_tokens", "role", "content", "stream_options"])
        value = rng.choice(bad_values)
        if key in ("role", "content"):
            body["messages"][0][key] = value
        elif key == "messages" and rng.random() < 0.5:
            body["messages"] = [{"role": "assistant", "content": "先说"}, {"role": "user", "content": "hi"},
                                {"role": rng.choice(["tool", "user", "function"]), "content": "x"}]
        else:
            body[key] = value
        yield rng.choice(["/v1/chat/completions", "/v1/completions"]), json.dumps(body).encode()


def test_hundreds_of_malformed_requests_get_openai_shaped_errors_and_the_server_keeps_serving(server):
    rng = random.Random(0)
    answered = 0
    for path, raw in malformed_requests(rng):
        status, reply = post(server + path, None, raw=raw)
        assert status in (200, 400, 404, 411, 413), (status, raw[:120])
        if status != 200:  # some mutations are still valid requests (e.g. a number where one is allowed)
            assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
        answered += 1
    assert answered > 300
    status, reply = post(server + "/v1/chat/completions", None, raw=b"x" * (2 << 20))
    assert status == 413 and reply["error"]["code"] == "body_too_large"
    status, reply = post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}], "n": 2})
    assert status == 400 and reply["error"]["param"] == "n"
    status, reply = post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}],
                                                           "temperature": 0, "max_tokens": 4})
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"


def playwright_api():
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def browser_page(p):
    """A page of Debian's chromium driven by playwright (never `playwright install`: it downloads)."""
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no chromium here (apt-get install chromium fonts-wqy-microhei)")
    return p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])


def test_the_chat_page_streams_an_answer_in_a_real_browser(server, tmp_path):
    playwright = playwright_api()
    question = QUESTIONS[1]
    _, reply = post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                                      "temperature": 0})
    want = reply["choices"][0]["message"]["content"]
    assert want.strip()  # an answer to see on the page
    with playwright.sync_playwright() as p:
        browser = browser_page(p)
        page = browser.new_page()
        page.goto(server + "/")
        page.fill("#input", question)
        page.press("#input", "Enter")
        page.wait_for_function("document.getElementById('send').disabled === false && "
                               "document.querySelectorAll('.assistant').length === 1", timeout=60_000)
        shown = page.inner_text(".assistant")
        assert page.inner_text(".user") == question and shown == want
        page.screenshot(path=os.environ.get("LLAMA2ZH_SCREENSHOT", str(tmp_path / "chat.png")))  # to look at
        browser.close()


# ---- one request never hurts another; errors and shutdowns end streams properly (issue 26)

def test_no_temperature_in_range_can_overflow_sampling():
    from engine import sample_next
    logits = torch.tensor([[3.0, 9.5, -2.0, 9.0]])
    for temperature in (1e-40, 1e-30, 1e-7, 1e-3):  # all inside the API's 0-2: each one the greedy token
        assert sample_next(logits, temperature).tolist() == [1]
    assert sample_next(logits, 1e-40, top_p=0.5).tolist() == [1]


def test_a_request_whose_sampling_fails_ends_alone(tiny_sft):
    model, tok, _ = load_model(tiny_sft)
    ids = tok.encode_chat([{"role": "user", "content": QUESTIONS[0]}])[0]
    engine = Engine(model, slots=2)
    healthy = Request(ids, 12, stop_tokens=tok.stop_ids)
    broken = Request(ids, 12, temperature=1.0)
    broken.generator = "not a generator"  # its sampling raises, in the same decode steps as the healthy one
    engine.submit(healthy)
    engine.submit(broken)
    assert collect(broken) == ([], "error")
    tokens, finish = collect(healthy)
    assert finish in ("stop", "length") and tokens == greedy_alone(model, tok, ids, 12)


def test_max_queue_0_means_no_waiting_beyond_the_slots(tiny_sft):
    model, tok, _ = load_model(tiny_sft)
    ids = tok.encode_chat([{"role": "user", "content": "你好"}])[0]
    engine = Engine(model, slots=1, max_queue=0)
    first = Request(ids, 10_000)
    assert engine.submit(first)  # a free slot: accepted
    assert first.out.get(timeout=60)[0] == "token"
    assert not engine.submit(Request(ids, 4))  # the slot is busy and nothing may wait
    first.cancel()
    assert collect(first)[1] == "cancelled"


def test_a_404_leaves_the_connection_usable_for_the_next_request(server):
    openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install openai)")
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="x", input="你好" * 50)  # a body the server never reads as JSON
    reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "你好"}], max_tokens=4,
                                           temperature=0)
    assert reply.choices[0].message.role == "assistant"
    # the same with raw bytes: a 404 with a body, then a good request, on one connection
    body = json.dumps({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}).encode()
    host, port = server.rsplit(":", 1)[0].split("//")[1], int(server.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=60) as s:
        for path in ("/v1/embeddings", "/v1/chat/completions"):
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 404") and b"HTTP/1.1 200" in received, received[:400]


def test_a_long_conversation_loses_its_oldest_turns_and_keeps_the_system_prompt(server):
    system = {"role": "system", "content": "你是助手。"}
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "这是一段很长的对话内容，" * 3}
             for i in range(8)]
    question = {"role": "user", "content": "你好"}
    req = urllib.request.Request(server + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": [system] + turns + [question], "max_tokens": 8,
                                                  "temperature": 0}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        dropped, answer = int(r.headers["X-Dropped-Turns"]), json.loads(r.read())
    assert dropped >= 1 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    # the answer is the one to the conversation without those turns: the system prompt was kept
    status, direct = post(server + "/v1/chat/completions", {"messages": [system] + turns[2 * dropped:] + [question],
                                                            "max_tokens": 8, "temperature": 0})
    assert status == 200 and direct["choices"][0]["message"] == answer["choices"][0]["message"]
    assert direct["usage"]["prompt_tokens"] == answer["usage"]["prompt_tokens"]


def test_stopping_the_server_ends_each_open_stream_with_an_error_event(tiny_sft, tmp_path):
    proc, port = start_server(long_context_checkpoint(tiny_sft, tmp_path))
    body = json.dumps({"prompt": "床前", "max_tokens": 4000, "stream": True, "temperature": 1.0}).encode()
    client = socket.create_connection(("127.0.0.1", port), timeout=60)
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    while received.count(b"data: ") < 3:  # it is generating
        received += client.recv(4096)
    proc.send_signal(signal.SIGTERM)  # `kill`, `docker stop`
    while chunk := client.recv(65536):
        received += chunk
    client.close()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in proc.stdout.read()
    events = [e for e in received.split(b"\r\n\r\n", 1)[1].split(b"\n\n") if e.strip()]
    assert received.count(b"HTTP/1.1") == 1  # never a second status line inside the stream
    last = json.loads(events[-1][len(b"data: "):])
    assert last["error"]["code"] == "shutting_down" and last["error"]["type"] == "server_error"


def send_and_wait(page, text, asked):
    """Send text as the page's asked-th question, and wait until its answer (or failure) is over."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.getElementById('send').disabled === false && "
                           f"document.querySelectorAll('.user').length === {asked}", timeout=60_000)


def test_the_page_enter_while_composing_pinyin_does_not_send(server):
    playwright = playwright_api()
    with playwright.sync_playwright() as p:
        browser = browser_page(p)
        page = browser.new_page()
        page.goto(server + "/")
        page.fill("#input", "nihao")
        # Enter pressed to pick a candidate while an input method composes: the message must stay in the box
        page.dispatch_event("#input", "keydown", {"key": "Enter", "isComposing": True})
        page.dispatch_event("#input", "keydown", {"key": "Enter", "keyCode": 229})
        assert page.locator(".user").count() == 0 and page.input_value("#input") == "nihao"
        page.fill("#input", "你好")
        send_and_wait(page, "你好", 1)  # a plain Enter sends
        assert page.inner_text(".user") == "你好"
        browser.close()


def test_the_page_keeps_talking_past_the_context_and_after_failures(server):
    playwright = playwright_api()
    with playwright.sync_playwright() as p:
        browser = browser_page(p)
        page = browser.new_page()
        page.goto(server + "/")
        page.fill("#system", "你是助手。")
        # a message that cannot fit the 64-token context fails: it leaves no turn behind in the history
        send_and_wait(page, "很长" * 100, 1)
        assert "context" in page.inner_text(".note") and page.evaluate("() => history") == []
        # then turn after turn, past the context: the oldest turns are left out (and the page says so)
        for i in range(2, 8):
            send_and_wait(page, "你好，今天天气怎么样？", i)
        notes = page.locator(".note").all_inner_texts()
        assert len(notes) > 1 and all("错误" not in n for n in notes[1:]) and any("省略" in n for n in notes), notes
        turns = page.evaluate("() => history")
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and 0 < len(turns) < 12
        browser.close()


def test_new_chat_during_an_answer_starts_a_clean_conversation(long_server):
    playwright = playwright_api()
    with playwright.sync_playwright() as p:
        browser = browser_page(p)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{long_server}/")
        page.fill("#input", "床前明月光")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelector('.assistant') && "
                               "document.querySelector('.assistant').textContent.length > 3", timeout=60_000)
        page.click("#new")  # while the answer streams
        page.wait_for_function("document.getElementById('send').disabled === false", timeout=60_000)
        assert page.evaluate("() => history") == []  # the aborted answer stayed with the old conversation
        page.fill("#temperature", "0")
        send_and_wait(page, "你好", 1)
        notes = page.locator(".note").all_inner_texts()
        assert not [n for n in notes if "错误" in n], notes  # no "messages must alternate"
        assert [m["role"] for m in page.evaluate("() => history")] == ["user", "assistant"]
        browser.close()


def raw_http(server, request):
    """Send raw request bytes on a new connection; the status line and the whole answer, as bytes."""
    host, port = server.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(request)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received:
                head, body = received.split(b"\r\n\r\n", 1)
                length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")]
                if request.startswith(b"HEAD") or length and len(body) >= length[0]:
                    break
    return received


def test_the_http_edges_get_openai_shaped_answers(server):
    openai = pytest.importorskip("openai", reason="the openai package is not installed (pip install openai)")
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    name = client.models.list().data[0].id
    assert client.models.retrieve(name).id == name  # GET /v1/models/{id}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with urllib.request.urlopen(server + "/v1/models?limit=1", timeout=60) as r:  # a query string is no new path
        assert json.loads(r.read())["data"][0]["id"] == name
    for request, status in ((b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
                            (b"PUT /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", b"405"),
                            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n",
                             b"411")):
        answer = raw_http(server, request)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    head = raw_http(server, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")  # headers, no body
    # a browser page of the allowed origin: the preflight, then the answer readable with its headers
    preflight = raw_http(server, b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                 b"Origin: http://example.test\r\n\r\n")
    assert preflight.startswith(b"HTTP/1.1 204") and b"Access-Control-Allow-Origin: http://example.test" in preflight
    status, reply = post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}],
                                                           "stop": ""})
    assert status == 400 and reply["error"]["param"] == "stop"  # "" would end every answer before it starts


def test_a_seeded_request_samples_on_the_cpu_whatever_device_its_logits_are_on(tiny_sft):
    model, tok, _ = load_model(tiny_sft)
    engine = Engine(model, slots=1, background=False)
    logits = torch.randn(tok.n_words)

    class OnAnotherDevice:  # what a CUDA tensor is to a CPU generator: usable only after .cpu()
        def cpu(self):
            return logits

    request = Request([tok.bos_id], 4, temperature=1.0, seed=7)
    engine._emit(request, OnAnotherDevice())
    again = Request([tok.bos_id], 4, temperature=1.0, seed=7)
    engine._emit(again, logits)
    assert request.finish is None and request.out.get_nowait() == again.out.get_nowait()  # the same seeded token


@pytest.mark.parametrize("flag, message", [("--port=70000", "is not a port"), ("--host=::1", "serving")])
def test_serve_start_up_ports_and_ipv6(tiny_sft, flag, message):
    if flag == "--host=::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={tiny_sft}", flag,
                             "--port=0" if "host" in flag else "--slots=1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    proc.terminate()
    out = line + proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out
    # a machine without IPv6 loopback cannot listen on ::1: then it must say so, not blame the port
    assert message in out or flag == "--host=::1" and "cannot listen on ::1" in out and "--host" in out, out


def test_a_fuzz_of_extreme_settings_ends_no_concurrent_request(server):
    rng = random.Random(1)
    question = [{"role": "user", "content": QUESTIONS[0]}]
    status, alone = post(server + "/v1/chat/completions", {"messages": question, "temperature": 0})
    assert status == 200
    results = []

    def ask(body):
        results.append(post(server + "/v1/chat/completions", body))

    bodies = [{"messages": question, "temperature": 0}] * 4  # greedy requests, beside all the others
    for _ in range(40):
        bodies.append({"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
                       "temperature": rng.choice([0, 1e-40, 1e-30, 1e-7, 0.5, 2]),
                       "top_p": rng.choice([1e-9, 0.5, 1]), "seed": rng.choice([None, 0, 2 ** 63 - 1]),
                       "stop": rng.choice([None, "。", ["\n"], ["a", "b", "c", "d"]]),
                       "max_tokens": rng.choice([1, 2, 32, 10 ** 6])})
    rng.shuffle(bodies)
    threads = [threading.Thread(target=ask, args=(body,)) for body in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in results] == [200] * len(bodies), [r for r in results if r[0] != 200][:3]
    assert all(reply["choices"][0]["finish_reason"] in ("stop", "length") for _, reply in results)
    greedy = [reply for _, reply in results if reply["choices"][0]["message"] == alone["choices"][0]["message"]]
    assert len(greedy) >= 4  # every greedy request got the answer it gets alone


def test_the_page_shows_what_a_proxy_error_a_cut_answer_and_a_failed_stream_mean(server):
    playwright = playwright_api()

    def sse(*events):
        return "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events) + "data: [DONE]\n\n"

    delta = {"choices": [{"index": 0, "delta": {"content": "一二三"}, "finish_reason": None}]}
    answers = [  # what the API (or a proxy in front of it) sends, and what the page must say
        (dict(status=502, content_type="text/html", body="<html>Bad Gateway</html>"), "502"),
        (dict(status=200, content_type="text/event-stream",
              body=sse(delta, {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})), "截断"),
        (dict(status=200, content_type="text/event-stream",
              body=sse(delta, {"error": {"message": "the server is shutting down", "type": "server_error",
                                         "param": None, "code": "shutting_down"}})), "shutting down"),
    ]
    with playwright.sync_playwright() as p:
        browser = browser_page(p)
        page = browser.new_page()
        page.goto(server + "/")
        for i, (answer, shown) in enumerate(answers, 1):
            page.route("**/v1/chat/completions", (lambda a: lambda route: route.fulfill(**a))(answer))
            send_and_wait(page, f"问题{i}", i)
            note = page.locator(".note").last.inner_text()
            assert shown in note and "Unexpected token" not in note, note
            page.unroute("**/v1/chat/completions")
        # only the cut answer is a turn: the proxy error and the failed stream left none
        assert [m["content"] for m in page.evaluate("() => history")] == ["问题2", "一二三"]
        assert page.eval_on_selector(".msg", "e => getComputedStyle(e).overflowWrap") == "anywhere"  # long words wrap
        browser.close()


def test_a_silent_connection_is_closed_and_frees_its_thread(tiny_sft):
    proc, port = start_server(tiny_sft, "--idle_timeout=1")
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=60)  # connects, never sends a byte
        kept_alive = socket.create_connection(("127.0.0.1", port), timeout=60)
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # one request, then silence
        answer = b""
        while not answer.rstrip().endswith(b"}"):  # the headers, then the JSON body
            answer += kept_alive.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        assert silent.recv(1) == b"" and kept_alive.recv(1) == b""  # both closed by the server, not by the timeout
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_burst_of_connections_waits_in_the_kernels_queue_instead_of_being_dropped():
    # 100 clients connect at once while the server has not yet accepted any (its accept loop is busy
    # elsewhere): every handshake must complete into the listening socket's queue. With the standard
    # library's default queue of 5, 6 got in and the rest kept re-sending their SYNs, seconds apart
    import select
    from http.server import BaseHTTPRequestHandler
    from serve import Server
    server = Server(("127.0.0.1", 0), BaseHTTPRequestHandler)  # listening, not accepting
    clients = []
    try:
        for _ in range(100):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(server.server_address)
            clients.append(client)
        pending = set(clients)
        for _ in range(15):  # until every handshake is done (a dropped SYN would wait a second or more)
            pending -= set(select.select([], list(pending), [], 0.2)[1])
            if not pending:
                break
        server.socket.setblocking(False)
        queued = 0
        while True:
            try:
                server.socket.accept()[0].close()
            except BlockingIOError:
                break
            queued += 1
        assert queued == 100
    finally:
        for client in clients:
            client.close()
        server.server_close()


def test_the_page_says_the_server_is_unreachable_keeps_the_question_and_fits_a_phone(server):
    playwright = playwright_api()
    with playwright.sync_playwright() as p:
        browser = browser_page(p)
        page = browser.new_page(viewport={"width": 360, "height": 640})
        page.goto(server + "/")
        page.route("**/v1/chat/completions", lambda route: route.abort())  # as when serve.py has stopped
        send_and_wait(page, "你好吗？", 1)
        assert "server unreachable" in page.locator(".note").last.inner_text()
        assert page.locator(".assistant").count() == 0  # no empty answer bubble
        assert "unsent" in page.get_attribute(".user", "class") and page.input_value("#input") == "你好吗？"
        assert page.evaluate("() => history") == []
        # a phone's width: the input spans the page, the buttons are on screen
        input_box, send_box = page.locator("#input").bounding_box(), page.locator("#send").bounding_box()
        assert input_box["width"] > 300 and send_box["x"] + send_box["width"] <= 360
        browser.close()
