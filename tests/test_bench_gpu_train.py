"""scripts/bench_gpu_train.py: its FLOP arithmetic against the real model, and its --smoke mode end to end (CPU)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_gpu_train as bg  # noqa: E402

import model as M  # noqa: E402


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "llama-2-7b"])
def test_param_count_equals_the_models(shared, name):
    cfg = json.loads((shared / "models" / name / "config.json").read_text())
    cfg.setdefault("tie_word_embeddings", False)
    m = M.Transformer.from_args(M.ModelArgs.from_hf_config(cfg), device="meta")
    assert bg.param_count(cfg) == sum(p.numel() for p in m.parameters())  # tied weights counted once
    mean_len, mean_sq = 200.0, 50000.0
    attn = 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * mean_sq / mean_len
    assert bg.flops_per_token(cfg, "full", mean_len, mean_sq) == pytest.approx(6 * bg.param_count(cfg) + attn)
    assert bg.flops_per_token(cfg, "lora", mean_len, mean_sq) == pytest.approx(4 * bg.param_count(cfg) + attn)


def test_partial_namespace_gets_defaults():
    a = bg.with_defaults(argparse.Namespace(smoke=True, modes=["full"]))
    assert a.modes == ["full"] and a.seq == 256 and a.runners == ["ours", "trainer"] and not a.big
    assert a.attn_impls == (["varlen", "flex"] if bg._cuda() else ["auto"])


@pytest.mark.slow
def test_smoke_rows_run_ours_and_the_trainer_on_cpu(shared):
    pytest.importorskip("peft")
    rows = bg.training_rows(argparse.Namespace(smoke=True, modes=["lora"]))
    assert [(r["runner"], r["mode"]) for r in rows] == [("ours", "lora"), ("trainer", "lora"), ("trainer", "lora")]
    assert all("error" not in r for r in rows), rows
    assert all(r["tokens_per_s"] > 0 and r["model_tflops"] > 0 and r["peak_mem_gib"] > 0 for r in rows)
    ours, fit, same = rows
    assert fit["micro_batch"].startswith("4 examples")  # the smoke's only candidate micro-batch
    assert abs(same["real_tokens_per_step"] - ours["real_tokens_per_step"]) < 0.5 * ours["real_tokens_per_step"]
    table = bg.render(rows, bg.with_defaults(argparse.Namespace(smoke=True)))
    assert table.count("\n| ours | lora | smoke |") == 1 and table.count("| trainer | lora |") == 2
