"""`python sft.py --dry_run`: parameter counts (LoRA and full) and a per-GPU memory estimate, without weights.

The model is built on the meta device (nothing allocated) from a local config.json or, for a few models
people ask about before downloading them, from the shapes in KNOWN_CONFIGS.
"""
from __future__ import annotations

import json
from pathlib import Path

from cli import UserError

KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                              tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "Qwen/Qwen2.5-1.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                              num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                              tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                                     intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=32, tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def model_config(path: str) -> dict:
    """config.json of a local folder, else the shape of a KNOWN_CONFIGS model named `path`."""
    if (Path(path) / "config.json").is_file():
        return json.loads((Path(path) / "config.json").read_text())
    for name, shape in KNOWN_CONFIGS.items():
        if path.lower() in (name.lower(), name.split("/")[1].lower()):
            return dict(shape)
    raise UserError(f"error: --model_name_or_path {path}: no config.json there (--dry_run also knows "
                    f"{', '.join(KNOWN_CONFIGS)})")


def memory_estimate(hf_config: dict, n_total: int, n_train: int, cfg, world: int, lora_mode: bool) -> dict:
    """Rough bytes per GPU under FSDP2 with bf16 compute: sharded weights/grads/AdamW state, the
    all-gathered bf16 blocks in flight, activations of one micro-batch, and the logits."""
    h, inter = hf_config["hidden_size"], hf_config["intermediate_size"]
    layers, vocab = hf_config["num_hidden_layers"], hf_config["vocab_size"]
    heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads") or heads
    kv_dim = kv * (hf_config.get("head_dim") or h // heads)
    tokens = cfg.per_device_train_batch_size * cfg.max_seq_length
    weights = ((n_total - n_train) * 2 + n_train * 4) if lora_mode else n_total * 4  # frozen bf16, master fp32
    block = (4 * h * h + 3 * h * inter) * 2  # one block's bf16 working copy (approx.)
    per_layer_act = tokens * 2 * (7 * h + 2 * kv_dim + 4 * inter)  # bf16 tensors saved for backward
    acts = (tokens * h * 2 * layers + per_layer_act) if cfg.activation_checkpointing else per_layer_act * layers
    return {
        "weights": weights / world + (2 * block if world > 1 else 0),
        "grads": n_train * 4 / world,
        "optimizer": n_train * 8 / world,
        "activations": acts,
        # bf16 logits, fp32 copy for the loss, fp32 grad; with chunking only one chunk exists at a time
        "logits": (min(tokens, cfg.loss_chunk_tokens) if cfg.loss_chunk_tokens > 0 else tokens) * vocab * 10,
    }


def dry_run(cfg, world: int) -> None:
    """Print the table for `cfg` (sft.Config) over `world` GPUs."""
    import torch

    import lora
    import model as M

    hf = model_config(cfg.model_name_or_path)
    rows = []
    for lora_mode in (True, False):
        model = M.Transformer.from_args(M.ModelArgs.from_hf_config(hf), device="meta", dtype=torch.bfloat16)
        if lora_mode:
            lora.inject_lora(model, lora.LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha,
                                                    target_modules=tuple(cfg.lora_target_modules),
                                                    modules_to_save=tuple(cfg.lora_modules_to_save)))
        n_train, n_total = lora.count_parameters(model)
        rows.append((lora_mode, n_total, n_train, memory_estimate(hf, n_total, n_train, cfg, world, lora_mode)))
    gib = 2**30
    print(f"model {cfg.model_name_or_path} ({hf.get('model_type')}, {hf['num_hidden_layers']} layers, "
          f"hidden {hf['hidden_size']}, vocab {hf['vocab_size']})")
    print(f"batch {cfg.per_device_train_batch_size} x {cfg.max_seq_length} tokens per GPU, {world} GPU(s), "
          f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, "
          f"LoRA r={cfg.lora_r} on {','.join(cfg.lora_target_modules)}")
    print(f"{'mode':<6} {'total params':>14} {'trainable':>14} {'weights':>8} {'grads':>8} {'optim':>8} "
          f"{'activ.':>8} {'logits':>8} {'total GiB':>10}")
    for lora_mode, n_total, n_train, mem in rows:
        print(f"{'lora' if lora_mode else 'full':<6} {n_total:>14,} {n_train:>14,} "
              + " ".join(f"{mem[k] / gib:>8.2f}" for k in ("weights", "grads", "optimizer", "activations", "logits"))
              + f" {sum(mem.values()) / gib:>10.2f}")
    print("(estimate: bf16 compute, fp32 master weights and AdamW state, FSDP2-sharded over the GPUs; "
          "add ~1-2 GiB of CUDA context and allocator slack)")
