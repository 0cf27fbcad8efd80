"""
Serve a checkpoint over the OpenAI Chat Completions API, with a chat page at /.

    python serve.py --out_dir=out-sft                      # http://127.0.0.1:8000/ in a browser
    curl http://127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "你好"}]}'

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions, streaming
(server-sent events) or not. Requests share the model through engine.py: up to `slots` of them are
decoded together, one token each per forward pass; more wait in a bounded queue, and past it the
answer is 503. Messages are rendered with the model's Llama 2 chat template exactly as sample.py
--chat renders them. Errors are OpenAI-shaped ({"error": {"message", "type", "param", "code"}}).
Built on the standard library's HTTP server: nothing to install (the reasons: docs/serve.md).
"""
import errno
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from checkpoint import load_model, stage_of
from configurator import check_ranges, configure
from device import PTDTYPE, resolve_device
from engine import Engine, Request, TextStreamer
from tokenizer import split_turns

# -----------------------------------------------------------------------------
out_dir = "out-sft"          # the checkpoint to serve (a directory of ours, or an imported Llama)
tokenizer = ""               # a tokenizer .model to use instead of the one beside the checkpoint
host = "127.0.0.1"           # the address to listen on; 0.0.0.0 serves other machines too
port = 8000
slots = 8                    # requests decoded together; 1 answers one request at a time
max_queue = 64               # requests waiting for a slot; past this the server answers 503
max_tokens = 256             # new tokens per answer when a request does not say
max_body_bytes = 1 << 20     # larger request bodies are refused (413)
max_messages = 1024          # chat requests with more messages are refused (400): fitting them costs CPU for all
model_name = ""              # the model's id in the API; "": the checkpoint directory's name
cors_origin = ""             # a web origin whose pages may call the API (e.g. http://localhost:3000, or *); "": none
idle_timeout = 60.0          # seconds a connection may stay silent before it is closed (each holds a thread)
device = "auto"              # auto: cuda, then mps, then cpu
dtype = "auto"               # auto: bfloat16 on GPUs that support it, else float32
# -----------------------------------------------------------------------------

UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call")
# why a request ended without an answer: (HTTP status, message, code)
FAILURES = {"error": (500, "generation failed on the server", "generation_failed"),
            "timeout": (500, "no token came for 600 s; the answer was given up", "timeout"),
            "shutdown": (503, "the server is shutting down", "shutting_down")}
POST_PATHS, GET_PATHS = ("/v1/chat/completions", "/v1/completions"), ("/", "/health", "/v1/models")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def field(body, name, kinds, default=None, check=None, what=None):
    """body[name] if it has one of the JSON types kinds (and passes check), else an ApiError naming it."""
    if name not in body or body[name] is None:
        return default
    value = body[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds or \
            check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


def message_text(message, i):
    """A message's content: a string, or OpenAI's list of text parts."""
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}]")
    return content


def answer_limit(body, default_max_tokens):
    """The most new tokens a request asks for: max_tokens, else max_completion_tokens, else the default."""
    limit = field(body, "max_completion_tokens", int, None, lambda v: v >= 1, "an integer >= 1")
    return field(body, "max_tokens", int, limit, lambda v: v >= 1, "an integer >= 1") or default_max_tokens


def sampling(body, max_seq_len, prompt_tokens, default_max_tokens, prompt_field="messages"):
    """The generation settings every endpoint shares, validated."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported: ask again for another answer", param="n")
    for name in UNSUPPORTED:
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported: this model has not learned to call tools", param=name)
    limit = answer_limit(body, default_max_tokens)
    if prompt_tokens >= max_seq_len:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens, {prompt_tokens - max_seq_len + 1} more than fit "
                            f"the model's context of {max_seq_len} with room for an answer; shorten it",
                       param=prompt_field, code="context_length_exceeded")
    stop = field(body, "stop", (str, list), [], lambda v: isinstance(v, str) and v or isinstance(v, list) and
                 len(v) <= 4 and all(isinstance(s, str) and s for s in v),
                 "a non-empty string or a list of up to 4 non-empty strings")
    options = field(body, "stream_options", dict, {})
    return dict(max_new_tokens=limit,
                temperature=float(field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2,
                                        "a number from 0 to 2")),
                top_p=float(field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
                # llama-server's and vLLM's extensions, as sample.py has them (0 and 1.0: off)
                top_k=field(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0") or None,
                # a penalty divides positive logits: from 0.01 up they stay far from fp32's overflow
                repetition_penalty=float(field(body, "repetition_penalty", (int, float), 1.0,
                                               lambda v: 0.01 <= v <= 10, "a number from 0.01 to 10")),
                seed=field(body, "seed", int, None, lambda v: 0 <= v < 2 ** 63, "an integer from 0 to 2**63 - 1"),
                stop=[stop] if isinstance(stop, str) else stop,
                stream=field(body, "stream", bool, False, what="true or false"),
                include_usage=bool(isinstance(options, dict) and options.get("include_usage")))


def chat_messages(body, max_messages):
    """The request's messages, checked and normalized to [{"role", "content"}] (OpenAI's "developer" is system)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", param="messages")
    if len(messages) > max_messages:
        raise ApiError(400, f"'messages' has {len(messages)} messages; at most {max_messages} are read (the oldest "
                            f"turns are dropped to fit the context anyway): send the recent ones", param="messages")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with a role and a content", param=f"messages[{i}]")
        role = m.get("role") if isinstance(m.get("role"), str) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role {json.dumps(m.get('role'))[:40]} is not one of system, user, "
                                f"assistant (tool messages are not supported)", param=f"messages[{i}].role")
        rendered.append({"role": role, "content": message_text(m, i)})
    if rendered[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's: the model answers it", param="messages")
    try:
        split_turns(rendered)
    except ValueError as e:
        raise ApiError(400, f"{e} (one system message first at most)", param="messages")
    return rendered


def completion_prompt(body, tok):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or a list of one string)", param="prompt")
    return [tok.bos_id] + tok.encode(prompt)


class StopStrings:
    """Text out as it is generated, held back only while it could be the start of a stop string, and cut
    where a stop string begins (which is then not part of the answer)."""

    def __init__(self, stops):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def add(self, piece):
        """The text that can go out now."""
        self.text += piece
        hits = [self.text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.stopped, end = True, min(hits)
        else:
            end = len(self.text) - max((len(s) - 1 for s in self.stops), default=0)
            end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self):
        out = "" if self.stopped else self.text[self.sent:]
        self.sent = len(self.text)
        return out


def response_meta(chat, model_name):
    """What every chunk and response of one answer repeats: its id, object type, time and model."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model_name, "chat": chat}


def stream_chunk(meta, text=None, finish=None, role=False, usage=None):
    """One server-sent event's payload: a piece of text, the first (role) chunk, the finish, or the usage."""
    if meta["chat"]:
        delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish}] if usage is None else []
    obj = meta["object"] + ".chunk" if meta["chat"] else meta["object"]
    return {"id": meta["id"], "object": obj, "created": meta["created"], "model": meta["model"], "choices": choices,
            **({"usage": usage} if usage else {})}


def text_event_parts(meta):
    """(head, tail) bytes of a text event, so that each token's event is head + its JSON string + tail: the
    JSON around the text is the same every time."""
    head, tail = json.dumps(stream_chunk(meta, "\0"), ensure_ascii=False).split('"\\u0000"')
    return b"data: " + head.encode("utf-8"), tail.encode("utf-8") + b"\n\n"


def usage_of(prompt_tokens, generated):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def full_response(meta, text, finish, usage):
    """The whole answer of a request that did not stream."""
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
              if meta["chat"] else {"index": 0, "text": text, "finish_reason": finish})
    return {"id": meta["id"], "object": meta["object"], "created": meta["created"], "model": meta["model"],
            "choices": [choice], "usage": usage}


def failure(finish):
    """The ApiError of an answer that ended without finishing (FAILURES), else None."""
    if finish not in FAILURES:
        return None
    status, message, code = FAILURES[finish]
    return ApiError(status, message, code=code, kind="server_error")


def read_answer(request, streamer, stops, on_text, wait_s=600):
    """Read a submitted request's tokens until it ends, each piece of text that can go out to on_text (held
    back while it may be the start of a stop string). Returns (finish reason, tokens generated)."""
    finish, generated = None, 0
    while finish is None:
        try:
            kind, value = request.out.get(timeout=wait_s)
        except queue.Empty:
            request.cancel()
            kind, value = "end", "timeout"
        if kind == "end":
            finish = {"cancelled": "stop"}.get(value, value)
            text = stops.flush() + streamer.end() if not stops.stopped else ""
        else:
            generated += 1
            text = stops.add(streamer.put(value))
            if stops.stopped:
                request.cancel()  # a stop string: the slot is freed, the answer ends here
        if text:
            on_text(text)
    return finish, generated


class Server(ThreadingHTTPServer):
    """The listening server; main() sets what the handlers read: engine, tok, name, limits, cors, open_answers."""
    daemon_threads = True
    request_queue_size = 1024  # a burst of connections waits in the kernel's queue (the default 5 drops them)


class Handler(BaseHTTPRequestHandler):
    """One connection's requests, answered from the model the Server holds (self.server)."""
    protocol_version = "HTTP/1.1"  # keep-alive for the non-streaming answers

    def setup(self):
        self.timeout = self.server.idle_seconds  # a connection silent this long is closed: it holds a thread
        super().setup()

    def log_message(self, format, *args):  # one short line per request, not the default's long ones
        sys.stderr.write(f"{self.address_string()} {self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    def end_headers(self):
        if self.server.cors:  # the page of another origin may read the answers
            self.send_header("Access-Control-Allow-Origin", self.server.cors)
            self.send_header("Access-Control-Expose-Headers", "X-Dropped-Turns")
        super().end_headers()

    def send_json(self, status, payload, headers=None):
        self.send_bytes(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json", headers)

    def send_bytes(self, status, data, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")  # so that a keep-alive client opens a new one
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_event(self, payload):
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()

    def route(self):
        """The path without its query string, and a 405 for a known path asked with the wrong method."""
        path = urllib.parse.urlsplit(self.path).path
        allowed = "POST" if path in POST_PATHS else "GET, HEAD" if path in GET_PATHS or \
            path.startswith("/v1/models/") else None
        if allowed and self.command not in allowed.split(", "):
            self.send_json(405, ApiError(405, f"{path} takes {allowed}, not {self.command}",
                                         code="method_not_allowed").body(), {"Allow": allowed})
            return None
        return path

    def do_GET(self):
        if self.headers.get("Content-Length"):  # read a body nobody asked for, or it would read as the next request
            self.drop_body()
        path, name = self.route(), self.server.name
        model_card = {"id": name, "object": "model", "created": 0, "owned_by": "llama2.zh"}
        if path == "/":
            with open(PAGE, "rb") as f:
                self.send_bytes(200, f.read(), "text/html")
        elif path == "/health":
            active, waiting = self.server.engine.busy()
            self.send_json(200, {"status": "ok", "active": active, "waiting": waiting,
                                 "slots": self.server.engine.slots})
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [model_card]})
        elif path is not None and path.startswith("/v1/models/"):
            if urllib.parse.unquote(path[len("/v1/models/"):]) == name:
                self.send_json(200, model_card)
            else:
                self.send_json(404, ApiError(404, f"no model {path[11:][:100]!r}; this server has {name!r}",
                                             param="model", code="model_not_found").body())
        elif path is not None:
            self.send_json(404, ApiError(404, f"no such path: {self.command} {path[:100]}", code="not_found").body())

    do_HEAD = do_GET

    def do_OPTIONS(self):  # a browser's preflight before a cross-origin POST
        if self.headers.get("Content-Length"):
            self.drop_body()
        if not self.server.cors:
            self.send_json(405, ApiError(405, "OPTIONS is answered only with --cors_origin set",
                                         code="method_not_allowed").body(), {"Allow": "GET, HEAD, POST"})
            return
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def refuse_method(self):
        self.drop_body()
        self.send_json(405, ApiError(405, f"{self.command} is not supported: GET, HEAD and POST are",
                                     code="method_not_allowed").body(), {"Allow": "GET, HEAD, POST"})

    do_PUT = do_DELETE = do_PATCH = refuse_method

    def do_POST(self):
        self.body_read = False
        try:
            path = urllib.parse.urlsplit(self.path).path
            if path in GET_PATHS or path.startswith("/v1/models/"):
                self.drop_body()
                self.body_read = True
                self.route()
                return
            if path not in POST_PATHS:
                raise ApiError(404, f"no such path: POST {path[:100]}", code="not_found")
            body = self.read_body()
            self.answer(path == "/v1/chat/completions", body)
        except ApiError as e:
            if not self.body_read:  # an unread body would be parsed as the next request on this connection
                self.drop_body()
            self.close_connection = self.close_connection or e.status >= 500 or e.status == 413
            self.send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # our bug, not the client's: say so, and keep serving
            self.close_connection = True
            sys.stderr.write(f"error answering {self.path}: {type(e).__name__}: {e}\n")
            self.send_json(500, ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").body())

    def drop_body(self):
        """Read and drop the body of a request refused before reading it; close when its length is unknown."""
        length = self.headers.get("Content-Length", "")
        if length.isascii() and length.isdigit() and int(length) <= self.server.body_limit:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def read_body(self):
        length, limit = self.headers.get("Content-Length"), self.server.body_limit
        if length is None or not (length.isascii() and length.isdigit()):
            raise ApiError(411, "send the body with a Content-Length header", code="length_required")
        if int(length) > limit:
            # read what the client is sending before answering, or it sees a broken pipe instead of the 413;
            # a body far past the limit is cut off unread
            left = int(length) if int(length) <= 16 * limit else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
            raise ApiError(413, f"the body has {length} bytes; the limit is {limit}", code="body_too_large")
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:  # a client that stopped sending mid-body: one that sent less than it announced
            self.body_read = self.close_connection = True
            raise ApiError(408, f"the body stopped before its {length} bytes came", code="request_timeout")
        self.body_read = True
        if len(raw) < int(length):
            self.close_connection = True
            raise ApiError(400, f"the body has {len(raw)} of the {length} bytes Content-Length says",
                           code="invalid_json")
        try:
            body = json.loads(raw)
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) is not text
        except (json.JSONDecodeError, UnicodeDecodeError, UnicodeEncodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else \
                "a lone surrogate escape, not Unicode text" if isinstance(e, UnicodeEncodeError) else str(e)
            raise ApiError(400, f"the body is not valid JSON: {why}", code="invalid_json")
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def answer(self, chat, body):
        """The prompt and settings of a request, its place in the engine, then its answer, streamed or whole."""
        server, dropped = self.server, 0
        max_seq_len, default_max_tokens = server.engine.max_seq_len, server.default_max_tokens
        if chat:  # room for an answer: what the request asks for, at most half the context
            room = min(answer_limit(body, default_max_tokens), max_seq_len // 2)
            ids, _, dropped = server.tok.fit_chat(chat_messages(body, server.max_messages), max_seq_len - room)
        else:
            ids = completion_prompt(body, server.tok)
        settings = sampling(body, max_seq_len, len(ids), default_max_tokens, "messages" if chat else "prompt")
        request = Request(ids, min(settings["max_new_tokens"], max_seq_len - len(ids)), settings["temperature"],
                          settings["top_p"], settings["seed"], stop_tokens=server.tok.stop_ids,
                          top_k=settings["top_k"], repetition_penalty=settings["repetition_penalty"])
        if not server.engine.submit(request):
            if server.engine.closed:
                raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            raise ApiError(503, "the server is busy: every slot and the queue are full; try again shortly",
                           code="overloaded", kind="server_error")
        meta = response_meta(chat, server.name)
        streamer, stops = TextStreamer(server.tok, () if chat else ids), StopStrings(settings["stop"])
        server.open_answers.append(request)
        try:
            if settings["stream"]:
                self.stream(request, meta, streamer, stops, len(ids), settings["include_usage"], dropped)
            else:
                pieces = []
                finish, generated = read_answer(request, streamer, stops, pieces.append)
                if failure(finish):
                    raise failure(finish)
                self.send_json(200, full_response(meta, "".join(pieces), finish, usage_of(len(ids), generated)),
                               {"X-Dropped-Turns": str(dropped)})
        except (BrokenPipeError, ConnectionResetError):
            request.cancel()  # the client went away: its slot is freed before the next step
            self.close_connection = True
        except Exception:
            request.cancel()
            raise  # do_POST answers (an ApiError as itself, anything else as a 500)
        finally:
            server.open_answers.remove(request)

    def stream(self, request, meta, streamer, stops, prompt_tokens, include_usage, dropped):
        """An answer as server-sent events. Once the status line is out, a failure is the stream's last event."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("X-Dropped-Turns", str(dropped))
        self.end_headers()
        self.close_connection = True
        head, tail = text_event_parts(meta)
        try:
            if meta["chat"]:
                self.send_event(stream_chunk(meta, role=True))
            finish, generated = read_answer(
                request, streamer, stops,
                lambda text: self.wfile.write(head + json.dumps(text, ensure_ascii=False).encode("utf-8") + tail))
            if failure(finish):
                self.send_event(failure(finish).body())
                return
            self.send_event(stream_chunk(meta, finish=finish))
            if include_usage:
                self.send_event(stream_chunk(meta, usage=usage_of(prompt_tokens, generated)))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:
            request.cancel()
            sys.stderr.write(f"error answering {self.path}: {type(e).__name__}: {e}\n")
            self.send_event(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error",
                                     kind="server_error").body())


def main():
    config = configure(globals())
    check_ranges(config, at_least_1=("slots", "max_tokens", "max_body_bytes", "max_messages"),
                 at_least_0=("port", "max_queue"), positive=("idle_timeout",))
    if port > 65535:
        raise SystemExit(f"error: --port={port} is not a port: use 0 to 65535 (0: any free one)")
    dev, dt = resolve_device(device, dtype)
    model, tok, checkpoint = load_model(out_dir, dev, PTDTYPE[dt], tokenizer)
    if stage_of(checkpoint).chat is False:
        print(f"warning: {out_dir} is a {checkpoint.get('stage')} checkpoint that never saw chat data", file=sys.stderr)
    engine = Engine(model, slots, max_queue, background=False)  # run below, in the main thread
    name = model_name or os.path.basename(os.path.abspath(out_dir))
    Server.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # --host=::1, --host=::
    Server.request_queue_size = max(Server.request_queue_size, slots + max_queue)  # a full burst is queued
    try:
        server = Server((host, port), Handler)
    except (OSError, OverflowError) as e:
        why = getattr(e, "strerror", None) or str(e)
        fix = "choose another --port" if getattr(e, "errno", None) == errno.EADDRINUSE else "check --host and --port"
        raise SystemExit(f"error: cannot listen on {host}:{port}: {why}; {fix}")
    server.engine, server.tok, server.name, server.open_answers = engine, tok, name, []
    server.default_max_tokens, server.max_messages, server.body_limit = max_tokens, max_messages, max_body_bytes
    server.cors, server.idle_seconds = cors_origin, idle_timeout
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name} ({model.num_params() / 1e6:.2f}M parameters, {slots} slots) on "
          f"http://{shown}:{server.server_address[1]}/ ; Ctrl-C stops", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def on_sigterm(signum, frame):  # `kill`, `docker stop`, systemd: stop as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        engine.run()
    except KeyboardInterrupt:
        print("\nstopped")
    finally:
        # every open answer ends with a last event saying why (never a cut stream), then the server closes;
        # a second Ctrl-C meanwhile leaves at once, without a traceback
        try:
            engine.close()
            server.shutdown()
            deadline = time.time() + 5
            while server.open_answers and time.time() < deadline:
                time.sleep(0.05)
        except KeyboardInterrupt:
            print("stopped at once")
        server.server_close()


if __name__ == "__main__":
    main()
