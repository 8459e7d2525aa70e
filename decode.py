"""decode: evalmath's decoder. A static KV cache with slots, continuous batching, a fixed-shape decode step.

    outs = decode.generate(model, prompts, max_new_tokens=512, eos_ids=[2], slots=64)  # list[GenerationOutput]

Read top to bottom:
  1. StaticCache   - K/V buffers [layers, slots, kv_heads, max_len, head_dim], allocated once per call, never
                     reallocated; a slot holds one sequence from position 0; `lens` [slots] (on the device) is the
                     position of each slot's next token
  2. cache views   - what the model's layers call (model.CacheView): Prefill writes a right-padded group of
                     prompts into chosen slots (plain causal attention over the prompts); Step writes one token per
                     slot at `lens` and attends over the slot's cache with a length mask. Step folds the query
                     heads of a KV head into the query length ([b, H, 1, D] -> [b, H_kv, H/H_kv, D]): no K/V copy,
                     no enable_gqa, so CUDA's mem-efficient kernel takes the mask
  3. sampling      - greedy argmax, or temperature/top-p by an exponential race, on the device (no host sync)
  4. stop rules    - EOS ids as a device table; stop strings are decoded on the host only for rows whose new
                     tokens include one that could end a stop string (a device table of candidate tokens)
  5. Engine        - slots refilled from a length-sorted queue as rows end; the bookkeeping stays on the device
                     and the host looks every `sync_every` steps; the step is CUDA-graph captured (or
                     torch.compile'd) per slot bucket and length bucket; when the queue is empty, rows are moved
                     down into a smaller slot bucket
  6. slot count    - `pick_slots`: a number, or "auto" (free accelerator memory, --max_batch_tokens, 16 on CPU)

Greedy tokens equal transformers' greedy `generate` and do not depend on the slot count (tests/test_decode.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import Transformer, linear

LEN_ALIGN = 64  # max_len is rounded up to a multiple of this (aligned mask rows for the fused CUDA kernels)
CPU_SLOTS = 16  # "auto" on CPU
MAX_AUTO_SLOTS = 512  # "auto" on GPU: beyond this a step is compute-bound and the tail of an evaluation idles
RUNNING, EOS, LENGTH, STOP = 0, 1, 2, 3
REASONS = {EOS: "eos", LENGTH: "length", STOP: "stop"}


class DecodeLimitError(ValueError):
    """The prompts do not fit the cache limits (sliding window, --max_batch_tokens)."""


# --------------------------------------------------------------------------------------------------------------
# 1. the cache


class StaticCache:
    def __init__(self, model: Transformer, slots: int, max_len: int, device, dtype):
        a = model.args
        shape = (a.num_hidden_layers, slots, a.num_key_value_heads, max_len, a.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)
        self.slots, self.max_len = slots, max_len


def bytes_per_position(model: Transformer, dtype: torch.dtype) -> int:
    a = model.args
    return 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * torch.finfo(dtype).bits // 8


def cache_len(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> int:
    """Positions one slot needs (longest prompt + max_new_tokens), rounded up to LEN_ALIGN within the limits."""
    need = max(len(p) for p in prompts) + max_new_tokens
    window = model.args.sliding_window
    if window and need > window:
        raise DecodeLimitError(f"the longest prompt ({need - max_new_tokens} tokens) + max_new_tokens "
                         f"({max_new_tokens}) = {need} positions exceeds the model's sliding_window {window}; "
                         "lower --max_new_tokens (sliding-window attention is not implemented)")
    aligned = -(-need // LEN_ALIGN) * LEN_ALIGN
    return min(aligned, window) if window else aligned


# --------------------------------------------------------------------------------------------------------------
# 2. cache views (model.CacheView)


@dataclass
class Prefill:
    """G prompts, right-padded to P, into `slots`: K/V go to positions [0, P) (padding positions are masked
    later by `lens` and overwritten by decode steps); attention is causal over the prompt itself."""

    cache: StaticCache
    slots: torch.Tensor  # [G]

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def attend(self, layer: int, q, k, v):
        P = k.shape[2]
        self.cache.k[layer, self.slots, :, :P] = k
        self.cache.v[layer, self.slots, :, :P] = v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@dataclass
class Step:
    """One new token for each of the first b slots, written at `lens`; attention over positions [0, kv_len)
    where `mask` [b, 1, 1, kv_len] keeps positions <= lens."""

    cache: StaticCache
    rows: torch.Tensor  # arange(b)
    lens: torch.Tensor  # [b]
    mask: torch.Tensor  # [b, 1, 1, kv_len] bool
    kv_len: int

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def attend(self, layer: int, q, k, v):
        b, H, _, D = q.shape
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self.rows, :, self.lens] = k[:, :, 0]
        vc[self.rows, :, self.lens] = v[:, :, 0]
        h_kv = kc.shape[1]
        qg = q.reshape(b, h_kv, H // h_kv, D)  # query head h reads KV head h // (H / H_kv), as repeat_interleave
        y = F.scaled_dot_product_attention(qg, kc[:b, :, :self.kv_len], vc[:b, :, :self.kv_len], attn_mask=self.mask)
        return y.reshape(b, H, 1, D)


def step_logits(model: Transformer, cache: StaticCache, tokens: torch.Tensor, rows: torch.Tensor, kv_len: int):
    """Logits [b, V] of one decode step over the first b = len(rows) slots (tokens [>= b] are their inputs)."""
    b = rows.shape[0]
    lens = cache.lens[:b]
    mask = (torch.arange(kv_len, device=lens.device) <= lens[:, None])[:, None, None]
    view = Step(cache, rows, lens, mask, kv_len)
    return model(tokens[:b, None], position_ids=lens[:, None], cache=view)[:, 0]


# --------------------------------------------------------------------------------------------------------------
# 3. sampling


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """logits [B, V] -> [B] on the device. temperature 0 is greedy; else softmax(logits / T) cut to the top_p
    nucleus, sampled as argmax(p / E) with E ~ Exp(1) (the exponential race: no host sync, unlike multinomial)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1)


# --------------------------------------------------------------------------------------------------------------
# 4. stop rules


@dataclass
class StopRule:
    """A row stops after a token when `hit(tokens_so_far)`; `hit` is only asked after tokens marked in
    `could_end` (bool [V]): the others cannot complete a stop string."""

    could_end: torch.Tensor
    hit: Callable[[list[int]], bool]


def stop_strings_rule(tokenizer, stop_strings: Iterable[str], vocab_size: int) -> StopRule | None:
    """Stop strings as a StopRule: `hit` looks for them in the decoded tail of the row (special tokens kept).
    A token could end one when its vocabulary piece holds a stop string's last character (printable ASCII maps
    to itself in byte-level and SentencePiece vocabularies), or is a byte-fallback piece (<0x..>). A stop
    string ending in whitespace or a non-ASCII character makes every token a candidate."""
    stops = tuple(s for s in stop_strings if s)
    if not stops:
        return None
    window = max(len(s) for s in stops) + 3  # each token decodes to >= 1 character (a few bytes: less)

    def hit(tokens: list[int]) -> bool:
        tail = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
        return any(s in tail for s in stops)

    lasts = {s[-1] for s in stops}
    if any(not (c.isascii() and c.isprintable()) or c.isspace() for c in lasts):
        return StopRule(torch.ones(vocab_size, dtype=torch.bool), hit)
    n = min(vocab_size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    could = [p is not None and (p.startswith("<0x") or any(c in p for c in lasts)) for p in pieces]
    return StopRule(torch.tensor(could + [False] * (vocab_size - n), dtype=torch.bool), hit)


# --------------------------------------------------------------------------------------------------------------
# 5. the engine


@dataclass
class GenerationOutput:
    tokens: list[int]  # generated ids, prompt excluded, the stopping EOS excluded
    finish_reason: str  # "eos" | "stop" (the stop rule hit; that token is kept) | "length" (max_new_tokens)


class Engine:
    """Continuous batching over `slots` rows of a StaticCache of `max_len` positions.

    graphs: capture the decode step with torch.cuda.CUDAGraph, one graph per slot bucket (default on CUDA).
    compile: torch.compile the step instead ("reduce-overhead" on CUDA, the default mode elsewhere).
    fixed: fixed shapes (implied by graphs and compile): the step runs over a slot bucket (powers of two >= 8,
    and `slots`) and attends over a length bucket (quarters of max_len) that covers every running row: one
    graph per (slot bucket, length bucket); else it runs over exactly the slots in use and attends over the
    positions in use. sync_every: steps between host looks at the device state (1 on CPU, 8 on
    CUDA)."""

    def __init__(self, model: Transformer, slots: int, max_len: int, max_new_tokens: int, eos_ids: Iterable[int],
                 *, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 stop: StopRule | None = None, pad_id: int = 0, graphs: bool | None = None, compile: bool = False,
                 fixed: bool = False, sync_every: int | None = None):
        emb = model.model.embed_tokens.weight
        self.device, V = emb.device, model.args.vocab_size
        cuda = self.device.type == "cuda"
        self.model, self.slots, self.max_len, self.max_new = model, slots, max_len, max_new_tokens
        self.temperature, self.top_p, self.generator, self.pad_id = temperature, top_p, generator, pad_id
        self.compile = compile
        self.graphs = (cuda and not compile) if graphs is None else graphs
        if self.graphs and not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.fixed = self.graphs or compile or fixed
        self.sync_every = sync_every or (8 if cuda else 1)
        self.cache = StaticCache(model, slots, max_len, self.device, emb.dtype)
        dev = dict(device=self.device)
        self.arange = torch.arange(slots, **dev)
        self.tokens = torch.full((slots,), pad_id, dtype=torch.long, **dev)  # each slot's next input token
        self.active = torch.zeros(slots, dtype=torch.bool, **dev)
        self.n_gen = torch.zeros(slots, dtype=torch.long, **dev)
        self.maybe_stop = torch.zeros(slots, dtype=torch.bool, **dev)
        self.out = torch.zeros(slots, max(0, max_new_tokens) + 1, dtype=torch.long, **dev)
        self.eos_table = torch.zeros(V, dtype=torch.bool, **dev)
        eos = [e for e in set(int(e) for e in eos_ids) if 0 <= e < V]
        self.eos_table[eos] = True
        self.stop = stop
        self.stop_table = (stop.could_end if stop else torch.zeros(V, dtype=torch.bool)).to(self.device)
        self.could_end = self.stop_table.tolist() if stop else None
        self.buckets = sorted({slots} | {2 ** k for k in range(3, max(3, math.ceil(math.log2(slots))))})
        quarter = [-(-(max_len * i // 4) // LEN_ALIGN) * LEN_ALIGN for i in (1, 2, 3, 4)]
        self.kv_buckets = sorted({min(max_len, max(LEN_ALIGN, n)) for n in quarter})
        self.steppers: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}
        self.steps = 0

    # ---- device bookkeeping ----
    def _record(self, idx, nxt: torch.Tensor, fed: torch.Tensor) -> None:
        """Slots `idx` (a slice or index tensor) sampled `nxt`; `fed` marks those whose token counts. A token
        is written at n_gen whether it counts or not (out has max_new + 1 columns): only counted ones advance
        n_gen. A row that ended has n_gen == max_new (length) or < max_new (EOS)."""
        keep = fed & ~self.eos_table[nxt]
        n_gen = self.n_gen[idx]
        self.out[self.arange[idx], n_gen] = nxt
        n_gen = n_gen + keep
        self.n_gen[idx] = n_gen
        self.active[idx] = keep & (n_gen < self.max_new)
        self.tokens[idx] = nxt
        if self.stop is not None:
            self.maybe_stop[idx] |= keep & self.stop_table[nxt]

    def _stepper(self, b: int, L: int) -> Callable[[], torch.Tensor] | None:
        """The decode step over the first b slots attending over L positions: compiled, a replayed CUDA graph,
        or None (eager)."""
        if (b, L) in self.steppers:
            return self.steppers[(b, L)]
        rows = self.arange[:b]

        def step():
            return step_logits(self.model, self.cache, self.tokens, rows, L)

        if self.compile:
            if self.device.type == "cuda":
                for t in (self.cache.k, self.cache.v, self.cache.lens, self.tokens):
                    torch._dynamo.mark_static_address(t)
            fn = torch.compile(step, mode="reduce-overhead" if self.device.type == "cuda" else None, dynamic=False)
        elif self.graphs:
            fn = _capture(step)
        else:
            fn = None
        if fn is not None:
            self.steppers[(b, L)] = fn
        return fn

    def step(self, b: int, kv_len: int) -> None:
        """One decode step over the first b slots attending over positions [0, kv_len)."""
        fn = self._stepper(b, kv_len)
        logits = fn() if fn is not None else step_logits(self.model, self.cache, self.tokens, self.arange[:b], kv_len)
        nxt = sample(logits, self.temperature, self.top_p, self.generator)
        fed = self.active[:b].clone()
        self.cache.lens[:b] += fed
        self._record(slice(0, b), nxt, fed)
        self.steps += 1

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> None:
        G, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((G, P), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        idx = torch.tensor(slots, device=self.device)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        pos = torch.arange(P, device=self.device).expand(G, P)
        h = self.model(ids.to(self.device), position_ids=pos, cache=Prefill(self.cache, idx), return_hidden=True)
        logits = linear(self.model.lm_head, h[torch.arange(G, device=self.device), lens - 1])
        self.cache.lens[idx] = lens
        self.n_gen[idx] = 0
        self.maybe_stop[idx] = False
        self._record(idx, sample(logits, self.temperature, self.top_p, self.generator),
                     torch.ones(G, dtype=torch.bool, device=self.device))

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copies slots src -> dst (cache rows and state); src slots become empty."""
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        self.cache.k[:, d] = self.cache.k[:, s]
        self.cache.v[:, d] = self.cache.v[:, s]
        for t in (self.cache.lens, self.tokens, self.active, self.n_gen, self.maybe_stop, self.out):
            t[d] = t[s]
        self.active[s] = False

    # ---- the loop ----
    def run(self, prompts: list[list[int]], progress: Callable[[int, int, int], None] | None = None,
            should_abort: Callable[[], bool] | None = None, prefill_tokens: int | None = None
            ) -> list[GenerationOutput | None]:
        """Generates for every prompt (longest first); returns outputs in prompt order. When should_abort()
        turns True (asked at every host look), returns at once: None for prompts not finished.
        progress(done, total, generated_tokens) is called at every host look. Free slots are refilled once
        slots/16 of them are free (prefills of up to `prefill_tokens` padded tokens per group)."""
        n = len(prompts)
        outs: list[GenerationOutput | None] = [None] * n
        if self.max_new <= 0:
            return [GenerationOutput([], "length") for _ in prompts]
        queue = sorted(range(n), key=lambda i: -len(prompts[i]))[::-1]  # pop() gives the longest first
        budget = prefill_tokens or (16384 if self.device.type == "cuda" else 4096)
        refill_at = max(1, self.slots // 16)  # free slots that trigger a refill: prefills in groups, not one by one
        slot_of: list[int | None] = [None] * self.slots  # slot -> prompt index
        start = [0] * self.slots  # a slot's next position is at most start + self.steps (host side, for kv_len)
        checked = [0] * self.slots  # tokens of the slot's row already looked at by the stop rule
        done_tokens = 0

        def refill():
            free = [s for s in range(self.slots) if slot_of[s] is None]
            pairs = [(s, queue.pop()) for s in free[:len(queue)]]  # longest prompts first, lowest slots first
            for s, i in pairs:
                slot_of[s], start[s], checked[s] = i, len(prompts[i]) - self.steps, 0
            g = 0
            for k in range(1, len(pairs) + 1):  # groups of at most `budget` padded tokens (the first is longest)
                if k == len(pairs) or (k + 1 - g) * len(prompts[pairs[g][1]]) > budget:
                    self.prefill([s for s, _ in pairs[g:k]], [prompts[i] for _, i in pairs[g:k]])
                    g = k

        refill()
        while any(s is not None for s in slot_of):
            b = self._bucket(max(s for s in range(self.slots) if slot_of[s] is not None) + 1)
            top = max(start[s] for s in range(b) if slot_of[s] is not None) + self.steps  # furthest next position
            for i in range(self.sync_every):
                need = min(self.max_len, top + i + 1)
                self.step(b, next(L for L in self.kv_buckets if L >= need) if self.fixed else need)
            done_tokens += self._look(outs, slot_of, checked)
            n_free = sum(s is None for s in slot_of)
            if queue and (n_free >= refill_at or n_free == self.slots):
                refill()
            else:
                self._compact(slot_of, start, checked)
            if progress is not None:
                running = [s for s in range(self.slots) if slot_of[s] is not None]
                live = int(self.n_gen[running].sum()) if running else 0
                progress(sum(o is not None for o in outs), n, done_tokens + live)
            if should_abort is not None and should_abort():
                break
        return outs

    def _look(self, outs, slot_of, checked) -> int:
        """The host look: rows that ended (or may have hit a stop string) are read back and finished; frees
        their slots. Returns the number of tokens of the finished rows."""
        flags = torch.stack([self.active, self.maybe_stop]).tolist()
        running = [s for s in range(self.slots) if slot_of[s] is not None]
        look = [s for s in running if not flags[0][s] or flags[1][s]]
        if not look:
            return 0
        idx = torch.tensor(look, device=self.device)
        rows = torch.cat([self.n_gen[idx, None], self.out[idx]], 1).tolist()
        self.maybe_stop[idx] = False
        finished, stopped, n_tok = [], [], 0
        for s, (n, *toks) in zip(look, rows):
            toks = toks[:n]
            reason = RUNNING if flags[0][s] else LENGTH if n >= self.max_new else EOS
            if flags[1][s] and self.stop is not None:
                j = next((j for j in range(checked[s], n) if self.could_end[toks[j]] and self.stop.hit(toks[:j + 1])),
                         None)
                checked[s] = n
                if j is not None:
                    toks, reason = toks[:j + 1], STOP
                    stopped.append(s)
            if reason != RUNNING:
                outs[slot_of[s]] = GenerationOutput(toks, REASONS[reason])
                finished.append(s)
                n_tok += len(toks)
        if stopped:
            self.active[torch.tensor(stopped, device=self.device)] = False
        for s in finished:
            slot_of[s] = None
        return n_tok

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n) if self.fixed else n

    def _compact(self, slot_of, start, checked) -> None:
        """With no prompt waiting: moves running rows down so the step runs over a smaller bucket."""
        running = [s for s in range(self.slots) if slot_of[s] is not None]
        if not running:
            return
        b = self._bucket(len(running))
        src = [s for s in running if s >= b]
        if not src:
            return
        dst = [s for s in range(b) if slot_of[s] is None][:len(src)]
        self.move(src, dst)
        for s, d in zip(src, dst):
            slot_of[d], start[d], checked[d] = slot_of[s], start[s], checked[s]
            slot_of[s] = None


def _capture(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A CUDA graph of `step` (static inputs: the cache, tokens and lens tensors, updated in place); returns
    its replay. The warm-up run writes the same K/V the real step writes, so it changes nothing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out

    return replay


# --------------------------------------------------------------------------------------------------------------
# 6. slot count and the one-call API


def pick_slots(model: Transformer, max_len: int, n_prompts: int, batch_size: int | str = "auto",
               max_batch_tokens: int | None = None) -> int:
    """The slot count: batch_size when a number; "auto": max_batch_tokens // max_len when given, else on CUDA
    what 85% of the free memory holds (K/V of max_len positions + logits per slot, 2 GiB kept for prefill),
    capped at MAX_AUTO_SLOTS, else CPU_SLOTS. Never more than the prompts; a budget below one row is an error."""
    if max_batch_tokens is not None and max_batch_tokens < max_len:
        raise DecodeLimitError(f"--max_batch_tokens {max_batch_tokens} is less than one row: the longest prompt + "
                         f"--max_new_tokens need {max_len} cache positions; raise it or lower --max_new_tokens")
    emb = model.model.embed_tokens.weight
    if batch_size != "auto":
        slots = int(batch_size)
    elif max_batch_tokens is not None:
        slots = max_batch_tokens // max_len
    elif emb.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(emb.device)
        per_slot = bytes_per_position(model, emb.dtype) * max_len + 12 * model.args.vocab_size
        slots = min(MAX_AUTO_SLOTS, max(1, int((0.85 * free - 2 * 2**30) // per_slot)))
    else:
        slots = CPU_SLOTS
    if max_batch_tokens is not None:
        slots = min(slots, max_batch_tokens // max_len)
    return max(1, min(slots, n_prompts))


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_ids: Iterable[int], *,
             slots: int | str = "auto", max_batch_tokens: int | None = None, temperature: float = 0.0,
             top_p: float = 1.0, generator: torch.Generator | None = None, stop: StopRule | None = None,
             pad_id: int = 0, graphs: bool | None = None, compile: bool = False, fixed: bool = False,
             sync_every: int | None = None, progress: Callable[[int, int, int], None] | None = None,
             should_abort: Callable[[], bool] | None = None) -> list[GenerationOutput | None]:
    """Decodes every prompt (token ids) with continuous batching; outputs in prompt order. A row ends at an EOS
    id (excluded from tokens), when the stop rule hits (that token kept) or after max_new_tokens. The result
    holds None only for prompts left unfinished because should_abort() turned True."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts")
    max_len = cache_len(model, prompts, max(0, max_new_tokens))
    n_slots = pick_slots(model, max_len, len(prompts), slots, max_batch_tokens)
    engine = Engine(model, n_slots, max_len, max_new_tokens, eos_ids, temperature=temperature, top_p=top_p,
                    generator=generator, stop=stop, pad_id=pad_id, graphs=graphs, compile=compile, fixed=fixed,
                    sync_every=sync_every)
    return engine.run(prompts, progress=progress, should_abort=should_abort)
