"""sft.py + checkpoint.py on CPU with a tiny random Qwen2 model (maketiny.make_tiny) and real GSM8K rows.

Runs that must die (SIGKILL, SIGTERM) or use torchrun are real subprocesses of `python sft.py`."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint as ck
import sft
from cli import UserError

ERR = (SystemExit, UserError)  # tyro's own errors exit; ours raise UserError (one line via cli.run_main)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="session")
def work(tmp_path_factory, shared) -> Path:
    """A tiny model, 96 GSM8K training rows (plain and tulu-messages jsonl) and a shared data cache."""
    from maketiny import make_tiny

    root = tmp_path_factory.mktemp("sft")
    make_tiny(root / "tiny", arch="qwen2", seed=0)
    rows = [json.loads(x) for x in (shared / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()[:96]]
    (root / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tulu = [{"dataset": "gsm8k", "id": f"g{i}", "messages": [{"role": "user", "content": r["question"]},
                                                             {"role": "assistant", "content": r["answer"]}]}
            for i, r in enumerate(rows[:48])]
    (root / "tulu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tulu))
    return root


def base_args(work: Path, job: str, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(work / "tiny"), "--train_files", str(work / "gsm.jsonl"),
            "--max_seq_length", "512", "--truncation", "drop", "--per_device_train_batch_size", "1",
            "--num_threads", "1",
            "--data_cache_dir", str(work / "cache"), "--output_dir", str(work / "out"), "--job_name", job,
            "--learning_rate", "3e-3", "--warmup_steps", "0", *extra]


def run_sft(args: list[str], kill_at: str | None = None, check: bool = True, nproc: int = 0):
    """`python sft.py ARGS` (or torchrun with `nproc` processes); `kill_at` (STEP or STEP:during_save) runs it
    through tests/kill_at.py, which SIGKILLs the process at that point."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [str(REPO / "tests" / "kill_at.py"), kill_at] if kill_at else [str(REPO / "sft.py")]
    cmd = ([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc
           else [PY]) + [*script, *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"sft.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses(job_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (job_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of a single-rank checkpoint (RNG left out)."""
    sd = load_file(str(ckpt / "state-rank00000-of-00001.safetensors"))
    return {k: v for k, v in sd.items() if not k.startswith("rng.")}


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- config and CLI

def test_yaml_defaults_flags_override_and_bool_forms(tmp_path):
    cfg, notes = sft.parse_args(["--config", str(REPO / "configs" / "train_lora.yaml"), "--lora_r", "4"])
    assert cfg.use_lora and cfg.lora_r == 4 and cfg.lora_alpha == 32
    assert cfg.datasets == ("gsm8k",) and cfg.template == "boxed"  # from data_gsm8k.yaml via `configs:`
    assert cfg.model_name_or_path == "models/Qwen2.5-0.5B"  # from model.yaml
    assert any("data_gsm8k.yaml" in n for n in notes)
    for argv, expected in ((["--use_lora"], True), (["--use_lora", "false"], False), (["--use_lora", "True"], True),
                           (["--use_lora=0"], False)):
        assert sft.parse_args(argv)[0].use_lora is expected
    full, _ = sft.parse_args(["--config", str(REPO / "configs" / "train_full.yaml")])
    assert not full.use_lora and full.activation_checkpointing
    two = tmp_path / "b.yaml"
    two.write_text("learning_rate: 5e-4\n")  # PyYAML reads this as a string
    cfg, _ = sft.parse_args(["--config", str(REPO / "configs" / "train_lora.yaml"), "--config", str(two)])
    assert cfg.learning_rate == 5e-4


def test_data_flags_and_data_yaml_build_one_data_config(tmp_path):
    """sft's data flags, and a data.py YAML file's keys, become one data.DataConfig (sft.data_config); the flags
    named otherwise here (--data_seed, --sample_data_seed, --data_cache_dir, the model's tokenizer) are mapped."""
    yaml = tmp_path / "d.yaml"
    yaml.write_text("datasets: [math]\nseed: 5\nsample_seed: 9\nout_dir: cache\ntokenizer: ignored\n"
                    "math_levels: [3, 4]\nskip_bad_rows: true\n")
    cfg, _ = sft.parse_args(["--config", str(yaml), "--model_name_or_path", "m", "--percentage", "0.5"])
    assert (cfg.data_seed, cfg.sample_data_seed, cfg.data_cache_dir, cfg.seed) == (5, 9, "cache", 0)
    want = sft.data.DataConfig(datasets=("math",), tokenizer="m", out_dir="cache", seed=5, sample_seed=9,
                               math_levels=(3, 4), skip_bad_rows=True, percentage=0.5, max_seq_length=1024)
    assert sft.data_config(cfg) == want
    cfg, _ = sft.parse_args(["--config", str(REPO / "configs" / "data_math.yaml"), "--train_files", "a.jsonl",
                             "--data_seed", "2"])
    dc = sft.data_config(cfg)
    assert (dc.datasets, dc.seed, dc.max_seq_length, dc.out_dir, dc.tokenizer) == (
        ("a.jsonl",), 2, 2048, "data/processed", "models/Qwen2.5-0.5B")
    assert sft.data.parse_config(["--config", str(REPO / "configs" / "data_math.yaml"), "--seed", "2"]) == \
        sft.data.DataConfig(datasets=("math",), seed=2)


def test_help_lists_every_flag_with_help_text():
    """`python sft.py --help` names every Config field as a flag, each with its help text (the field's comment)."""
    import dataclasses

    p = subprocess.run([PY, str(REPO / "sft.py"), "--help"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "COLUMNS": "250"}, timeout=120)
    assert p.returncode == 0, p.stderr
    entries: dict[str, str] = {}  # flag -> its help text (tyro wraps it onto the following lines)
    flag = None
    for line in p.stdout.splitlines():
        text = line.strip("│ ╭╮╰╯─")
        m = re.match(r"(--\w+)(?: \S+)?\s*(.*)", text)
        if m:
            flag = m.group(1)
            entries[flag] = m.group(2)
        elif flag:
            entries[flag] += " " + text
    for f in dataclasses.fields(sft.Config):
        assert f"--{f.name}" in entries, f"--{f.name} missing from --help"
        words = re.sub(r"\(default: [^)]*\)", "", entries[f"--{f.name}"])
        assert re.search(r"[a-z]{3,}", words), f"--{f.name} has no help text: {entries[f'--{f.name}']!r}"


def test_moved_modules_import_without_a_process_group():
    """The modules sft.py uses import, and their functions that need no collective run, without
    torch.distributed initialised (and cli.py without importing tyro or torch)."""
    code = ("import sys, torch.distributed as dist\n"
            "import cli\nassert 'tyro' not in sys.modules\n"
            "import checkpoint, less, runlog, dryrun, evalmath, packing, records, model, maketiny, sft\n"
            "assert not dist.is_initialized()\n"
            "assert checkpoint.broadcast_object(3) == 3 and checkpoint.all_gather_object(4) == [4]\n"
            "checkpoint.barrier()\nprint('ok')\n")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    p = subprocess.run([PY, "-c", "import sys, cli; assert 'torch' not in sys.modules; print('ok')"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.stdout.strip() == "ok", p.stderr


def test_less_flag_string_parses_verbatim(work):
    script = REPO / "scripts" / "train" / "base_training_args.sh"
    out = subprocess.run(["bash", "-c", f'source "{script}"; echo "$header"; echo "$base_training_args"'],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    header, flags = out[0], out[1]
    assert header.split()[-1].endswith("sft.py") and "--nproc_per_node 1" in header
    argv = shlex.split(flags) + ["--model_name_or_path", str(work / "tiny"), "--output_dir", "../out/llama2-7b-lora",
                                 "--percentage", "0.05", "--data_seed", "3", "--sample_data_seed", "7",
                                 "--fsdp", "full_shard auto_wrap", "--fsdp_config", "llama_finetune",
                                 "--train_files", "a.jsonl", "b.jsonl"]
    cfg, notes = sft.parse_args(argv)
    assert (cfg.use_lora, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (True, 128, 512.0, 0.1)
    assert cfg.lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (cfg.learning_rate, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (2e-5, 1, 32)
    assert (cfg.num_train_epochs, cfg.save_strategy, cfg.lr_scheduler_type, cfg.warmup_ratio) == (4, "epoch", "linear", 0.03)
    assert (cfg.percentage, cfg.sample_data_seed, cfg.seed, cfg.max_seq_length) == (0.05, 7, 0, 2048)
    assert cfg.less_compat and not cfg.packing and cfg.template == "tulu" and cfg.overwrite_output_dir
    assert (cfg.output_dir, cfg.job_name) == ("../out", "llama2-7b-lora")
    assert cfg.train_files == ("a.jsonl", "b.jsonl") and cfg.report_to == "wandb"
    ignored = next(n for n in notes if "without effect" in n)
    for flag in ("--do_train", "--use_fast_tokenizer", "--evaluation_strategy", "--tf32", "--data_seed", "--fsdp",
                 "--fsdp_config"):
        assert flag in ignored
    # a repeated flag: the last one wins
    assert sft.parse_args(argv + ["--lora", "False"])[0].use_lora is False
    with pytest.raises(ERR, match="did you mean --learning_rate"):
        sft.parse_args(argv + ["--learning_rat", "1"])
    # LESS reads adapters without embedding/lm_head/norm weights: modules_to_save is refused there
    with pytest.raises(ERR, match="--lora_modules_to_save is not available in LESS mode"):
        sft.check_config(sft.parse_args(argv + ["--lora_modules_to_save", "embed_tokens"])[0])


def test_clear_errors(work, shared, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sft.parse_args(["--learnin_rate", "1"])
    assert "learning_rate" in capsys.readouterr().err  # tyro's did-you-mean
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 8\n")
    with pytest.raises(ERR, match=r"bad.yaml: unknown key 'lora_rank'; did you mean 'lora_r'"):
        sft.parse_args(["--config", str(bad)])
    with pytest.raises(ERR, match="no such folder. Download the model beforehand"):
        sft.main(["--model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path)])
    with pytest.raises(ERR, match="no weights in"):  # a config-only folder is enough for --dry_run only
        sft.main(base_args(work, "noweights", "--model_name_or_path", str(shared / "models" / "qwen2.5-0.5b")))
    cfg, _ = sft.parse_args(["--use_lora", "false", "--lora_r", "64"])
    assert any("--lora_r" in w for w in sft.check_config(cfg))
    with pytest.raises(ERR, match="--max_steps"):
        sft.check_config(sft.parse_args(["--num_train_epochs", "0"])[0])
    job = tmp_path / "out" / "j"
    (job / "checkpoint-000001").mkdir(parents=True)
    (job / "config.json").write_text("{}")
    args = base_args(work, "j", "--max_steps", "1")
    args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    with pytest.raises(ERR, match="already holds a run.*--resume_from_checkpoint auto"):
        sft.main(args)
    assert sorted(p.name for p in job.iterdir()) == ["checkpoint-000001", "config.json"]  # untouched, unlocked


def test_overwrite_output_dir_starts_a_fresh_run_folder(tmp_path):
    job = tmp_path / "j"
    (job / "checkpoint-000001").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl", "train.log"):
        (job / name).write_text("old run\n")
    ck.clear_run_folder(job, keep_train_log=True)  # --log_file false: a wrapper is tee-ing into train.log
    assert sorted(p.name for p in job.iterdir()) == ["train.log"]
    (job / "config.json").write_text("{}")
    ck.clear_run_folder(job)
    assert list(job.iterdir()) == []


def test_dry_run_from_config_only_folders(shared, capsys):
    sft.main(["--dry_run", "--model_name_or_path", str(shared / "models" / "llama-2-7b"), "--lora_r", "128",
              "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj"])
    out = capsys.readouterr().out
    assert "134,217,728" in out  # LESS's Llama-2-7B r=128 q/k/v/o count
    assert "6,738,415,616" in out
    sft.main(["--dry_run", "--model_name_or_path", "Qwen/Qwen2.5-1.5B"])
    assert "1,543,714,304" in capsys.readouterr().out


# ----------------------------------------------------------------------------- training

def _train_in_process(work: Path, job: str, *extra: str):
    cfg, notes = sft.parse_args(base_args(work, job, "--eval_steps", "1000", *extra))
    ck.seed_everything(cfg.seed)
    run = sft.setup(cfg, sft.init_distributed(), notes)
    before = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    run.initial_eval = sft.evaluate(run)  # validation loss of the untrained model (fixed batches)
    sft.train(run)
    return run, before


def assert_loss_fell(run) -> None:
    ls = [x for _, x in losses(run.job_dir)]
    assert len(ls) == run.data.total_steps
    final = [json.loads(x) for x in (run.job_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert final[-1]["step"] == run.data.total_steps
    assert final[-1]["eval_loss"] < run.initial_eval["eval_loss"] - 0.05, (run.initial_eval, final[-1])


def test_lora_loss_falls_and_only_adapters_change(work):
    run, before = _train_in_process(work, "lora", "--max_steps", "16", "--save_steps", "8", "--lora_r", "8")
    assert_loss_fell(run)
    after = run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_B." in k for k in changed)
    ckpt = run.job_dir / "checkpoint-000016"
    assert ck.verify(ckpt) is None and (run.job_dir / ck.LATEST).read_text().strip() == ckpt.name
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "config.json").exists()  # an adapter folder, not a full model
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert meta["template"] == "boxed" and meta["step"] == 16


def test_loraplus_lr_ratio_scales_the_b_matrices_steps(work):
    """--loraplus_lr_ratio 8: the B matrices sit in their own optimizer group stepping at 8 x the lr. Adam's
    first update is lr x sign(grad), so after one step the zero-initialized B reaches |B| = 8 x lr exactly."""
    lr = 3e-3
    run, before = _train_in_process(work, "loraplus", "--max_steps", "1", "--save_strategy", "no", "--lora_r", "4",
                                    "--lora_dropout", "0", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
                                    "--loraplus_lr_ratio", "8")
    groups = {g.get("lr_ratio", 1.0): g for g in run.optim.param_groups}
    assert groups[8.0]["lr"] == pytest.approx(8 * lr) and groups[1.0]["lr"] == pytest.approx(lr)
    names = {id(p): n for n, p in run.model.named_parameters()}
    assert {names[id(p)] for p in groups[8.0]["params"]} == {n for n, _ in run.named if ".lora_B" in n}
    after = run.model.state_dict()
    b = [k for k in after if ".lora_B." in k]
    assert max((after[k] - before[k]).abs().max().item() for k in b) == pytest.approx(8 * lr, rel=1e-3)


MTS_ARGS = ("--lora_r", "4", "--lora_modules_to_save", "embed_tokens", "norm")


def test_lora_modules_to_save_trains_saves_and_loads_in_evalmath(work):
    """--lora_modules_to_save: the adapters and those modules train (the tiny Qwen2 ties lm_head to
    embed_tokens, so the head moves with them), nothing else; the adapter file holds them under PEFT's keys,
    the state shard holds their optimizer moments, and evalmath loads the checkpoint (base + adapter) to the
    very logits of the trained model."""
    import evalmodel

    run, before = _train_in_process(work, "mts", "--max_steps", "6", "--save_steps", "6", *MTS_ARGS)
    assert_loss_fell(run)
    saved = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
             *(f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm"))}
    after = run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".lora_" in k} | saved
    ckpt = run.job_dir / "checkpoint-000006"
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert {k for k in adapter if ".lora_" not in k} == {"base_model.model." + k for k in saved}
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens", "norm", "lm_head"]  # tied: both names of one weight
    st = state(ckpt)
    assert {"model.model.embed_tokens.weight", "optim.model.embed_tokens.weight.exp_avg",
            "optim.model.norm.weight.exp_avg_sq"} <= set(st)

    model, _ = evalmodel.load_model(evalmodel.resolve_model(str(ckpt)), torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), run.model.eval()(ids), atol=1e-5, rtol=0)


def test_lora_modules_to_save_resume_is_exact(work):
    """Killed after step 3 and resumed from checkpoint 2: the saved modules' weights and optimizer moments
    come back, so losses and final state equal the uninterrupted run's."""
    out = work / "out"
    ref = base_args(work, "mts_ref", "--max_steps", "4", "--save_steps", "2", "--lora_dropout", "0.1", *MTS_ARGS)
    sft.main(ref)
    kill = with_job(ref, "mts_kill")
    assert run_sft(kill, kill_at="3", check=False).returncode == -signal.SIGKILL
    p = run_sft(kill + ["--resume_from_checkpoint", "auto"])
    assert "checkpoint-000002 at step 2" in p.stdout
    assert losses(out / "mts_kill") == losses(out / "mts_ref") and len(losses(out / "mts_ref")) == 4
    a, b = state(out / "mts_kill" / "checkpoint-000004"), state(out / "mts_ref" / "checkpoint-000004")
    assert "model.model.embed_tokens.weight" in a
    assert_same_state(a, b)


def test_save_merged_writes_an_hf_model_equal_to_base_plus_adapter(work):
    from transformers import AutoModelForCausalLM

    import lora

    run, _ = _train_in_process(work, "merged", "--max_steps", "2", "--lora_r", "4", "--save_merged")
    merged_dir = run.job_dir / "checkpoint-000002" / "merged"
    hf = AutoModelForCausalLM.from_pretrained(merged_dir)
    expected = lora.merged_state_dict(run.model.state_dict(), run.lcfg)
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6)
    assert (merged_dir / "tokenizer.json").read_bytes() == (work / "tiny" / "tokenizer.json").read_bytes()


def test_full_finetune_loss_falls_and_exports_hf(work):
    run, before = _train_in_process(work, "full", "--use_lora", "false", "--max_steps", "12",
                                    "--save_strategy", "no", "--learning_rate", "2e-3")
    assert_loss_fell(run)
    ckpt = run.job_dir / "checkpoint-000012"  # the last step is always saved
    assert ck.verify(ckpt) is None
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    ours = run.model.state_dict()
    for k, v in hf.state_dict().items():
        assert torch.equal(v, ours[k]), k
    tok_src = work / "tiny" / "tokenizer.json"
    assert (ckpt / "tokenizer.json").read_bytes() == tok_src.read_bytes()


def with_job(args: list[str], job: str) -> list[str]:
    i = args.index("--job_name")
    return args[:i + 1] + [job] + args[i + 2:]


@pytest.fixture(scope="module")
def reference(work) -> list[str]:
    """An uninterrupted 8-step LoRA run (dropout on, so the RNG state matters) to compare resumes with."""
    args = base_args(work, "ref", "--max_steps", "8", "--save_steps", "3", "--lora_r", "4", "--lora_dropout", "0.1")
    sft.main(args)  # in this process: the same computation as `python sft.py` (one thread), without a start-up
    return args


def test_exact_resume_after_sigkill_and_kill_during_save(work, reference):
    """Killed while writing checkpoint 6 (that folder is skipped: resume from 3), then killed right after
    step 7 (resume from 6): the losses and final weights and optimizer state equal the uninterrupted run."""
    out, args = work / "out", with_job(reference, "kill")
    p = run_sft(args, kill_at="6:during_save", check=False)
    assert p.returncode == -signal.SIGKILL
    assert (out / "kill" / ".tmp-checkpoint-000006").is_dir() and not (out / "kill" / "checkpoint-000006").exists()
    p = run_sft(args + ["--resume_from_checkpoint", "auto"], kill_at="7", check=False)
    assert p.returncode == -signal.SIGKILL
    assert "skipping .tmp-checkpoint-000006" in p.stdout and "resumed from" in p.stdout
    assert "checkpoint-000003 at step 3" in p.stdout
    p = run_sft(args + ["--resume_from_checkpoint", "auto"])
    assert "checkpoint-000006 at step 6" in p.stdout
    assert losses(out / "kill") == losses(out / "ref") and len(losses(out / "ref")) == 8
    assert_same_state(state(out / "kill" / "checkpoint-000008"), state(out / "ref" / "checkpoint-000008"))
    ref_adapter = load_file(str(out / "ref" / "checkpoint-000008" / "adapter_model.safetensors"))
    kill_adapter = load_file(str(out / "kill" / "checkpoint-000008" / "adapter_model.safetensors"))
    assert all(torch.equal(ref_adapter[k], kill_adapter[k]) for k in ref_adapter)


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_exactly(work, reference):
    args = with_job(reference, "term")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, str(REPO / "sft.py"), *args, "--max_steps", "400"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = work / "out" / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert "stopping on a signal" in out
    stopped = ck.list_checkpoints(work / "out" / "term")[-1][0]
    assert 2 <= stopped < 400 and ck.verify(ck.list_checkpoints(work / "out" / "term")[-1][1]) is None
    # continue the same 400-step schedule for a few steps (the kill hook ends both runs at stopped + 3,
    # after checkpoint stopped + 2) and compare with an uninterrupted run of that schedule
    more = ["--max_steps", "400", "--save_steps", str(stopped + 2)]
    run_sft(args + more + ["--resume_from_checkpoint", "auto"], kill_at=str(stopped + 3), check=False)
    run_sft(with_job(reference, "term_ref") + more, kill_at=str(stopped + 3), check=False)
    a, b = losses(work / "out" / "term"), losses(work / "out" / "term_ref")
    assert a == b
    name = ck.checkpoint_name(stopped + 2)
    assert_same_state(state(work / "out" / "term" / name), state(work / "out" / "term_ref" / name))


def test_less_mode_checkpoint_files(work):
    from lora import PEFT_071_KEYS, peft_param_name

    script = REPO / "scripts" / "train" / "base_training_args.sh"
    flags = subprocess.run(["bash", "-c", f'source "{script}"; echo "$base_training_args"'], capture_output=True,
                           text=True, check=True).stdout.strip()
    job_dir = work / "out" / "less-lora"
    sft.main(shlex.split(flags) + [
        "--model_name_or_path", str(work / "tiny"), "--output_dir", str(job_dir), "--train_files",
        str(work / "tulu.jsonl"), "--data_cache_dir", str(work / "cache"), "--report_to", "none",
        "--num_train_epochs", "2", "--gradient_accumulation_steps", "8", "--lora_r", "8", "--max_seq_length", "256",
        "--num_threads", "1"])
    names = sorted(p.name for p in job_dir.glob("checkpoint-*"))
    assert names == ["checkpoint-12", "checkpoint-6"]  # 48 examples / 8 = 6 updates per epoch, one per epoch
    ckpt = job_dir / "checkpoint-12"
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert set(cfg) <= PEFT_071_KEYS and cfg["peft_type"] == "LORA" and cfg["r"] == 8
    assert cfg["base_model_name_or_path"] == str((work / "tiny").resolve())
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all(k.startswith("base_model.model.") and ".default." not in k for k in adapter)
    assert not any("embed_tokens" in k or "lm_head" in k for k in adapter)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / name).read_bytes() == (work / "tiny" / name).read_bytes()
    opt = torch.load(ckpt / "optimizer.bin", map_location="cpu", weights_only=True)
    expected = {peft_param_name(k.removeprefix("base_model.model.")): v for k, v in adapter.items()}
    assert set(opt["state"]) == set(expected)
    for name, t in expected.items():
        assert ".default." in name
        st = opt["state"][name]
        assert st["exp_avg"].shape == t.shape and st["exp_avg_sq"].shape == t.shape
        assert st["exp_avg_sq"].abs().sum() > 0
    g = opt["param_groups"][0]
    assert tuple(g["betas"]) == (0.9, 0.999) and g["eps"] == 1e-8


@pytest.mark.parametrize("mode", [["--lora_r", "4", "--lora_dropout", "0"], ["--use_lora", "false"],
                                  ["--lora_r", "4", "--lora_dropout", "0", "--lora_target_modules", "q_proj", "lm_head"]],
                         ids=["lora", "full", "lora-head"])
def test_chunked_loss_equals_full_logits_loss(work, mode):
    """--loss_chunk_tokens > 0 (fused linear cross-entropy for a plain head, checkpointed chunks for a
    LoRA-targeted one) gives the loss and gradients of full logits, including the head's own gradient."""
    cfg, notes = sft.parse_args(base_args(work, "chunk-" + mode[-1], "--max_steps", "1", *mode))
    run = sft.setup(cfg, sft.init_distributed(), notes)
    batch = run.data.train.batch(0, 0)
    head_trained = any(n.endswith(("lm_head.weight", "embed_tokens.weight")) for n, _ in run.named)
    assert head_trained == (mode[1] == "false")
    results = []
    for chunk in (0, 7, 100000):
        run.cfg.loss_chunk_tokens = chunk
        loss = sft.loss_sum(run, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in run.named}))
        run.optim.zero_grad(set_to_none=True)
    for other in results[1:]:
        torch.testing.assert_close(results[0][0], other[0], rtol=1e-5, atol=1e-4)
        for n in results[0][1]:
            torch.testing.assert_close(results[0][1][n], other[1][n], rtol=1e-4, atol=1e-5)


def test_fused_adamw_skips_a_non_finite_step_on_the_device(work):
    """The CUDA path (fused AdamW, found_inf set from the device-side ok flag, no host read) on CPU: a step
    with a non-finite loss leaves weights and optimizer state bitwise alone, the next finite step updates."""
    import packing

    cfg, notes = sft.parse_args(base_args(work, "fused", "--max_steps", "2"))
    run = sft.setup(cfg, sft.init_distributed(), notes)
    run.optim = torch.optim.AdamW([p for _, p in run.named], lr=1e-2, fused=True)
    run.sched = lambda step: 1e-2  # no warm-up: every good step moves the weights
    micro = [packing.to_device(run.data.train.batch(0, 0), "cpu")]
    sft.train_step(run, micro)
    before = {n: p.detach().clone() for n, p in run.named}
    moments = {id(p): {k: v.clone() for k, v in run.optim.state[p].items()} for _, p in run.named}
    name, p0 = run.named[0]
    keep = p0.detach().clone()
    with torch.no_grad():
        p0.fill_(float("inf"))
    bad = sft.read_step(sft.train_step(run, micro))
    assert not bad["ok"] and torch.isinf(p0).all()
    with torch.no_grad():
        p0.copy_(keep)
    before[name] = keep
    assert all(torch.equal(p, before[n]) for n, p in run.named)
    assert all(torch.equal(run.optim.state[p][k], moments[id(p)][k]) for _, p in run.named for k in moments[id(p)])
    good = sft.read_step(sft.train_step(run, micro))
    assert good["ok"] and not torch.equal(run.named[0][1], before[name])


def test_non_finite_steps_are_skipped_then_abort(work):
    """lr 1e30 blows the weights up after step 1: later losses are NaN, their updates are skipped, and
    --max_bad_steps in a row stop the run with a clear error; the checkpoints hold finite weights."""
    with pytest.raises(UserError, match="3 non-finite steps in a row"):
        _train_in_process(work, "nan", "--max_steps", "10", "--save_steps", "2", "--learning_rate", "1e30",
                          "--lora_r", "4", "--max_bad_steps", "3", "--max_grad_norm", "0")
    job = work / "out" / "nan"
    log = (job / "train.log").read_text()
    assert "update skipped (1 in a row" in log and "update skipped (3 in a row" in log
    path, _ = ck.find_resumable(job)
    assert path is not None and all(torch.isfinite(v).all() for v in state(path).values())


def test_early_stopping_and_best_on_accuracy(work):
    """In-training accuracy through evalmath: an untrained tiny model scores 0 on every evaluation, so the
    first evaluation is the best (checkpoint-best) and with patience 1 the run stops at the second one."""
    run, _ = _train_in_process(work, "early", "--max_steps", "40", "--lora_r", "4", "--eval_steps", "2",
                               "--eval_accuracy_samples", "2", "--eval_max_new_tokens", "4", "--metric_for_best",
                               "accuracy", "--early_stopping_patience", "1", "--save_steps", "1000")
    assert run.st.step == 4 and run.st.best_step == 2 and run.last_eval["eval_accuracy"] == 0.0
    assert "early stopping at step 4" in (run.job_dir / "train.log").read_text()
    assert ck.best_target(run.job_dir) == "checkpoint-000002"
    assert (run.job_dir / "checkpoint-000004").is_dir()  # the stopping step is saved too


@pytest.mark.slow
def test_less_lora_train_script_end_to_end(work):
    env = {**os.environ, "OUTPUT_ROOT": str(work / "out"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(REPO / "scripts" / "train" / "lora_train.sh"), str(work / "tulu.jsonl"),
                        str(work / "tiny"), "less-script", "--num_train_epochs", "1", "--gradient_accumulation_steps",
                        "16", "--lora_r", "4", "--max_seq_length", "512", "--report_to", "none", "--data_cache_dir",
                        str(work / "cache")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job = work / "out" / "less-script"
    log = (job / "train.log").read_text()
    assert "LESS flags translated to" in log and "saved checkpoint-3" in log
    assert log.count("saved checkpoint-3") == 1  # the tee is the only writer of train.log
    assert {"adapter_model.safetensors", "optimizer.bin", "tokenizer.json"} <= {x.name for x in (job / "checkpoint-3").iterdir()}


def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(work, capsys):
    """Two sft.py on one run folder: the second (`--resume_from_checkpoint auto`, `--overwrite_output_dir`) stops
    with one line naming the holder and touches nothing; the first finishes undisturbed. A lock left by a dead
    process is reported and taken over."""
    args = base_args(work, "locked", "--max_steps", "400", "--save_steps", "1000", "--lora_r", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([PY, str(REPO / "sft.py"), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    job = work / "out" / "locked"
    try:
        for line in first.stdout:
            if "step 1/400" in line:
                break
        for extra in (["--resume_from_checkpoint", "auto"], ["--overwrite_output_dir", "true"]):
            line = _one_line_error(args + extra, capsys)
            assert f"in use by pid {first.pid}" in line, line
        assert (job / "metrics.jsonl").is_file() and (job / ck.LOCK).is_file()
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and "stopping on a signal" in out, out[-2000:]
    steps = [s for s, _ in losses(job)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved records
    assert not (job / ck.LOCK).exists()
    # a lock from a process that no longer runs (pid of a finished child) is reported and taken over
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (job / ck.LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "started": "x"}))
    sft.main(args + ["--resume_from_checkpoint", "auto", "--max_steps", "1"])
    log = (job / "train.log").read_text()
    assert "removed a stale lock" in log and f"pid {int(dead.stdout)}" in log


def test_auto_resume_with_every_checkpoint_damaged_moves_them_aside(work):
    """`auto` when no checkpoint is complete: the damaged folders, `latest` and the old metrics.jsonl move into
    a named damaged-* folder (nothing overwritten or deleted), and the new run starts a new metrics file."""
    args = base_args(work, "alldamaged", "--max_steps", "2", "--save_steps", "1", "--lora_r", "4",
                     "--save_total_limit", "0")
    sft.main(args)
    job = work / "out" / "alldamaged"
    for _, path in ck.list_checkpoints(job):
        (path / "trainer_state.json").write_text("{}")  # damaged: size differs from the manifest
    old_metrics = (job / "metrics.jsonl").read_text()
    sft.main(args + ["--resume_from_checkpoint", "auto"])
    aside = list(job.glob("damaged-*"))
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-000001", "checkpoint-000002", "checkpoint-best",
                                                          "latest", "metrics.jsonl"]
    assert (aside[0] / "metrics.jsonl").read_text() == old_metrics
    assert (aside[0] / "checkpoint-000001" / "trainer_state.json").read_text() == "{}"
    assert [s for s, _ in losses(job)] == [1, 2] and ck.verify(job / "checkpoint-000002") is None
    log = (job / "train.log").read_text()
    assert f"into {aside[0]}" in log
    assert "data: " in log and "bad rows skipped" in log  # the data counts reach train.log, not only report.md
    # resumed with another --max_steps: the run says that the schedule was recomputed
    sft.main(args + ["--resume_from_checkpoint", "auto", "--max_steps", "3"])
    assert "the schedule was recomputed: 3 total steps now" in (job / "train.log").read_text()
    assert [s for s, _ in losses(job)] == [1, 2, 3]


def _one_line_error(argv: list[str], capsys) -> str:
    """Run sft.py's main through cli.run_main (as `python sft.py` does): the exit status is 2 and stderr holds
    exactly one line, no traceback. Returns that line."""
    import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_main(sft.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_user_mistakes_end_in_one_line_and_write_nothing(work, tmp_path, capsys):
    """Bad flags, a config.json that is not JSON, an unsupported architecture or RoPE type, a truncated or
    random-bytes model.safetensors: one line naming the flag or file, exit status 2, and nothing written into
    the run folder (so the corrected command runs there without --overwrite_output_dir)."""
    import shutil

    out = tmp_path / "out"

    def args(model, *extra):
        a = base_args(work, "bad", "--max_steps", "1", "--model_name_or_path", str(model), *extra)
        a[a.index("--output_dir") + 1] = str(out)
        return a

    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(work / "tiny", folder)
        edit(folder)
        return folder

    config = json.loads((work / "tiny" / "config.json").read_text())
    weights = (work / "tiny" / "model.safetensors").read_bytes()
    cases = [
        (args(work / "tiny", "--learning_rate", "-1e-3"), "--learning_rate must be > 0"),
        (args(work / "tiny", "--lora_r", "0"), "--lora_r must be >= 1"),
        (args(broken("notjson", lambda f: (f / "config.json").write_text('{"model_type": qwen2}'))),
         "not valid JSON at line 1, column 16"),
        (args(broken("gpt2", lambda f: (f / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"})))),
         "unsupported model_type 'gpt2'"),
        (args(broken("yarn", lambda f: (f / "config.json").write_text(json.dumps(
            {**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})))), "unsupported rope_type 'yarn'"),
        (args(broken("truncated", lambda f: (f / "model.safetensors").write_bytes(weights[:len(weights) // 2]))),
         "truncated or damaged"),
        (args(broken("random", lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096)))),
         "truncated or damaged"),
    ]
    for argv, expected in cases:
        line = _one_line_error(argv, capsys)
        assert line.startswith("error: ") and expected in line, (expected, line)
        assert not (out / "bad").exists() or list((out / "bad").iterdir()) == [], list((out / "bad").iterdir())
    # the real command line: the same one line from `python sft.py`
    p = run_sft(cases[-1][0], check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "truncated or damaged" in p.stderr and "Traceback" not in p.stderr


def test_a_failed_start_does_not_block_the_retry(work, tmp_path, capsys):
    """A first run that fails on its data (no such data folder) leaves nothing in the run folder: the corrected
    command starts there, without --overwrite_output_dir."""
    out = tmp_path / "out"
    bad = ["--model_name_or_path", str(work / "tiny"), "--datasets", "gsm8k", "--data_dir", str(tmp_path / "nodata"),
           "--output_dir", str(out), "--job_name", "retry", "--max_steps", "1", "--num_threads", "1",
           "--data_cache_dir", str(work / "cache"), "--lora_r", "4"]
    line = _one_line_error(bad, capsys)
    assert "nodata" in line
    good = base_args(work, "retry", "--max_steps", "1", "--lora_r", "4")
    good[good.index("--output_dir") + 1] = str(out)
    sft.main(good)
    assert ck.verify(out / "retry" / "checkpoint-000001") is None and not (out / "retry" / ck.LOCK).exists()
    # a run that wrote its config but died before its first save: restartable as is, and it says so
    (out / "retry2").mkdir()
    (out / "retry2" / "config.json").write_text("{}")
    (out / "retry2" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    sft.main(with_job(good, "retry2"))
    log = (out / "retry2" / "train.log").read_text()
    assert "saved no checkpoint: starting it again" in log and [s for s, _ in losses(out / "retry2")] == [1]


def test_ctrl_c_during_evaluation_saves_and_resumes_exactly(work, reference):
    """SIGINT while the in-training evaluation decodes: acknowledged at once, the evaluation stops at a batch
    boundary (no result is logged for it), the step is saved, exit status 0; resuming gives the losses and
    final state of an uninterrupted run. A second Ctrl-C stops at once: one line, status 130, lock released."""
    extra = ["--max_steps", "4", "--eval_steps", "2", "--eval_accuracy_samples", "16", "--eval_max_new_tokens", "256",
             "--valid_fraction", "0.5"]
    args = with_job(reference, "sigint") + extra
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, str(REPO / "sft.py"), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "evaluating at step 2" in line:  # printed as the evaluation starts
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stopping: finishing the current batch, then saving; press Ctrl-C again" in err
    assert "stopping on a signal at step 2" in out and "eval step 2:" not in out
    job = work / "out" / "sigint"
    assert ck.verify(job / "checkpoint-000002") is None
    sft.main(args + ["--resume_from_checkpoint", "auto", "--eval_accuracy_samples", "0"])
    sft.main(with_job(reference, "sigint_ref") + extra + ["--eval_accuracy_samples", "0"])
    assert losses(job) == losses(work / "out" / "sigint_ref")
    assert_same_state(state(job / "checkpoint-000004"), state(work / "out" / "sigint_ref" / "checkpoint-000004"))
    # twice: stop at once without saving, no traceback
    proc = subprocess.Popen([PY, str(REPO / "sft.py"), *with_job(reference, "sigint2"), "--max_steps", "400"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "step 1/400" in line:
            proc.send_signal(signal.SIGINT)
            break
    for line in proc.stderr:  # the second Ctrl-C once the first is acknowledged, while the step still runs
        if line.startswith("[") and "stopping:" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted")
    assert not (work / "out" / "sigint2" / ck.LOCK).exists()


@pytest.mark.slow
@pytest.mark.parametrize("mts", [(), MTS_ARGS], ids=["lora", "lora-modules_to_save"])
def test_torchrun_two_processes_match_one(work, mts):
    extra = ("--max_steps", "6", "--save_steps", "3", "--lora_dropout", "0", "--gradient_accumulation_steps", "2",
             *mts)
    j1, j2 = ("one-mts", "two-mts") if mts else ("one", "two")
    one = base_args(work, j1, *extra)
    two = base_args(work, j2, *extra)
    one[one.index("--per_device_train_batch_size") + 1] = "2"  # same global batch as 1 x 2 ranks (x 2 accum)
    run_sft(one)
    p = run_sft(two, nproc=2)
    assert "FSDP2 over 2 ranks (gloo)" in p.stdout
    out = work / "out"
    ckpt = out / j2 / "checkpoint-000006"
    assert ck.verify(ckpt) is None and (ckpt / "state-rank00001-of-00002.safetensors").is_file()
    a, b = losses(out / j1), losses(out / j2)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b))
    ad1 = load_file(str(out / j1 / "checkpoint-000006" / "adapter_model.safetensors"))
    ad2 = load_file(str(ckpt / "adapter_model.safetensors"))
    assert ad1.keys() == ad2.keys()
    assert bool(mts) == ("base_model.model.model.embed_tokens.weight" in ad2)  # gathered from the FSDP shards
    for k in ad1:
        torch.testing.assert_close(ad1[k], ad2[k], rtol=1e-4, atol=1e-4)
    # resume the 2-rank checkpoint on 1 process: re-chunked state, same continuation (no dropout)
    import shutil

    shutil.rmtree(out / j2 / "checkpoint-000006")
    p = run_sft(with_job(one, j2) + ["--resume_from_checkpoint", "auto"])  # 2 rows per step again
    assert "written by 2 ranks" in p.stdout
    assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, losses(out / j2)))


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous_match_one_process(work):
    """`torchrun --nnodes 2 --nproc_per_node 1` started twice (two "nodes" on localhost, c10d rendezvous, gloo)
    gives the losses of one process with the same global batch."""
    import socket

    extra = ("--max_steps", "4", "--save_strategy", "no", "--lora_dropout", "0")
    one = base_args(work, "nodes-one", *extra)
    one[one.index("--per_device_train_batch_size") + 1] = "2"
    run_sft(one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "mathsft-test", str(REPO / "sft.py"),
              *base_args(work, "nodes-two", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(launch, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-3000:] for o in outs)
    assert any("FSDP2 over 2 ranks (gloo)" in o for o in outs)
    a, b = losses(work / "out" / "nodes-one"), losses(work / "out" / "nodes-two")
    assert [s for s, _ in a] == [s for s, _ in b] and all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b))
