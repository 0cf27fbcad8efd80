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
from engine import Engine, Request

QUESTIONS = ["这条评论是正面还是负面？\n房间很干净，服务也很好。", "“一马当先”是什么意思？", "成语接龙：一马当先",
             "找出这句话中的人名、地名和机构名：江泽民在北京会见了新华社记者。", "你好"]


def greedy_alone(model, tok, ids, n):
    out = []
    for t in model.generate(torch.tensor([ids]), n, temperature=0, stop_tokens=(tok.eos_id, tok.bos_id)):
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
    requests = [Request(ids, 24, stop_tokens=(tok.eos_id, tok.bos_id)) for ids in prompts]
    for r in requests:
        assert engine.submit(r)
    results = [collect(r) for r in requests]
    assert [tokens for tokens, _ in results] == expected
    assert all(finish in ("stop", "length") for _, finish in results)
    alone = Engine(model, slots=1)
    for ids, want in zip(prompts, expected):
        r = Request(ids, 24, stop_tokens=(tok.eos_id, tok.bos_id))
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


@pytest.fixture(scope="module")
def server(tiny_sft):
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={tiny_sft}", f"--port={port}",
                             "--slots=4", "--max_tokens=32"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    line = proc.stdout.readline()
    assert "serving" in line, line
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
    from checkpoint import save_checkpoint
    from model import ModelArgs, Transformer
    _, tok, _ = load_model(tiny_sft)
    out = tmp_path_factory.mktemp("long_context")
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.n_words, max_seq_len=4096)
    torch.manual_seed(0)
    save_checkpoint(str(out / "ckpt.pt"), {"model": Transformer(args).state_dict(), "model_args": vars(args),
                                           "stage": "sft", "tokenizer_sha": tok.sha, "config": {}})
    shutil.copy(tok.model_path, out / "tokenizer.model")
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={out}", f"--port={port}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "serving" in proc.stdout.readline()
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


def test_the_chat_page_streams_an_answer_in_a_real_browser(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no chromium here (apt-get install chromium fonts-wqy-microhei)")
    question = QUESTIONS[1]
    _, reply = post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                                      "temperature": 0})
    want = reply["choices"][0]["message"]["content"]
    assert want.strip()  # an answer to see on the page
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
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
