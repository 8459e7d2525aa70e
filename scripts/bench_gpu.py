"""The GPU benchmark: evalmath's decoder vs transformers `generate`, evalmath end to end, and the training rows.

    python scripts/bench_gpu.py                 # Qwen2.5-0.5B shape; meant to take <= 6 minutes on one H200
    python scripts/bench_gpu.py --big           # + the Llama-3-8B shape (decode rows, after the others; raise
                                                #   --budget_s so they are not skipped)
    python scripts/bench_gpu.py --smoke         # tiny shapes, a few tokens: checks the script itself (CPU is fine)
    make bench-gpu [ARGS="--big"]

Needs the repository, torch and transformers on a CUDA machine; no network, no tyro. Models are random-init
(speed and memory are real, outputs are not). Assets come from ../shared or, on a machine without it, from the
git-ignored folder gpu_assets/ with the same layout (see docs/benchmarks.md, "GPU benchmark"):
    gpu_assets/models/qwen2.5-0.5b/   config.json, generation_config.json, tokenizer_config.json, vocab.json,
                                      merges.txt (the tokenizer files of ../shared/models/qwen2.5-0.5b)
    gpu_assets/data/gsm8k/test.jsonl  (a copy of ../shared/data/gsm8k/test.jsonl)

Rows (bf16, greedy, GSM8K test questions in the `boxed` template, EOS disabled so every row makes exactly
--new_tokens tokens, `torch.cuda.synchronize()` around each timed call, one warm-up call per decoder):
  - decode: tokens/s of `decode.generate` (evalmath's decoder: CUDA-graph step) at 64 slots and at "auto" slots,
    and of transformers `generate` on the same prompts left-padded, at batch 64 and at the auto slot count
  - evalmath: seconds of `evalmath.run` (model load included) on the first --eval_problems GSM8K test problems,
    --eval_new_tokens new tokens at most, batch_size auto (EOS on, as in real use)
  - training: the rows of scripts/bench_gpu_train.py's `training_rows(args)` when that file exists
Prints a Markdown section and appends it to --out (docs/benchmarks.md). A section that fails or would pass
--budget_s is reported as such and the rest still runs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import decode  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

QWEN_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=32768)
LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=5e5, rms_norm_eps=1e-5,
                 max_position_embeddings=8192)
SMOKE = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True, qkv_bias=True)


def find_assets(explicit: Path | None) -> Path:
    """The folder holding models/qwen2.5-0.5b (tokenizer) and data/gsm8k/test.jsonl."""
    candidates = [explicit] if explicit else [REPO.parent / "shared", REPO / "gpu_assets"]
    for root in candidates:
        if (root / "models/qwen2.5-0.5b/vocab.json").is_file() and (root / "data/gsm8k/test.jsonl").is_file():
            return root
    raise SystemExit(f"error: no assets in {' or '.join(map(str, candidates))}: expected models/qwen2.5-0.5b/ "
                     "(tokenizer files) and data/gsm8k/test.jsonl; fill gpu_assets/ as docs/benchmarks.md "
                     "('GPU benchmark') says, or pass --assets DIR")


def build(shape: dict, vocab: int, tok, device, dtype, seed: int = 0, with_hf: bool = True):
    """(ours, transformers or None) with the same random weights, built on the device (no files)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    args = ModelArgs(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, dtype=str(dtype).removeprefix("torch."), **shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    ours = Transformer.from_args(args, device=device, dtype=dtype, generator=gen).eval()
    if not with_hf:
        return ours, None
    cfg = args.to_hf_config()
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k and k != "lm_head.weight"]:
        raise RuntimeError(f"transformers model keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return ours, hf


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ours(model, prompts, new_tokens, slots, pad, device) -> dict:
    decode.generate(model, prompts[:8], 4, [], slots=slots, pad_id=pad)  # warm-up (kernels, cuBLAS)
    sync(device)
    t0 = time.perf_counter()
    outs = decode.generate(model, prompts, new_tokens, [], slots=slots, pad_id=pad)
    sync(device)
    dt = time.perf_counter() - t0
    n_slots = decode.pick_slots(model, decode.cache_len(model, prompts, new_tokens), len(prompts), slots)
    return {"tokens": sum(len(o.tokens) for o in outs), "seconds": dt, "slots": n_slots,
            "first16": [o.tokens[:16] for o in outs]}


def time_hf(hf, prompts, new_tokens, batch, pad, device) -> dict:
    def run(rows, n):
        P = max(len(p) for p in rows)
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in rows], device=device)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in rows], device=device)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=pad)
        return out[:, P:].tolist()

    run(prompts[:8], 4)
    sync(device)
    t0, toks = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        toks += run(prompts[i:i + batch], new_tokens)
    sync(device)
    return {"tokens": sum(map(len, toks)), "seconds": time.perf_counter() - t0, "slots": batch,
            "first16": [t[:16] for t in toks]}


def decode_rows(label: str, shape: dict, a, tok, questions, device, dtype, deadline: float) -> list[dict]:
    """Ours at 64 and auto slots vs transformers at 64 and the auto slot count, on the same prompts."""
    ours, hf = build(shape, a.vocab, tok, device, dtype)
    tpl = data.load_template("boxed")
    prompts = [data.encode_prompt(tpl, q, tok) for q in questions]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n64 = prompts[:a.prompts_64]
    auto = decode.pick_slots(ours, decode.cache_len(ours, prompts, a.new_tokens), len(prompts))
    plan = [("ours", a.batch, n64), ("transformers", a.batch, n64), ("ours", "auto", prompts),
            ("transformers", min(auto, a.hf_max_batch), prompts[:min(auto, a.hf_max_batch)])]
    rows, ref = [], {}
    for who, batch, ps in plan:
        row = {"section": "decode", "model": label, "decoder": who, "batch": batch, "prompts": len(ps)}
        if time.time() > deadline:
            rows.append(row | {"note": "skipped: --budget_s reached"})
            continue
        try:
            r = (time_ours(ours, ps, a.new_tokens, batch, pad, device) if who == "ours"
                 else time_hf(hf, ps, a.new_tokens, batch, pad, device))
        except Exception as e:  # noqa: BLE001 - unattended: report and go on
            traceback.print_exc()
            rows.append(row | {"note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        key = (len(ps), who)
        ref[key] = r["first16"]
        other = ref.get((len(ps), "ours" if who == "transformers" else "transformers"))
        agree = None if other is None else sum(x == y for x, y in zip(r["first16"], other)) / len(other)
        rows.append(row | {"batch": r["slots"], "tokens": r["tokens"], "seconds": round(r["seconds"], 2),
                           "tok_s": round(r["tokens"] / r["seconds"], 1),
                           "note": "" if agree is None else f"first 16 tokens equal in {100 * agree:.0f}% of rows"})
        print(rows[-1], flush=True)
    del ours, hf
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def evalmath_row(a, assets: Path, tok, device, dtype, deadline: float) -> dict:
    """evalmath.run on the first --eval_problems GSM8K test problems (0.5B shape saved to a temporary folder)."""
    import evalmath

    row = {"section": "evalmath", "model": "qwen2.5-0.5b shape" if not a.smoke else "smoke", "decoder": "evalmath.py",
           "batch": "auto", "prompts": a.eval_problems}
    if time.time() > deadline:
        return row | {"note": "skipped: --budget_s reached"}
    with tempfile.TemporaryDirectory() as work:
        ours, _ = build(SMOKE if a.smoke else QWEN_05B, a.vocab, tok, device, dtype, with_hf=False)
        ours.generation_config = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        ours.save_pretrained(Path(work) / "m")
        tok.save_pretrained(Path(work) / "m")
        del ours
        cfg = evalmath.EvalConfig(model=str(Path(work) / "m"), datasets=("gsm8k",), data_dir=str(assets / "data"),
                                  limit=a.eval_problems, max_new_tokens=a.eval_new_tokens, template="boxed",
                                  device=str(device), output_dir=str(Path(work) / "eval"), write_report=False)
        t0 = time.perf_counter()
        (path,) = evalmath.run(cfg)
        dt = time.perf_counter() - t0
        timing = json.loads(path.read_text())["timing"]
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return row | {"tokens": timing["generated_tokens"], "seconds": round(dt, 2),
                  "tok_s": round(timing["generated_tokens"] / dt, 1),
                  "note": f"max {a.eval_new_tokens} new tokens, EOS on; decoding alone {timing['seconds']:.1f}s"}


def training_rows(a) -> list[dict]:
    """Rows of scripts/bench_gpu_train.py (the training-throughput benchmark), when it exists."""
    path = REPO / "scripts" / "bench_gpu_train.py"
    if not path.is_file():
        print("training rows skipped: scripts/bench_gpu_train.py not found", flush=True)
        return [{"section": "training", "note": "skipped: scripts/bench_gpu_train.py not found"}]
    sys.path.insert(0, str(path.parent))
    try:
        import bench_gpu_train

        return [{"section": "training"} | r for r in bench_gpu_train.training_rows(a)]
    except Exception as e:  # noqa: BLE001 - unattended: report and go on
        traceback.print_exc()
        return [{"section": "training", "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}]


def markdown(rows: list[dict], a, argv: list[str], device) -> str:
    import transformers

    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else f"no GPU ({device})"
    cols = ["section", "model", "decoder", "batch", "prompts", "tokens", "seconds", "tok_s", "note"]
    extra = sorted({k for r in rows for k in r} - set(cols))
    head = cols[:-1] + extra + ["note"]
    lines = [f"## GPU benchmark, {_dt.datetime.now():%Y-%m-%d %H:%M}" + (" (smoke run)" if a.smoke else ""), "",
             f"Machine: {gpu}; {platform.platform()}; python {platform.python_version()}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}.",
             f"Command: `python scripts/bench_gpu.py {' '.join(argv)}`".rstrip() + ". Random-init models, bf16 on "
             f"GPU, greedy, GSM8K test prompts (`boxed` template); decode rows force {a.new_tokens} new tokens "
             "(EOS off); `batch` is the slot count (ours) or the batch size (transformers, left-padded).", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k, "")) for k in head) + " |")
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=None, help="folder with models/ and data/ (default: ../shared, "
                    "then gpu_assets/)")
    ap.add_argument("--big", action="store_true", help="also the Llama-3-8B shape (decode rows)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and a few tokens: checks the script")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="the fixed batch / slot count row")
    ap.add_argument("--prompts_64", type=int, default=128, help="prompts decoded in the fixed-batch rows")
    ap.add_argument("--prompts_auto", type=int, default=1024, help="prompts decoded in the auto rows")
    ap.add_argument("--hf_max_batch", type=int, default=256, help="cap of transformers' batch in the auto row")
    ap.add_argument("--eval_problems", type=int, default=512)
    ap.add_argument("--eval_new_tokens", type=int, default=512)
    ap.add_argument("--skip_train", action="store_true", help="leave out the training rows")
    ap.add_argument("--budget_s", type=float, default=330.0, help="sections that would start later are skipped")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="append the section here "
                    "('-': print only)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.new_tokens, a.batch, a.prompts_64, a.prompts_auto, a.hf_max_batch = 6, 4, 8, 12, 8
        a.eval_problems, a.eval_new_tokens = 6, 6
    return a


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    t_start = time.time()
    deadline = a.deadline = t_start + a.budget_s  # training_rows(a) may read a.deadline (time.time() seconds)
    from transformers import AutoTokenizer

    assets = find_assets(a.assets)
    tok = AutoTokenizer.from_pretrained(assets / "models/qwen2.5-0.5b")
    a.vocab = -(-len(tok) // 64) * 64 if a.smoke else 151936
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    questions = [r["question"] for r in data.load_records("gsm8k", "test", assets / "data")][:a.prompts_auto]
    rows = decode_rows("smoke" if a.smoke else "qwen2.5-0.5b shape", SMOKE if a.smoke else QWEN_05B, a, tok,
                       questions, device, dtype, deadline)
    try:
        rows.append(evalmath_row(a, assets, tok, device, dtype, deadline))
    except Exception as e:  # noqa: BLE001 - unattended: report and go on
        traceback.print_exc()
        rows.append({"section": "evalmath", "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
    print(rows[-1], flush=True)
    if a.big and not a.smoke:
        rows += decode_rows("llama-3-8b shape (Qwen tokenizer, vocab 151,936)", LLAMA3_8B, a, tok, questions,
                            device, dtype, deadline)
    if not a.skip_train:
        rows += training_rows(a)
    md = markdown(rows, a, argv, device) + f"\nTotal time of the script: {time.time() - t_start:.0f} s.\n"
    print(md)
    if str(a.out) != "-":
        with open(a.out, "a") as f:
            f.write("\n" + md)
        print(f"appended to {a.out}")


if __name__ == "__main__":
    main()
