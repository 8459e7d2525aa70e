"""The demo, end to end through the real CLIs (synthetic data, maketiny.py, evalmath, sft.py, report).

All three run in CI (marked slow): the CI-sized presets of LoRA and full fine-tuning (~2 min each on a quiet
2-core machine) and the full default demo, which must reach >= 90% on held-out problems. The default suite
covers the same training path with tests/test_sft.py's loss-falls tests on a tiny model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import demo  # noqa: E402


def _check_files(s: dict, report: Path) -> None:
    job = Path(s["job_dir"])
    for name in ("config.json", "train.log", "metrics.jsonl", "latest", "checkpoint-best"):
        assert (job / name).exists(), f"missing {job / name}"
    best = (job / "checkpoint-best").resolve()
    weights = ("adapter_config.json", "adapter_model.safetensors") if s["mode"] == "lora" else (
        "config.json", "model.safetensors")
    for name in (*weights, "tokenizer.json", "trainer_state.json", "manifest.json"):
        assert (best / name).is_file(), f"missing {best / name}"
    assert json.loads((best / "trainer_state.json").read_text())["template"] == "gsm8k"
    for key in ("before_file", "after_file"):
        result = json.loads(Path(s[key]).read_text())
        assert {"config", "summary", "items"} <= set(result)
        item = result["items"][0]
        assert {"id", "question", "gold", "response", "extracted", "correct", "error_type", "n_tokens",
                "truncated"} <= set(item)
    text = report.read_text()
    assert "untrained (random init)" in text and "checkpoint-best" in text and "## Loss curve" in text
    metrics = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "tokens_per_s" in m]
    assert losses[-1] < 0.5 * losses[0], "training loss did not fall"


@pytest.mark.slow
def test_ci_sized_demo_learns(tmp_path):
    report = tmp_path / "report.md"
    s = demo.main(["--preset", "ci", "--work", str(tmp_path / "work"), "--report", str(report)])
    assert s["mode"] == "lora"  # the default
    if s["mode"] == "lora":  # the adapter carries the trained embeddings, head and norms (modules_to_save)
        config = json.loads((Path(s["job_dir"]) / "checkpoint-best" / "adapter_config.json").read_text())
        assert config["modules_to_save"] and "lm_head" in config["modules_to_save"]
    assert s["before"] <= 0.05, s
    assert s["after"] >= s["before"] + 0.15, f"accuracy did not rise well above the untrained model's: {s}"
    _check_files(s, report)


@pytest.mark.slow
def test_ci_sized_full_finetuning_demo_learns(tmp_path):
    report = tmp_path / "report.md"
    s = demo.main(["--mode", "full", "--preset", "ci", "--work", str(tmp_path / "work"), "--report", str(report)])
    assert s["before"] <= 0.05, s
    assert s["after"] >= s["before"] + 0.15, f"accuracy did not rise well above the untrained model's: {s}"
    _check_files(s, report)


@pytest.mark.slow
def test_default_demo_reaches_90_percent(tmp_path):
    """The default demo (LoRA) reaches >= 90% on 500 held-out problems. (The training time, <= 5 min on the
    2-core dev machine, is measured in docs/benchmarks.md, not asserted: CI machines differ.) One thread: a
    multi-threaded run is not bitwise reproducible (MKL's reductions); one thread is the same run every time
    on a given machine. The recipe's draws over seeds are in docs/benchmarks.md, "Demo"."""
    report = tmp_path / "report.md"
    s = demo.main(["--work", str(tmp_path / "work"), "--report", str(report), "--threads", "1"])
    assert s["mode"] == "lora"
    assert s["before"] <= 0.05, s
    assert s["after"] >= 0.90, s
    _check_files(s, report)
