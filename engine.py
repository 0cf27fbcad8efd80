"""
Decoding for many requests at once (serve.py), and the streaming of tokens as text (serve.py,
sample.py).

One scheduler thread owns the model and a KV cache of `slots` rows. A submitted request waits in a
bounded queue; when a row is free its prompt is prefilled into that row (its first token comes out
right away), and from then on every decode step advances all active requests by one token in a
single forward pass, each row at its own position. A request that finishes, or whose client went
away (cancel()), frees its row at once: the last active row moves into it, so the active requests
always fill rows 0..n-1 and no step computes an idle row. Greedy output does not depend on which
other requests share the steps (tests/test_serve.py holds it to that).
"""
import collections
import queue
import threading

import torch

from model import decoding_attention, sample_next


class TextStreamer:
    """
    Turns generated ids into text as they arrive. A character whose UTF-8 bytes are spread over several
    byte-fallback tokens is emitted once complete, never as a replacement character in between, and
    everything emitted joins up to exactly tok.decode(prompt + generated)[len(decode(prompt)):]. With no
    prompt ids (a chat answer, which the template encodes on its own), that is tok.decode(generated).
    """

    def __init__(self, tok, prompt_ids=()):
        self.tok, self.ids = tok, list(prompt_ids)
        self.printed = len(tok.decode(self.ids))

    def put(self, token_id):
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        stable = len(text.rstrip("\ufffd"))  # a trailing U+FFFD may be a character still arriving
        new, self.printed = text[self.printed:stable], max(self.printed, stable)
        return new

    def end(self):
        """Whatever is left once generation stops (an unfinished character stays a U+FFFD)."""
        text = self.tok.decode(self.ids)
        new, self.printed = text[self.printed:], len(text)
        return new


class Request:
    """
    One generation: its prompt ids and settings, and the queue its results go to: ("token", id) for
    each new token, then ("end", finish_reason) with "stop" (a stop token), "length" (max_new_tokens, or
    the context is full), "cancelled", "error" (this request failed; the others go on) or "shutdown".
    A seeded request samples on the CPU with its own generator: the same seed gives the same answer on
    any device, and a CPU generator never meets GPU logits.
    """

    def __init__(self, ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=None, stop_tokens=()):
        self.ids, self.max_new_tokens, self.temperature, self.top_p = list(ids), max_new_tokens, temperature, top_p
        self.stop_tokens = set(stop_tokens)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.out = queue.Queue()
        self.generated, self.position = 0, 0  # tokens generated so far; where the next one goes in the cache
        self.last, self.finish = None, None   # the newest token; why the request ended, once it has
        self.cancelled = threading.Event()

    def cancel(self):
        """The client is gone: the engine frees the request's row before its next step."""
        self.cancelled.set()


class Engine:
    """
    background: run the scheduler in a thread of its own. serve.py runs it in the main thread instead
    (run()), because PyTorch's CPU kernels ran at half speed from a second thread here (the OpenMP team
    of a non-main thread: docs/serve.md).
    """

    def __init__(self, model, slots, max_queue=64, background=True):
        self.model, self.slots, self.max_queue = model.eval(), slots, max_queue
        weight = model.tok_embeddings.weight
        self.context = model.args.max_seq_len
        self.cache = model.new_cache(slots, self.context, weight.device, weight.dtype)
        self.waiting, self.active = collections.deque(), []  # active[i] decodes in cache row i
        self.wake = threading.Condition()
        self.closed = False
        if background:
            threading.Thread(target=self.run, daemon=True).start()

    def submit(self, request):
        """Queue a request; False when every slot and the queue are full (the caller answers 503)."""
        with self.wake:
            if self.closed or len(self.active) + len(self.waiting) >= self.slots + self.max_queue:
                return False
            self.waiting.append(request)
            self.wake.notify()
        return True

    def busy(self):
        """(active requests, waiting requests)."""
        with self.wake:
            return len(self.active), len(self.waiting)

    @torch.inference_mode()
    def run(self):
        """The scheduler: admit, prefill, decode, forever."""
        while True:
            with self.wake:
                while not self.waiting and not self.active:
                    # with a timeout: a signal (Ctrl-C, SIGTERM) that the OS hands to another thread is run
                    # by the main thread only when it wakes, and an untimed wait might never wake
                    self.wake.wait(timeout=0.5)
                admitted = []
                while self.waiting and len(self.active) + len(admitted) < self.slots:
                    admitted.append(self.waiting.popleft())
            for request in admitted:
                if request.cancelled.is_set():
                    request.out.put(("end", "cancelled"))
                    continue
                self.active.append(request)
                try:
                    self._prefill(request, len(self.active) - 1)
                except Exception as e:  # this request's own prompt failed: it ends, the others go on
                    request.finish = "error"
                    print(f"engine: a prompt failed ({type(e).__name__}: {e}); its request was ended")
            try:
                self._drop_finished()
                if self.active:
                    self._decode()
                    self._drop_finished()
            except Exception as e:  # a failed forward pass must not take the server down: fail its requests
                for request in self.active:
                    request.out.put(("end", "error"))
                self.active = []
                print(f"engine: a step failed ({type(e).__name__}: {e}); its requests were ended")

    def close(self):
        """End every waiting and active request with "shutdown" and take no more (serve.py on Ctrl-C/SIGTERM)."""
        with self.wake:
            self.closed = True
            for request in list(self.waiting) + list(self.active):
                request.out.put(("end", "shutdown"))
            self.waiting.clear()
            self.active = []

    def _prefill(self, request, row):
        """The prompt into the request's cache row, and its first token."""
        cache = [(k[row:row + 1], v[row:row + 1]) for k, v in self.cache]
        prompt = torch.tensor([request.ids], device=self.cache[0][0].device)
        with decoding_attention():
            logits, _ = self.model(prompt, cache=cache, start_pos=0)
        request.position = len(request.ids)
        self._emit(request, logits[0, -1].float())

    def _decode(self):
        """One token for every active request, in one forward pass over cache rows 0..n-1."""
        n = len(self.active)
        device = self.cache[0][0].device
        tokens = torch.tensor([[r.last] for r in self.active], device=device)           # (n, 1)
        positions = torch.tensor([r.position for r in self.active], device=device)       # (n,)
        span = int(positions.max()) + 1
        attn_mask = (torch.arange(span, device=device)[None, :] <= positions[:, None])[:, None, None, :]
        with decoding_attention():
            logits, _ = self.model(tokens, cache=[(k[:n], v[:n]) for k, v in self.cache], start_pos=positions,
                                   attn_mask=attn_mask)                                   # (n, 1, V)
        for request, row_logits in zip(self.active, logits[:, -1].float()):
            request.position += 1
            self._emit(request, row_logits)

    def _emit(self, request, logits):
        """Sample the request's next token from its logits (V,) and hand it on, or end the request."""
        if request.cancelled.is_set():
            request.finish = "cancelled"
            return
        if request.generator is not None:
            logits = logits.cpu()
        try:
            token = int(sample_next(logits[None], request.temperature, None, request.top_p, request.generator)[0])
        except Exception as e:  # this request's own sampling failed: it ends, the others go on
            request.finish = "error"
            print(f"engine: sampling failed ({type(e).__name__}: {e}); its request was ended")
            return
        if token in request.stop_tokens:
            request.finish = "stop"
            return
        request.out.put(("token", token))
        request.last, request.generated = token, request.generated + 1
        if request.generated >= request.max_new_tokens or request.position + 1 >= self.context:
            request.finish = "length"

    def _drop_finished(self):
        """End the requests that are done or cancelled; the last active row moves into each freed one."""
        row = 0
        while row < len(self.active):
            request = self.active[row]
            if request.cancelled.is_set():
                request.finish = "cancelled"
            if request.finish is None:
                row += 1
                continue
            request.out.put(("end", request.finish))
            last = len(self.active) - 1
            if row != last:
                moved = self.active[last]
                for k, v in self.cache:
                    k[row, :moved.position] = k[last, :moved.position]
                    v[row, :moved.position] = v[last, :moved.position]
                self.active[row] = moved
            self.active.pop()
