"""lora.py on tiny random models: identity at init, only adapters train, merge/unmerge, PEFT-format files
that round-trip through our loader and through peft + transformers with the same logits."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lora
import model as M
from lora import LoraConfig, LoRALinear
from maketiny import make_tiny

VOCAB = 96  # token ids drawn below this; every base model here has a vocabulary at least this large
SIZES = dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)


@dataclass
class Base:
    """A tiny base model saved in HF format, and how to build it (loaded, or on meta) in the model class."""

    dir: Path
    kind: str  # "ours" (model.Transformer) | "hf" (a transformers model: lora.py is generic over nn.Module)

    def load(self, path=None):
        if self.kind == "ours":
            return M.Transformer.from_pretrained(path or self.dir).eval()
        return _load_hf(path or self.dir)

    def on_meta(self):
        if self.kind == "ours":
            args = M.ModelArgs.from_hf_config(json.loads((self.dir / "config.json").read_text()))
            return M.Transformer.from_args(args, device="meta")
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.dir))


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["ours-llama", "ours-qwen2", "hf-llama"])
def base(request, tmp_path_factory):
    kind, arch = request.param.split("-")
    out = tmp_path_factory.mktemp(request.param)
    if kind == "ours":  # our model.py writes it with Transformer.save_pretrained (qwen2: tied, qkv bias)
        make_tiny(out, arch=arch, seed=0, **SIZES)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(out)
    return Base(out, kind)


def logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def randomize_adapters(model, seed=1):
    """B is zero at init; give it values so adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
CFG = LoraConfig(r=4, alpha=8)


def test_fresh_adapter_is_identity_and_only_adapters_train(base):
    model = base.load()
    with torch.no_grad():
        ref = logits(model, IDS)
    names = lora.inject_lora(model, CFG)
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert not isinstance(model.lm_head, LoRALinear)
    with torch.no_grad():
        assert torch.equal(logits(model, IDS), ref)
    trainable = {n for n, _ in lora.trainable_parameters(model)}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for _, p in lora.trainable_parameters(model)], lr=1e-2)
    model.train()
    for _ in range(2):  # step 1 moves B (A's grad is 0 while B = 0), step 2 moves A too
        loss = F.cross_entropy(logits(model, IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".lora_" in k}  # every adapter moved, nothing else did


def test_merge_unmerge_and_merge_and_unload(base):
    model = base.load()
    lora.inject_lora(model, CFG)
    randomize_adapters(model)
    base_w = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    with torch.no_grad():
        adapted = logits(model, IDS)
        lora.merge_lora(model)
        assert all(m.merged for m in lora.lora_modules(model).values())
        torch.testing.assert_close(logits(model, IDS), adapted, atol=1e-5, rtol=0)
        lora.unmerge_lora(model)
        for k, v in model.state_dict().items():
            if k in base_w:
                torch.testing.assert_close(v, base_w[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(logits(model, IDS), adapted, atol=1e-5, rtol=0)

    full_sd = {k: v.clone() for k, v in model.state_dict().items()}
    plain = lora.merge_and_unload(model)
    assert not lora.lora_modules(plain)
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert plain.state_dict().keys() == base_w.keys()  # HF names again
    with torch.no_grad():
        torch.testing.assert_close(logits(plain, IDS), adapted, atol=1e-5, rtol=0)
    merged = lora.merged_state_dict(full_sd, CFG)  # the FSDP export path: merge a gathered state dict
    assert merged.keys() == base_w.keys()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0)


def test_save_load_roundtrip_exact(base, tmp_path):
    model = base.load()
    lora.inject_lora(model, CFG)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = logits(model, IDS)
    lora.save_adapter(model, CFG, tmp_path, base_model_name_or_path=str(base))

    cfg, base_name = lora.read_adapter_config(tmp_path)
    assert (cfg.r, cfg.alpha, cfg.dropout, base_name) == (CFG.r, CFG.alpha, CFG.dropout, str(base))
    fresh = lora.load_adapter(base.load(), tmp_path)
    with torch.no_grad():
        assert torch.equal(logits(fresh, IDS), adapted)

    # keys with the live PEFT adapter name (`.default.`) load too
    sd = load_file(str(tmp_path / lora.ADAPTER_WEIGHTS))
    save_file({lora.peft_param_name(k): v for k, v in sd.items()}, str(tmp_path / lora.ADAPTER_WEIGHTS))
    again = lora.load_adapter(base.load(), tmp_path)
    with torch.no_grad():
        assert torch.equal(logits(again, IDS), adapted)


def test_save_from_gathered_state_dict_and_peft071_files(base, tmp_path):
    model = base.load()
    lora.inject_lora(model, CFG)
    randomize_adapters(model)
    # what sft.py passes under FSDP2: adapter-only state dict keyed by our FQNs
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    lora.save_adapter(sd, CFG, tmp_path / "from_sd", base_model_name_or_path="base")
    lora.save_adapter(model, CFG, tmp_path / "from_model", base_model_name_or_path="base")
    a = load_file(str(tmp_path / "from_sd" / lora.ADAPTER_WEIGHTS))
    b = load_file(str(tmp_path / "from_model" / lora.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in a
    for k in a:
        assert k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
        assert ".default." not in k and "embed" not in k and "lm_head" not in k
    assert a["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (CFG.r, 64)
    assert a["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, CFG.r)

    config = json.loads((tmp_path / "from_sd" / lora.ADAPTER_CONFIG).read_text())
    assert set(config) <= lora.PEFT_071_KEYS
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["target_modules"] == list(lora.DEFAULT_TARGETS)
    assert (config["r"], config["lora_alpha"]) == (CFG.r, CFG.alpha)

    assert lora.peft_param_name("model.layers.0.self_attn.q_proj.lora_A.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def test_dropout_only_on_the_adapter_branch(base):
    model = base.load()
    with torch.no_grad():
        ref = logits(model, IDS)
    lora.inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.5))
    model.train()
    with torch.no_grad():
        assert torch.equal(logits(model, IDS), ref)  # B = 0: dropout never touches the base path
        randomize_adapters(model)
        assert not torch.equal(logits(model, IDS), logits(model, IDS))  # train: random masks
        model.eval()
        assert torch.equal(logits(model, IDS), logits(model, IDS))


def test_rslora_key_written_only_when_set(base, tmp_path):
    model = base.load()
    cfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"), use_rslora=True)
    lora.inject_lora(model, cfg)
    assert lora.lora_modules(model)["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / 2)
    lora.save_adapter(model, cfg, tmp_path, base_model_name_or_path="base")
    config = json.loads((tmp_path / lora.ADAPTER_CONFIG).read_text())
    assert config["use_rslora"] is True and config["target_modules"] == ["q_proj", "v_proj"]
    assert lora.read_adapter_config(tmp_path)[0].use_rslora


def test_peft_loads_our_adapter_with_same_logits(base, tmp_path):
    """Base written by our save_pretrained, loaded by transformers; our adapter loaded by peft."""
    peft = pytest.importorskip("peft")
    model = base.load()
    lora.inject_lora(model, CFG)
    randomize_adapters(model)
    with torch.no_grad():
        ours = logits(model, IDS)
    lora.save_adapter(model, CFG, tmp_path, base_model_name_or_path=str(base.dir))

    theirs_model = peft.PeftModel.from_pretrained(_load_hf(base.dir), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs_model, IDS), ours, atol=1e-5, rtol=0)
    # LESS keys optimizer.bin by the live PeftModel names: peft_param_name must produce exactly those
    peft_names = [n for n, _ in theirs_model.named_parameters() if "lora_" in n]
    ours_names = [lora.peft_param_name(n) for n, _ in model.named_parameters() if "lora_" in n]
    assert ours_names == peft_names

    # and the other way: an adapter written by peft itself (random A and B) loads into our model
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(5)
    from_peft = peft.get_peft_model(_load_hf(base.dir), peft_cfg).eval()
    from_peft.save_pretrained(tmp_path / "peft_written")
    back = lora.load_adapter(base.load(), tmp_path / "peft_written")
    assert len(lora.lora_modules(back)) == 2 * 3
    with torch.no_grad():
        torch.testing.assert_close(logits(back, IDS), logits(from_peft, IDS), atol=1e-5, rtol=0)

    merged_dir = tmp_path / "merged"  # merged export in HF format: same logits in transformers and in ours
    lora.merge_and_unload(model).save_pretrained(merged_dir)
    with torch.no_grad():
        torch.testing.assert_close(logits(_load_hf(merged_dir), IDS), ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits(base.load(merged_dir), IDS), ours, atol=1e-5, rtol=0)


def test_bf16_base_fp32_adapters(base):
    model = base.load()
    lora.inject_lora(model, CFG)
    randomize_adapters(model)
    with torch.no_grad():
        ref = logits(model, IDS)
    mixed = copy.deepcopy(model)
    for n, p in mixed.named_parameters():
        if ".lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    q = lora.lora_modules(mixed)["model.layers.0.self_attn.q_proj"]
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == torch.float32
    out = logits(mixed, IDS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.detach().float(), ref, atol=0.1, rtol=0.05)
    loss = out.float().square().mean()
    loss.backward()
    assert q.lora_B.weight.grad is not None and q.lora_B.weight.grad.dtype == torch.float32
    assert q.weight.grad is None


def test_meta_inject_then_reset_is_seeded_and_order_free(base):
    """sft.py's order: build on meta, inject, to_empty, load base weights, reset the adapters (seeded)."""
    models = []
    for _ in range(2):
        m = base.on_meta()
        lora.inject_lora(m, CFG, dtype=torch.float32)
        assert lora.lora_modules(m)["model.layers.0.self_attn.q_proj"].lora_A.weight.is_meta
        m.to_empty(device="cpu")
        models.append(m)
    lora.reset_lora_parameters(models[0], seed=3)
    torch.manual_seed(123)  # global RNG state must not matter when a seed is given
    lora.reset_lora_parameters(models[1], seed=3)
    a0, a1 = lora.lora_modules(models[0]), lora.lora_modules(models[1])
    for name in a0:
        assert torch.equal(a0[name].lora_A.weight, a1[name].lora_A.weight)
        assert not a0[name].lora_B.weight.any()
        bound = 1 / a0[name].in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in)
        assert a0[name].lora_A.weight.abs().max() <= bound and a0[name].lora_A.weight.std() > bound / 4
    q, k = a0["model.layers.0.self_attn.q_proj"], a0["model.layers.0.self_attn.k_proj"]
    assert not torch.equal(q.lora_A.weight, k.lora_A.weight)
    lora.reset_lora_parameters(models[1], seed=4)
    assert not torch.equal(a1["model.layers.0.self_attn.q_proj"].lora_A.weight, q.lora_A.weight)

    if base.kind == "ours":  # base weights load around the adapters; fresh adapters leave the base logits
        m = models[0]
        m.reset_buffers()
        m.load_hf_weights(base.dir)
        with torch.no_grad():
            assert torch.equal(logits(m.eval(), IDS), logits(base.load(), IDS))


def test_errors(base, tmp_path):
    model = base.load()
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*q_proj"):
        lora.inject_lora(model, LoraConfig(target_modules=("qkv", "c_attn")))
    with pytest.raises(ValueError, match="embedding"):
        lora.inject_lora(model, LoraConfig(target_modules=("embed_tokens",)))

    lora.inject_lora(model, CFG)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject_lora(model, CFG)
    lora.save_adapter(model, CFG, tmp_path / "r4", base_model_name_or_path="base")
    other = base.load()
    lora.inject_lora(other, LoraConfig(r=8, alpha=16))  # same scaling, other rank
    with pytest.raises(ValueError, match=r"shape mismatches.*lora_A.weight: file \(4, 32\) vs model \(8, 32\)"):
        lora.load_adapter(other, tmp_path / "r4")
    with pytest.raises(ValueError, match="rank 4 but LoraConfig.r=8"):
        lora.save_adapter(model, LoraConfig(r=8), tmp_path / "bad", base_model_name_or_path="base")

    qv = base.load()
    lora.inject_lora(qv, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    with pytest.raises(ValueError, match=r"missing"):
        lora.load_adapter(qv, tmp_path / "r4")  # the file has k/o/mlp adapters this model lacks
    config = json.loads((tmp_path / "r4" / lora.ADAPTER_CONFIG).read_text())
    (tmp_path / "r4" / lora.ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        lora.read_adapter_config(tmp_path / "r4")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.read_adapter_config(tmp_path)


def _fsdp_worker(rank: int, world: int, init_file: str, base_dir: str, out_file: str):
    """One gloo rank: meta model -> inject -> fully_shard per block -> to_empty -> seeded adapter init ->
    gather the adapter-only full state dict on rank 0 (what sft.py does before save_adapter)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        args = M.ModelArgs.from_hf_config(json.loads((Path(base_dir) / "config.json").read_text()))
        model = M.Transformer.from_args(args, device="meta")
        lora.inject_lora(model, LoraConfig(r=3, alpha=6))  # r=3: uneven shards of lora_A over 2 ranks
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device="cpu")
        lora.reset_lora_parameters(model, seed=7)
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=True))
        if rank == 0:
            torch.save(sd, out_file)
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reset_under_fsdp2_matches_single_process(tmp_path):
    """reset_lora_parameters on FSDP2-sharded (DTensor) adapters gives the same init as unsharded."""
    import torch.multiprocessing as mp

    base_dir = make_tiny(tmp_path / "base", arch="llama", seed=0, **SIZES)
    out_file = tmp_path / "sd.pt"
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "pg"), str(base_dir), str(out_file)), nprocs=2)
    gathered = torch.load(out_file)

    single = M.Transformer.from_pretrained(base_dir)
    lora.inject_lora(single, LoraConfig(r=3, alpha=6))
    lora.reset_lora_parameters(single, seed=7)
    expected = {k: v for k, v in single.state_dict().items() if ".lora_" in k}
    assert gathered.keys() == expected.keys()
    for k in expected:
        assert torch.equal(gathered[k], expected[k]), k
    lora.save_adapter(gathered, LoraConfig(r=3, alpha=6), tmp_path / "adapter", base_model_name_or_path="base")


# ----------------------------------------------------------------------------- modules_to_save (PEFT's feature)

MTS = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"), modules_to_save=("embed_tokens", "lm_head", "norm"))
MTS_KEYS = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            *(f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm"))}


def _tied(model) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def _train_steps(model, n=2):
    opt = torch.optim.AdamW([p for _, p in lora.trainable_parameters(model)], lr=1e-2)
    model.train()
    for _ in range(n):
        loss = F.cross_entropy(logits(model, IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_modules_to_save_train_save_load_merge(base, tmp_path):
    model = base.load()
    tied = _tied(model)
    lora.inject_lora(model, MTS)
    assert _tied(model) == tied  # injection keeps a tied head tied
    trainable = {n for n, _ in lora.trainable_parameters(model)}
    lora_names = {n for n in trainable if ".lora_" in n}
    assert trainable - lora_names == MTS_KEYS - ({"lm_head.weight"} if tied else set())  # tied: one Parameter
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".lora_" in k} | MTS_KEYS  # nothing else of the base moved
    with torch.no_grad():
        trained = logits(model, IDS)

    lora.save_adapter(model, MTS, tmp_path / "a", base_model_name_or_path=str(base.dir))
    files = load_file(str(tmp_path / "a" / lora.ADAPTER_WEIGHTS))
    assert {k for k in files if ".lora_" not in k} == {"base_model.model." + k for k in MTS_KEYS}  # PEFT's keys
    config = json.loads((tmp_path / "a" / lora.ADAPTER_CONFIG).read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head", "norm"] and set(config) <= lora.PEFT_071_KEYS
    assert lora.read_adapter_config(tmp_path / "a")[0].modules_to_save == MTS.modules_to_save
    # sft.py's path: only the trainable tensors (a tied head is not among them), gathered, keyed by our FQNs
    sd = {n: p.detach().clone() for n, p in lora.trainable_parameters(model)}
    lora.save_adapter(sd, MTS, tmp_path / "sd", base_model_name_or_path="base", tied_embeddings=tied)
    from_sd = load_file(str(tmp_path / "sd" / lora.ADAPTER_WEIGHTS))
    assert from_sd.keys() == files.keys() and all(torch.equal(from_sd[k], files[k]) for k in files)

    fresh = lora.load_adapter(base.load(), tmp_path / "a")
    assert _tied(fresh) == tied
    with torch.no_grad():
        assert torch.equal(logits(fresh, IDS), trained)
    merged_sd = lora.merged_state_dict({k: v.clone() for k, v in model.state_dict().items()}, MTS)
    plain = lora.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(plain, IDS), trained, atol=1e-5, rtol=0)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(merged_sd[k], v, atol=1e-6, rtol=0)
    plain.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(logits(_load_hf(tmp_path / "merged"), IDS), trained, atol=1e-5, rtol=0)


def test_modules_to_save_peft_interop_both_ways(base, tmp_path):
    peft = pytest.importorskip("peft")
    model = base.load()
    tied = _tied(model)
    lora.inject_lora(model, MTS)
    _train_steps(model)
    with torch.no_grad():
        ours = logits(model, IDS)
    lora.save_adapter(model, MTS, tmp_path / "ours", base_model_name_or_path=str(base.dir))
    theirs = peft.PeftModel.from_pretrained(_load_hf(base.dir), str(tmp_path / "ours")).eval()
    wrapped = [n for n, _ in theirs.named_modules() if n.endswith(".modules_to_save.default")]
    assert len(wrapped) == 2 + 4 + 1  # embed, lm_head, 2 x 2 layer norms, final norm (PEFT's suffix match)
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, IDS), ours, atol=1e-5, rtol=0)

    # an adapter written by peft itself: random A, B and changed copies of the saved modules
    kw = {"ensure_weight_tying": True} if tied else {}
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                               modules_to_save=["embed_tokens", "lm_head", "norm"], task_type="CAUSAL_LM", **kw)
    torch.manual_seed(5)
    from_peft = peft.get_peft_model(_load_hf(base.dir), peft_cfg).eval()
    with torch.no_grad():
        for n, p in from_peft.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p) * 0.1)
    from_peft.save_pretrained(tmp_path / "peft_written")
    back = lora.load_adapter(base.load(), tmp_path / "peft_written")
    with torch.no_grad():
        torch.testing.assert_close(logits(back, IDS), logits(from_peft, IDS), atol=1e-5, rtol=0)
    if tied:  # untied copies (PEFT without ensure_weight_tying) cannot load onto one tied weight: say so
        sd = load_file(str(tmp_path / "peft_written" / lora.ADAPTER_WEIGHTS))
        sd["base_model.model.lm_head.weight"] = sd["base_model.model.lm_head.weight"] + 1
        save_file(sd, str(tmp_path / "peft_written" / lora.ADAPTER_WEIGHTS))
        with pytest.raises(ValueError, match="tied"):
            lora.load_adapter(base.load(), tmp_path / "peft_written")


def test_modules_to_save_errors(base):
    with pytest.raises(ValueError, match=r"modules_to_save \['ln_f'\] matched no module"):
        lora.inject_lora(base.load(), LoraConfig(modules_to_save=("ln_f",)))
    with pytest.raises(ValueError, match="both LoRA targets"):
        lora.inject_lora(base.load(), LoraConfig(target_modules=("q_proj", "lm_head"), modules_to_save=("lm_head",)))
    model = base.load()
    lora.inject_lora(model, LoraConfig(r=4, alpha=8, modules_to_save=("norm",)))
    with pytest.raises(ValueError, match=r"modules_to_save \['embed_tokens'\] have no tensors"):
        lora.save_adapter({n: p for n, p in lora.trainable_parameters(model)},
                          LoraConfig(r=4, alpha=8, modules_to_save=("norm", "embed_tokens")), "/nonexistent", "base")


def test_bf16_adapters_same_numbers_as_fsdp2_and_no_fp32_activation_copies():
    """fp32 master adapters with bf16 activations (one GPU) give bitwise the outputs and gradients of bf16
    adapter weights (what FSDP2's param_dtype=bf16 computes with), with or without autocast, and no fp32
    tensor of activation size is created in forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    master = LoRALinear.from_linear(nn.Linear(64, 48, bias=True), r=4, alpha=8)
    master.weight.data, master.bias.data = master.weight.data.bfloat16(), master.bias.data.bfloat16()
    nn.init.normal_(master.lora_B.weight)
    fsdp_like = copy.deepcopy(master)
    fsdp_like.lora_A.weight.data, fsdp_like.lora_B.weight.data = (fsdp_like.lora_A.weight.data.bfloat16(),
                                                                  fsdp_like.lora_B.weight.data.bfloat16())
    x, dy = torch.randn(32, 64, dtype=torch.bfloat16), torch.randn(32, 48, dtype=torch.bfloat16)

    class BigFp32(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= 32 * 48:
                    self.seen.append(func)
            return out

    def run(m, autocast):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), BigFp32() as mode:
            y = m(x)
            y.backward(dy)
        return y, [m.lora_A.weight.grad.float(), m.lora_B.weight.grad.float()], mode.seen

    ref, ref_grads, _ = run(fsdp_like, False)
    for autocast in (False, True):
        y, grads, big = run(master, autocast)
        assert y.dtype == torch.bfloat16 and torch.equal(y, ref) and not big, (autocast, big)
        assert master.lora_A.weight.grad.dtype == torch.float32
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
