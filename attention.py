"""How the decoder attends: the attention plans model.py's Transformer computes once per forward and every layer
shares (plain causal, a boolean padding mask, packed rows per document, varlen, flex).

Packed rows: `doc_ids` [B, T] marks documents (maximal runs of equal ids), or `cu_seqlens` (int32 [N_docs + 1],
the document boundaries over the flattened B*T tokens, padding tails counted as documents) with `max_seqlen`, as
packing.py computes them on the CPU. Attention is causal inside a document and never crosses one. The packed
paths keep q/k/v token-major ([B*T, heads, D], straight from the projections). `attn_impl` chooses the
mechanism (constructor argument, or `model.attn_impl = ...` at any time):
  - "per_doc": split the tokens at the document boundaries and run plain causal SDPA (is_causal=True, the
               flash-style kernel) once per document, then concatenate. Exact, no padding, no mask; one small SDPA
               call per document, so best where a call is cheap (CPU). Its document lengths come from a CPU
               `cu_seqlens` (no host sync) or from `doc_ids` (one sync).
  - "varlen":  one `torch.nn.attention.varlen.varlen_attn` call per layer (FlashAttention's variable-length
               kernel, CUDA only): causal within documents from `cu_seqlens`, GQA without repeating K/V, work
               proportional to sum(len_i^2), no padding, no gather/scatter, no sync when the loader gives
               `cu_seqlens`/`max_seqlen`.
  - "flex":    flex_attention with a document-causal block mask built once per forward (compiled once per
               process on CUDA with dynamic=False; eager on CPU, where it is inference only: no backward on
               CPU in torch 2.13).
  - "auto":    "per_doc" on CPU (measured: scripts/bench_model.py, docs/benchmarks.md); on CUDA "varlen" when
               this torch has it, else "flex". varlen is the CUDA default because it needs neither a mask nor
               torch.compile and computes exactly the documents' causal triangles, while flex works in 128 x 128
               tiles (every tile crossing a document boundary is computed and masked) and needs a block mask
               per batch; scripts/bench_gpu_train.py --attn_impl compares the two on a GPU.
Without doc_ids/cu_seqlens the model runs plain causal SDPA (`is_causal=True`), whatever attn_impl says.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("auto", "per_doc", "varlen", "flex")
PACKED_PLANS = ("per_doc", "varlen", "flex")  # plans that take token-major q/k/v [B, T, heads, D]


@dataclass
class AttnPlan:
    kind: str  # "causal" | "mask" | "per_doc" | "varlen" | "flex" | "cache" (the cache attends)
    mask: torch.Tensor | None = None  # "mask": bool [B, 1, T, S], True = attend
    doc_lens: list[int] | None = None  # "per_doc": document lengths over the flattened B*T tokens
    cu_seqlens: torch.Tensor | None = None  # "varlen": int32 [N_docs + 1] on the device
    max_seqlen: int = 0  # "varlen": the longest document
    block_mask: object = None  # "flex": a BlockMask


def make_attn_plan(impl: str, T: int, doc_ids, key_padding_mask, cu_seqlens=None, max_seqlen=None,
                   B: int = 1) -> AttnPlan:
    if key_padding_mask is not None:
        valid = key_padding_mask.bool()
        i = torch.arange(T, device=valid.device)
        causal = i[:, None] >= i[None, :]
        mask = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device)
        return AttnPlan("mask", mask=mask[:, None])
    if doc_ids is None and cu_seqlens is None:
        return AttnPlan("causal")
    return packed_attn_plan(impl, B, T, doc_ids, cu_seqlens, max_seqlen)


def packed_attn_plan(impl: str, B: int, T: int, doc_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                     max_seqlen: int | torch.Tensor | None) -> AttnPlan:
    """Packed rows: the plan every layer of one forward shares. No host sync when packing.py's cu_seqlens
    (and max_seqlen) are given; from doc_ids alone it costs one."""
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        seg = segment_ids(doc_ids) if doc_ids is not None else doc_index(cu_seqlens, B * T).view(B, T)

        def doc_causal(b, h, q, kv):
            return (seg[b, q] == seg[b, kv]) & (q >= kv)

        on_cuda = seg.device.type == "cuda"
        return AttnPlan("flex", block_mask=create_block_mask(doc_causal, B, None, T, T, device=seg.device,
                                                             _compile=on_cuda))
    if cu_seqlens is None:
        cu_seqlens = cu_seqlens_from_doc_ids(doc_ids)
        max_seqlen = None
    if impl == "per_doc":
        return AttnPlan("per_doc", doc_lens=cu_seqlens.cpu().diff().tolist())
    if impl == "varlen":
        if max_seqlen is None:
            max_seqlen = cu_seqlens.diff().max()
        return AttnPlan("varlen", cu_seqlens=cu_seqlens.to(torch.int32), max_seqlen=int(max_seqlen))
    raise ValueError(f"attn_impl={impl!r}; expected one of {ATTN_IMPLS}")


def segment_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """A distinct id for every maximal run of equal doc ids, numbered across the whole batch."""
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return start.flatten().long().cumsum(0).view_as(doc_ids) - 1


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """int32 [N_docs + 1]: where each document (run of equal ids, never across rows) starts in the flattened
    tokens, then the token count. One host sync (nonzero); packing.py computes it on the CPU instead."""
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = start.flatten().nonzero().squeeze(1)
    return torch.cat([starts, starts.new_tensor([doc_ids.numel()])]).to(torch.int32)


def doc_index(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """[n]: the document of each flattened token, from cu_seqlens (no host sync)."""
    tokens = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.bucketize(tokens, cu_seqlens[1:], right=True)


def varlen_available() -> bool:
    """Whether this torch has torch.nn.attention.varlen (2.10+) and a CUDA device to run it."""
    return torch.cuda.is_available() and _varlen_fn() is not None


_VARLEN: list = []  # [(varlen_attn, its causal/GQA keyword arguments)] or [None], filled on first use


def _varlen_fn():
    """varlen_attn with the keywords this torch spells causal attention and GQA with: window_size=(-1, 0)
    (2.11+) and/or is_causal=True (2.10), enable_gqa=True where it exists (without it the FlashAttention kernel
    takes fewer K/V heads as they are)."""
    if not _VARLEN:
        try:
            import inspect

            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN.append(None)
        else:
            params = inspect.signature(varlen_attn).parameters
            wanted = {"window_size": (-1, 0), "is_causal": True, "enable_gqa": True}
            kw = {k: v for k, v in wanted.items() if k in params}
            causal = "window_size" in kw or "is_causal" in kw  # else this torch cannot mask causally: unavailable
            _VARLEN.append((varlen_attn, kw) if causal else None)
    return _VARLEN[0]


_compiled_flex = None


def _flex(q, k, v, block_mask):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":  # eager on CPU: inference only, and slow; used by the tests as a reference
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    if _compiled_flex is None:  # compiled once per process (torchtitan keeps it as a class variable)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def attend(q, k, v, plan: AttnPlan) -> torch.Tensor:
    """Unpacked: q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, D]."""
    if plan.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if plan.kind == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, enable_gqa=True)
    raise ValueError(f"attend: plan {plan.kind!r} is a packed plan (attend_packed)")


def attend_packed(q, k, v, plan: AttnPlan) -> torch.Tensor:
    """Packed rows, token-major: q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]."""
    B, T, H, D = q.shape
    if plan.kind == "varlen":
        if q.dtype not in (torch.float16, torch.bfloat16) or _varlen_fn() is None:
            raise ValueError(f"attn_impl='varlen' needs torch>=2.10 on CUDA and bf16/fp16 activations (got {q.dtype} "
                             f"on {q.device}); use attn_impl='flex' or 'auto'")
        fn, kw = _varlen_fn()
        cu, m = plan.cu_seqlens, plan.max_seqlen
        y = fn(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), cu, cu, m, m, **kw)
        return y.view(B, T, H, D)
    if plan.kind == "flex":
        y = _flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan.block_mask)
        return y.transpose(1, 2)
    if plan.kind == "per_doc":  # split (one cheap SplitBackward) -> causal SDPA per document -> cat
        lens = plan.doc_lens
        docs = zip(q.reshape(B * T, H, D).split(lens), k.reshape(B * T, -1, D).split(lens),
                   v.reshape(B * T, -1, D).split(lens))
        ys = [F.scaled_dot_product_attention(a.transpose(0, 1)[None], b.transpose(0, 1)[None],
                                             c.transpose(0, 1)[None], is_causal=True, enable_gqa=True)[0]
              for a, b, c in docs]
        return torch.cat([y.transpose(0, 1) for y in ys]).view(B, T, H, D)
    raise ValueError(f"attend_packed: plan {plan.kind!r} is not a packed plan")
