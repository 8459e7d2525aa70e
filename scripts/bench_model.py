"""Forward+backward tokens/s: model.py's Transformer vs transformers' model of the same config and weights.

Batches are built from the same random GSM8K-length documents (uniform 150-300 tokens):
  - packed: rows of seq_len tokens holding whole documents (doc_ids, positions restart per document, the tail
    padding is its own document); native with each attn_impl, transformers via position_ids (its packed path:
    no attention_mask, use_cache=False).
  - padded: one document per row, right-padded to the longest; native with key_padding_mask, transformers with
    attention_mask.
  - loop:   native, one document at a time (no padding, no mask: the per-example reference).
tokens/s counts real (non-padding) tokens only, so rows are comparable. Configurations are timed round-robin
(median of --repeats) so that load from other processes hits all of them alike; quote ratios, not absolutes.

    python scripts/bench_model.py [--seq_lens 512 2048] [--tokens 2048] [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402


@dataclass
class Bench:
    seq_lens: tuple[int, ...] = (512, 2048)
    tokens: int = 2048  # tokens per step (rows = tokens // seq_len)
    repeats: int = 3
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 8192
    doc_min: int = 150
    doc_max: int = 300
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    threads: int = 0  # torch.set_num_threads (0: torch's default)


def make_docs(n_tokens: int, lo: int, hi: int, vocab: int, rng: random.Random) -> list[list[int]]:
    docs, total = [], 0
    while total < n_tokens:
        n = rng.randint(lo, hi)
        docs.append([rng.randrange(vocab) for _ in range(n)])
        total += n
    return docs


def pack(docs: list[list[int]], seq_len: int, rows: int):
    """First-fit in the given (random) order into `rows` rows of seq_len; documents that don't fit are dropped."""
    bins: list[list[list[int]]] = [[] for _ in range(rows)]
    used = [0] * rows
    for d in docs:
        r = next((r for r in range(rows) if used[r] + len(d) <= seq_len), None)
        if r is not None:
            bins[r].append(d)
            used[r] += len(d)
    ids = torch.zeros(rows, seq_len, dtype=torch.long)
    doc_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    for r, row in enumerate(bins):
        s = 0
        for j, d in enumerate(row):
            ids[r, s : s + len(d)] = torch.tensor(d)
            doc_ids[r, s : s + len(d)] = j
            s += len(d)
        doc_ids[r, s:] = len(row)  # tail padding: its own document
    packed_docs = [d for row in bins for d in row]
    return ids, doc_ids, packed_docs


def pad(docs: list[list[int]]):
    L = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), L, dtype=torch.long)
    mask = torch.zeros(len(docs), L, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = 1
    return ids, mask


def step(fn, ids, weight):
    """One forward+backward with a token-level loss (labels = inputs; cost is what matters here)."""
    logits = fn()
    loss = (F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none") * weight.flatten()).sum()
    loss.backward()


def cases(cfg: Bench, native: M.Transformer, hf, seq_len: int, docs):
    dev = cfg.device
    rows = max(1, cfg.tokens // seq_len)
    ids, doc_ids, pdocs = pack(docs, seq_len, rows)
    ids, doc_ids = ids.to(dev), doc_ids.to(dev)
    pos = M.positions_from_doc_ids(doc_ids)
    real = sum(len(d) for d in pdocs)
    w_packed = torch.ones_like(ids, dtype=torch.float32)
    pids, pmask = (t.to(dev) for t in pad(pdocs))
    w_pad = pmask.float()
    impls = ["per_doc"] + (["flex"] + (["varlen"] if M.varlen_available() and cfg.dtype != "float32" else [])
                           if dev == "cuda" else [])

    def native_packed(impl):
        def run():
            native.attn_impl = impl
            step(lambda: native(ids, doc_ids=doc_ids), ids, w_packed)
        return run

    def native_loop():
        for d in pdocs:
            x = torch.tensor([d], device=dev)
            step(lambda x=x: native(x), x, torch.ones_like(x, dtype=torch.float32))

    out = {f"native packed {i}": native_packed(i) for i in impls}
    out["HF packed (position_ids)"] = lambda: step(lambda: hf(ids, position_ids=pos, use_cache=False).logits, ids, w_packed)
    out["native padded (key_padding_mask)"] = lambda: step(lambda: native(pids, key_padding_mask=pmask.bool()), pids, w_pad)
    out["HF padded (attention_mask)"] = lambda: step(lambda: hf(pids, attention_mask=pmask, use_cache=False).logits,
                                                      pids, w_pad)
    out["native loop (one doc at a time)"] = native_loop
    return out, real, rows, len(pdocs)


def timeit(fn, dev) -> float:
    t = time.perf_counter()
    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(cfg: Bench) -> None:
    import tempfile

    from transformers import AutoModelForCausalLM

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = M.DTYPES[cfg.dtype]
    with tempfile.TemporaryDirectory() as d:
        args = M.ModelArgs(model_type="llama", vocab_size=cfg.vocab, hidden_size=cfg.hidden,
                           intermediate_size=-(-int(cfg.hidden * 8 / 3) // 64) * 64, num_hidden_layers=cfg.layers,
                           num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, rope_theta=5e5)
        M.Transformer.from_args(args, generator=torch.Generator().manual_seed(cfg.seed)).save_pretrained(d)
        native = M.Transformer.from_pretrained(d, dtype=dtype, device=cfg.device).train()
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa").to(cfg.device).train()
    n_params = sum(p.numel() for p in native.parameters())
    print(f"# Model forward/backward (llama, {n_params / 1e6:.1f}M params, hidden {cfg.hidden}, {cfg.layers} layers, "
          f"{cfg.heads}/{cfg.kv_heads} heads, vocab {cfg.vocab}, {cfg.dtype}, {cfg.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("`" + " ".join(["python"] + sys.argv) + "`\n")
    print("| seq_len | rows | docs | case | real tokens/s | vs HF packed |")
    print("| ---: | ---: | ---: | --- | ---: | ---: |")
    rng = random.Random(cfg.seed)
    for seq_len in cfg.seq_lens:
        docs = make_docs(2 * cfg.tokens, cfg.doc_min, cfg.doc_max, cfg.vocab, rng)
        fns, real, rows, ndocs = cases(cfg, native, hf, seq_len, docs)
        for fn in fns.values():  # warm-up
            fn()
            native.zero_grad(set_to_none=True)
            hf.zero_grad(set_to_none=True)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(cfg.repeats):
            for k, fn in fns.items():
                times[k].append(timeit(fn, cfg.device))
                native.zero_grad(set_to_none=True)
                hf.zero_grad(set_to_none=True)
        tps = {k: real / statistics.median(v) for k, v in times.items()}
        ref = tps["HF packed (position_ids)"]
        for k, v in tps.items():
            print(f"| {seq_len} | {rows} | {ndocs} | {k} | {v:,.0f} | {v / ref:.2f} |")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Bench, use_underscores=True))
