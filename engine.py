"""
Decoding, in one place: the KV cache, the sampler, generate() for a batch of prompts (sample.py,
evaluate.py, bench.py), the Engine that decodes many requests at once (serve.py), and the streaming of
tokens as text. model.py computes the forward pass (with a prompt prefilled into a cache); this file
decides what comes next and when to stop.

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
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def decoding_attention():
    """Decoding's attention kernels: not cuDNN's, which builds a plan for every new shape (and decoding's grow a token a
    step), a cost that dominated GPU decoding (docs/gpu.md). Training's fixed shapes keep it."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def new_cache(model, batch_size, max_seq_len, device, dtype):
    """Empty key/value buffers, one (k, v) pair per layer, each (batch_size, max_seq_len, kv heads, head dim)."""
    a = model.args
    shape = (batch_size, max_seq_len, a.n_kv_heads or a.n_heads, a.dim // a.n_heads)
    return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(a.n_layers)]


def decode_step(model, token, position, cache):
    """The logits (B, 1, V) after token (B, 1) at position (0-d), attending over the whole cache with a mask: every
    call has the same shapes, so torch.compile makes one graph of it (compiled_step)."""
    B, S = token.shape[0], cache[0][0].shape[1]
    mask = (torch.arange(S, device=token.device) <= position)[None, None, None, :].expand(B, 1, 1, S)
    logits, _ = model(token, cache=cache, start_pos=position.expand(B), attn_mask=mask)
    return logits


def compiled_step(model, backend="inductor"):
    """decode_step for this model, compiled: generate()'s step argument."""
    return torch.compile(lambda token, position, cache: decode_step(model, token, position, cache), backend=backend)


def penalize_repeats(logits, seen, penalty):
    """logits (B, V) with every token already in seen (B, T) made less likely (CTRL's rule: a positive logit
    divided by penalty, a negative one multiplied), in place; penalty 1.0 changes nothing."""
    if penalty != 1.0:
        picked = torch.gather(logits, 1, seen)
        logits.scatter_(1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))
    return logits


def sample_next(logits, temperature, top_k=None, top_p=None, generator=None):
    """One token per row from (B, V) logits: greedy at temperature 0, else top-k/top-p filtered sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # the largest logit becomes 0 before the division: no temperature, however small, can overflow it to
    # inf (and softmax to NaN); the rest can only go to -inf, a probability of 0
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token once the tokens more likely than it already cover top_p
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


@torch.inference_mode()
def generate(model, tokens, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
             stop_tokens=(), use_cache=True, step=None, why=None):
    """
    Yields each row's next token, a (B,) tensor, until max_new_tokens, a full context, or every row has yielded one
    of stop_tokens. tokens: (B, T) prompt; temperature 0 is greedy. use_cache: each step feeds only the newest token
    (else it recomputes the sequence); step: a compiled_step for the steps after the prompt. why: a list that
    receives each row's reason for stopping: "stop", "length" (max_new_tokens) or "context".
    """
    B, T = tokens.shape
    max_seq_len = model.args.max_seq_len
    if T > max_seq_len:
        raise ValueError(f"prompt of {T} tokens is longer than the context ({max_seq_len})")
    steps = min(max_new_tokens, max_seq_len - T)
    cache = None
    if use_cache:
        dtype = model.tok_embeddings.weight.dtype
        if torch.is_autocast_enabled(tokens.device.type):
            dtype = torch.get_autocast_dtype(tokens.device.type)
        # a compiled step cannot write into inference tensors: its cache and inputs are made outside inference mode
        with torch.inference_mode(step is None):
            cache = new_cache(model, B, max_seq_len if step is not None else T + steps, tokens.device, dtype)
    seq = tokens
    done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=tokens.device)
    for i in range(steps):
        with decoding_attention():
            if cache is None:
                logits, _ = model(seq)
            elif i == 0:
                logits, _ = model(seq, cache=cache, start_pos=0)
            elif step is not None:
                with torch.inference_mode(False), torch.no_grad():
                    logits = step(seq[:, -1:].clone(), torch.tensor(seq.shape[1] - 1, device=seq.device), cache)
            else:
                logits, _ = model(seq[:, -1:], cache=cache, start_pos=seq.shape[1] - 1)
        logits = penalize_repeats(logits[:, -1, :].float(), seq, repetition_penalty)  # (B, V)
        next_token = sample_next(logits, temperature, top_k, top_p)  # (B,)
        seq = torch.cat((seq, next_token[:, None]), dim=1)
        yield next_token
        done |= torch.isin(next_token, stop)
        if done.all():
            break
    if why is not None:
        why[:] = ["stop" if d else "length" if steps == max_new_tokens else "context" for d in done.tolist()]


class TextStreamer:
    """
    Generated ids as text as they arrive: a character spread over byte-fallback tokens comes out once complete (never
    a replacement character), and the pieces join up to tok.decode(prompt + generated)[len(decode(prompt)):]
    exactly; tok.decode(generated) with no prompt ids (a chat answer, which the template encodes on its own).
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
    One generation: prompt ids, settings, and the queue of its results: ("token", id) per new token, then ("end",
    "stop" | "length" | "cancelled" | "error" (this request alone failed) | "shutdown"). A seeded request samples
    on the CPU with its own generator: the same seed gives the same answer on any device.
    """

    def __init__(self, ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=None, stop_tokens=(), top_k=None,
                 repetition_penalty=1.0):
        self.ids, self.max_new_tokens, self.temperature, self.top_p = list(ids), max_new_tokens, temperature, top_p
        self.top_k, self.repetition_penalty = top_k, repetition_penalty
        self.stop_tokens = set(stop_tokens)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.out = queue.Queue()
        self.generated, self.position = 0, 0  # tokens generated so far; where the next one goes in the cache
        self.last, self.finish = None, None   # the newest token; why the request ended, once it has
        self.answer = []                      # the tokens generated, kept where the repetition penalty needs them
        self.cancelled = threading.Event()

    def cancel(self):
        """The client is gone: the engine frees the request's row before its next step."""
        self.cancelled.set()


class Engine:
    """background: the scheduler in a thread of its own. serve.py runs it in the main thread (run()): PyTorch's CPU
    kernels ran at half speed from a second thread (docs/serve.md)."""

    def __init__(self, model, slots, max_queue=64, background=True):
        self.model, self.slots, self.max_queue = model.eval(), slots, max_queue
        weight = model.tok_embeddings.weight
        self.max_seq_len = model.args.max_seq_len
        self.cache = new_cache(model, slots, self.max_seq_len, weight.device, weight.dtype)
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
            self.step()

    @torch.inference_mode()
    def step(self):
        """One turn of the scheduler: waiting requests into free rows (each prefilled), then one token for
        every active request; finished requests end and free their rows."""
        with self.wake:
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
            if request.repetition_penalty != 1.0:  # over the prompt and the answer so far, as generate() does
                seen = torch.tensor([request.ids + request.answer], device=logits.device)
                logits = penalize_repeats(logits[None].clone(), seen, request.repetition_penalty)[0]
            token = int(sample_next(logits[None], request.temperature, request.top_k, request.top_p,
                                    request.generator)[0])
        except Exception as e:  # this request's own sampling failed: it ends, the others go on
            request.finish = "error"
            print(f"engine: sampling failed ({type(e).__name__}: {e}); its request was ended")
            return
        if token in request.stop_tokens:
            request.finish = "stop"
            return
        request.out.put(("token", token))
        request.last, request.generated = token, request.generated + 1
        if request.repetition_penalty != 1.0:
            request.answer.append(token)
        if request.generated >= request.max_new_tokens or request.position + 1 >= self.max_seq_len:
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


def complete(model, requests, slots):
    """Each request's (generated tokens, finish reason), run to its end in this thread on `slots` rows with serve.py's
    scheduler and sampling: a seeded request gets the server's answer. The model is left in eval mode."""
    engine = Engine(model, max(1, min(slots, len(requests))), max_queue=len(requests), background=False)
    for request in requests:
        engine.submit(request)
    while any(engine.busy()):
        engine.step()
    results = []
    for request in requests:
        tokens = []
        while True:
            kind, value = request.out.get_nowait()
            if kind == "end":
                results.append((tokens, value))
                break
            tokens.append(value)
    return results
