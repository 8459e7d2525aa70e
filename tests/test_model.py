"""model.py against transformers (the reference implementation) on tiny random configs, fp32, CPU."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

import attention
import model as M
from maketiny import make_tiny

V = 160  # vocab of the tiny HF models


def hf_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    if arch == "llama":  # GQA + llama3 rope scaling (short original context so the scaling bites) + attention bias
        return LlamaConfig(**common, attention_bias=True, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if arch == "mistral":  # explicit head_dim != hidden / heads
        return MistralConfig(**common | {"num_key_value_heads": 1}, head_dim=32, rope_theta=1e6, sliding_window=None)
    if arch == "qwen2":  # tied embeddings + hard-coded qkv bias
        return Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    raise ValueError(arch)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """One saved transformers model per architecture, weights re-drawn with a larger std (decisive argmax)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for i, arch in enumerate(["llama", "mistral", "qwen2"]):
        torch.manual_seed(i)
        hf = AutoModelForCausalLM.from_config(hf_config(arch))
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0, 0.15)
        d = tmp_path_factory.mktemp(arch)
        hf.save_pretrained(d)
        out[arch] = d
    return out


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_logits_match_transformers(hf_dirs, arch):
    ours, theirs = M.Transformer.from_pretrained(hf_dirs[arch]), load_hf(hf_dirs[arch])
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff <= 1e-4
    assert set(ours.state_dict()) - {"lm_head.weight"} <= set(theirs.state_dict())
    if arch == "qwen2":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
        assert ours.model.layers[0].self_attn.q_proj.bias is not None
        assert ours.model.layers[0].self_attn.o_proj.bias is None


def test_reads_old_and_new_config_styles(shared):
    q = M.ModelArgs.from_hf_config(json.loads((shared / "models/qwen2.5-0.5b/config.json").read_text()))
    assert (q.model_type, q.rope_theta, q.tie_word_embeddings, q.qkv_bias, q.head_dim, q.dtype) == (
        "qwen2", 1e6, True, True, 64, "bfloat16")
    ll = M.ModelArgs.from_hf_config(json.loads((shared / "models/llama-2-7b/config.json").read_text()))
    assert (ll.num_key_value_heads, ll.rope_theta, ll.rope_scaling, ll.qkv_bias) == (32, 1e4, None, False)
    new = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2, "dtype": "bfloat16",
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")} | {
        "torch_dtype": "bfloat16", "rope_theta": 5e5,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}}
    assert M.ModelArgs.from_hf_config(new) == M.ModelArgs.from_hf_config(old)
    assert M.ModelArgs.from_hf_config(new).rope_scaling["factor"] == 8.0


PACKED_ROWS = [
    [7, 12, 5, 4],  # three documents and a padding tail (its own document)
    [28],  # one document filling the row
    [2, 1, 3, 1, 4, 2, 5, 1, 3, 2, 4],  # many short documents, some of one token
    [9, 19],  # the last document cut at the row end (no padding tail)
]


def packed_example(lens=None):
    """Packed rows of 28 tokens (PACKED_ROWS by default): input ids, doc_ids, document lengths per row."""
    lens = lens or PACKED_ROWS
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (len(lens), 28), generator=g)
    doc_ids = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lens])
    return ids, doc_ids, lens


def cu_seqlens_of(lens):
    """What packing.py gives: document boundaries over the flattened rows, int32, on the CPU."""
    flat = [n for row in lens for n in row]
    return torch.tensor([0, *torch.tensor(flat).cumsum(0).tolist()], dtype=torch.int32), max(flat)


def each_document_alone(m, ids, lens):
    """The exact reference: every document run on its own, plain causal attention -> [B, T, V] logits."""
    out = []
    for b, row in enumerate(lens):
        s, parts = 0, []
        for n in row:
            parts.append(m(ids[b : b + 1, s : s + n])[0])
            s += n
        out.append(torch.cat(parts))
    return torch.stack(out)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("impl,given", [("per_doc", False), ("per_doc", True), ("flex", False), ("flex", True)])
def test_packed_rows_equal_each_document_alone(hf_dirs, impl, given):
    """Forward (flex has no CPU backward): doc_ids alone, or packing.py's cu_seqlens + position_ids."""
    m = M.Transformer.from_pretrained(hf_dirs["llama"], attn_impl=impl)
    ids, doc_ids, lens = packed_example()
    kw = dict(doc_ids=doc_ids)
    if given:
        cu, mx = cu_seqlens_of(lens)
        kw = dict(cu_seqlens=cu, max_seqlen=mx, position_ids=M.positions_from_doc_ids(doc_ids))
    with torch.no_grad():
        assert (m(ids, **kw) - each_document_alone(m, ids, lens)).abs().max().item() <= 1e-5


def test_cu_seqlens_from_doc_ids_and_doc_index():
    ids, doc_ids, lens = packed_example()
    cu, mx = cu_seqlens_of(lens)
    assert torch.equal(attention.cu_seqlens_from_doc_ids(doc_ids), cu) and mx == 28
    assert torch.equal(attention.doc_index(cu, doc_ids.numel()).view_as(doc_ids), attention.segment_ids(doc_ids))


def test_packed_matches_transformers_position_ids_path(hf_dirs):
    m, hf = M.Transformer.from_pretrained(hf_dirs["qwen2"]), load_hf(hf_dirs["qwen2"])
    ids, doc_ids, _ = packed_example()
    pos = M.positions_from_doc_ids(doc_ids)
    assert pos[0, :9].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    with torch.no_grad():
        theirs = torch.cat([hf(ids[b : b + 1], position_ids=pos[b : b + 1], use_cache=False).logits
                            for b in range(len(ids))])
        assert (m(ids, doc_ids=doc_ids) - theirs).abs().max().item() <= 1e-4


def test_packed_gradients_equal_each_document_alone(hf_dirs):
    """per_doc (doc_ids, or cu_seqlens; with and without activation checkpointing) against the reference."""
    ids, doc_ids, lens = packed_example()
    cu, mx = cu_seqlens_of(lens)
    given = dict(cu_seqlens=cu, max_seqlen=mx, position_ids=M.positions_from_doc_ids(doc_ids))
    grads = {}
    for name, kw, ckpt in [("ref", None, 0), ("doc_ids", dict(doc_ids=doc_ids), 0), ("cu_seqlens", given, 0),
                           ("checkpointed", dict(doc_ids=doc_ids), 1), ("every 2nd block", given, 2)]:
        m = M.Transformer.from_pretrained(hf_dirs["llama"], attn_impl="per_doc")
        m.set_activation_checkpointing(ckpt > 0, every=max(ckpt, 1))
        logits = each_document_alone(m, ids, lens) if kw is None else m(ids, **kw)
        logits.logsumexp(-1).mean().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in m.parameters()])
    for name, g in grads.items():
        assert (g - grads["ref"]).abs().max().item() <= 1e-5, name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["varlen", "flex"])
def test_cuda_packed_impls_match_per_doc(hf_dirs, impl):
    """bf16 on CUDA (FlashAttention has no fp32 kernel): logits and gradients of varlen / compiled flex against
    per_doc (one causal SDPA call per document) on the same packed rows."""
    if impl == "varlen" and not M.varlen_available():
        pytest.skip("torch.nn.attention.varlen is not in this torch")
    ids, doc_ids, lens = packed_example()
    cu, mx = cu_seqlens_of(lens)
    out = {}
    for name in ("per_doc", impl):
        m = M.Transformer.from_pretrained(hf_dirs["llama"], dtype=torch.bfloat16, device="cuda", attn_impl=name)
        logits = m(ids.cuda(), position_ids=M.positions_from_doc_ids(doc_ids).cuda(), cu_seqlens=cu.cuda(),
                   max_seqlen=mx)
        logits.float().logsumexp(-1).mean().backward()
        out[name] = logits.float(), torch.cat([p.grad.float().flatten() for p in m.parameters()])
    (l0, g0), (l1, g1) = out["per_doc"], out[impl]
    assert (l1 - l0).abs().max().item() <= 2e-2 * l0.abs().max().item()
    assert (g1 - g0).norm().item() <= 2e-2 * g0.norm().item()


def test_padded_batch_with_key_padding_mask_equals_each_alone(hf_dirs):
    m = M.Transformer.from_pretrained(hf_dirs["mistral"])
    seqs = [[5, 9, 31, 7, 2], [8, 8, 100, 4, 61, 3, 19, 22], [44]]
    L = max(map(len, seqs))
    for left in (True, False):
        ids = torch.zeros(3, L, dtype=torch.long)
        mask = torch.zeros(3, L, dtype=torch.bool)
        for i, s in enumerate(seqs):
            sl = slice(L - len(s), L) if left else slice(0, len(s))
            ids[i, sl], mask[i, sl] = torch.tensor(s), True
        with torch.no_grad():
            out = m(ids, key_padding_mask=mask)
            for i, s in enumerate(seqs):
                assert (out[i][mask[i]] - m(torch.tensor([s]))[0]).abs().max().item() <= 1e-5


def test_return_hidden_then_lm_head_equals_logits(hf_dirs):
    m = M.Transformer.from_pretrained(hf_dirs["qwen2"])
    ids, doc_ids, _ = packed_example()
    with torch.no_grad():
        assert torch.equal(m.lm_head(m(ids, doc_ids=doc_ids, return_hidden=True)), m(ids, doc_ids=doc_ids))


def test_save_pretrained_roundtrip_through_transformers(hf_dirs, tmp_path):
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    for arch in ["llama", "qwen2"]:
        m = M.Transformer.from_pretrained(hf_dirs[arch])
        m.save_pretrained(tmp_path / arch)
        sharded = tmp_path / f"{arch}-sharded"
        m.save_pretrained(sharded, max_shard_size="40KB")
        assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2 and (sharded / M.INDEX_NAME).is_file()
        with torch.no_grad():
            ref = m(x)
            for d in [tmp_path / arch, sharded]:
                assert (load_hf(d)(x).logits - ref).abs().max().item() <= 1e-5
                assert torch.equal(M.Transformer.from_pretrained(d)(x), ref)


def test_meta_build_to_empty_then_load(hf_dirs):
    args = M.ModelArgs.from_hf_config(json.loads((hf_dirs["qwen2"] / "config.json").read_text()))
    m = M.Transformer.from_args(args, device="meta")
    assert m.model.embed_tokens.weight.is_meta
    m.to_empty(device="cpu")
    m.reset_buffers()
    m.load_hf_weights(hf_dirs["qwen2"])
    assert m.lm_head.weight is m.model.embed_tokens.weight
    x = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        assert torch.equal(m(x), M.Transformer.from_pretrained(hf_dirs["qwen2"])(x))


def test_clear_errors(hf_dirs, tmp_path):
    cfg = json.loads((hf_dirs["llama"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*llama.*mistral.*qwen2"):
        M.ModelArgs.from_hf_config(cfg | {"model_type": "gpt2"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        M.Transformer.from_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(hf_dirs["llama"] / "model.safetensors")
    bad = dict(sd) | {"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatch for model.layers.0.mlp.up_proj.weight.*\(3, 3\)"):
        M.Transformer.from_pretrained(tmp_path)
    bad = {k: v for k, v in sd.items() if k != "model.norm.weight"} | {"extra.weight": torch.zeros(1)}
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing 1 \['model.norm.weight'\], unexpected 1 \['extra.weight'\]"):
        M.Transformer.from_pretrained(tmp_path)


def folder_digest(d):
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(d.iterdir()))).hexdigest()


def test_make_tiny_loads_in_transformers_and_is_deterministic(tmp_path):
    from transformers import AutoTokenizer

    a = make_tiny(tmp_path / "a", arch="qwen2", seed=0)
    b = make_tiny(tmp_path / "b", arch="qwen2", seed=0)
    c = make_tiny(tmp_path / "c", arch="qwen2", seed=1)
    assert folder_digest(a) == folder_digest(b)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    tok = AutoTokenizer.from_pretrained(a)
    ids = tok("What is 123 + 45?").input_ids
    assert tok.decode(ids) == "What is 123 + 45?"
    assert [tok.decode([i]) for i in tok("2024").input_ids] == ["2", "0", "2", "4"]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                               add_generation_prompt=True)
    hf, ours = load_hf(a), M.Transformer.from_pretrained(a)
    assert ours.args.vocab_size >= len(tok) and ours.args.tie_word_embeddings
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_make_tiny_cli_with_a_copied_tokenizer(shared, tmp_path):
    from transformers import AutoTokenizer

    import maketiny

    maketiny.main(["--out", str(tmp_path), "--arch", "mistral", "--tokenizer",
            str(shared / "models/gpt2"), "--hidden", "32", "--layers", "1", "--heads", "2", "--kv_heads", "1"])
    tok = AutoTokenizer.from_pretrained(tmp_path)
    m = M.Transformer.from_pretrained(tmp_path)
    assert m.args.model_type == "mistral" and m.args.vocab_size >= len(tok) and m.args.num_hidden_layers == 1
    assert m.generation_config["eos_token_id"] == tok.eos_token_id


FSDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
import model as M
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo")
path = sys.argv[1]
ref = M.Transformer.from_pretrained(path)
m = M.Transformer.from_args(ref.args, device="meta")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for block in m.model.layers:
    fully_shard(block, mesh=mesh)
fully_shard(m, mesh=mesh)
m.to_empty(device="cpu")
m.reset_buffers()
m.load_hf_weights(path)
x = torch.randint(0, ref.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
with torch.no_grad():
    diff = (m(x, doc_ids=doc) - ref(x, doc_ids=doc)).abs().max().item()
assert diff == 0.0 and m.lm_head.weight is m.model.embed_tokens.weight, diff
dist.barrier()  # both ranks done before the gloo group is torn down
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_load_hf_weights_into_fsdp2_sharded_model(hf_dirs, tmp_path):
    """The sft.py path: meta -> fully_shard per block + root -> to_empty -> reset_buffers -> load (2 gloo ranks)."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "fsdp_load.py"
    script.write_text(FSDP_SCRIPT)
    repo = Path(M.__file__).resolve().parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(hf_dirs["qwen2"]), str(repo)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("rows", [1, 2, 16, 64, 65])
def test_small_row_linear_equals_module(rows):
    """model.linear's W @ x^T path for decode-sized inputs gives the same values as nn.Linear."""
    g = torch.Generator().manual_seed(rows)
    for bias in (False, True):
        lin = torch.nn.Linear(48, 200, bias=bias)
        x = torch.randn(rows, 1, 48, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(M.linear(lin, x), lin(x), rtol=1e-6, atol=1e-6)


def test_linear_cross_entropy_values_grads_and_no_grad_work():
    """Summed CE and its gradients equal autograd's; without grad mode (evaluation) only the forward matmuls run."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    N, h, V_ = 37, 16, 50
    x, w = torch.randn(N, h, generator=g, requires_grad=True), torch.randn(V_, h, generator=g, requires_grad=True)
    y = torch.randint(0, V_, (N,), generator=g)
    ref = torch.nn.functional.cross_entropy(x @ w.t(), y, reduction="sum")
    rx, rw = torch.autograd.grad(ref, (x, w))
    with FlopCounterMode(display=False) as train_flops:
        loss = M.linear_cross_entropy(x, w, y, chunk=8)
        gx, gw = torch.autograd.grad(loss, (x, w))
    assert abs(loss.item() - ref.item()) <= 1e-4 and (gx - rx).abs().max() <= 1e-5 and (gw - rw).abs().max() <= 1e-5
    with torch.no_grad(), FlopCounterMode(display=False) as eval_flops:
        ev = M.linear_cross_entropy(x, w, y, chunk=8)
    assert ev.item() == loss.item() and ev.grad_fn is None
    matmul = 2 * N * h * V_
    # (FlopCounterMode does not see the in-place addmm_ of the weight gradient: forward + input gradient)
    assert eval_flops.get_total_flops() == matmul and train_flops.get_total_flops() == 2 * matmul
    w.requires_grad_(False)  # a frozen head (LoRA)
    (gx2,) = torch.autograd.grad(M.linear_cross_entropy(x, w, y, chunk=8), (x,))
    assert torch.equal(gx2, gx)


@pytest.mark.parametrize("every,expected", [(1, [2, 2, 2, 2]), (2, [2, 1, 2, 1]), (3, [2, 1, 1, 2])])
def test_activation_checkpointing_every_kth_block_recomputes_only_those(every, expected):
    args = M.ModelArgs(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2)
    m = M.Transformer.from_args(args, generator=torch.Generator().manual_seed(0))
    m.set_activation_checkpointing(True, every=every)
    calls = [0] * 4
    for i, layer in enumerate(m.model.layers):
        layer.register_forward_pre_hook(lambda mod, inp, i=i: calls.__setitem__(i, calls[i] + 1))
    m(torch.randint(0, V, (1, 12))).sum().backward()
    assert calls == expected  # a checkpointed block runs again in backward
