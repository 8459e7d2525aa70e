"""Decoding throughput: evalmath's decoder (decode.py: static cache, continuous batching) vs transformers' generate.

Same weights, same prompts (GSM8K test questions in the `boxed` template), same max_new_tokens, greedy, fp32
on CPU. EOS is disabled on both sides so every row generates exactly max_new_tokens tokens (random-init
models would otherwise stop at different points). The two are timed alternately in one process; the
ratio is what to read, not the absolute numbers (the machine is shared).

    python scripts/bench_decode.py --shared ../shared [--batch_size 16] [--max_new_tokens 128]
        [--qwen_max_new_tokens 32] [--qwen_layers 4] [--repeats 3] [--baseline 03801a7]
        [--append docs/benchmarks.md]

--baseline REV adds a row for the decoder of an earlier commit (its model.py `generate`, read with
`git show REV:model.py`), timed in the same rounds: a side-by-side check that the CPU path did not get slower.

Models: `tiny` (make_tiny llama, 2 layers, hidden 64, its own 512-token BPE) and `qwen-shape`: the
Qwen2.5-0.5B config (hidden 896, 14/2 heads, intermediate 4864, vocab 151936, tied embeddings, qkv bias)
with random weights and the real Qwen2.5 tokenizer, truncated to --qwen_layers layers (24 in the real model)
to keep a CPU run short.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import evalmath  # noqa: E402
from maketiny import make_tiny  # noqa: E402
from model import Transformer  # noqa: E402

QWEN_SHAPE = dict(hidden=896, heads=14, kv_heads=2, intermediate=4864, vocab=151936)


def build_models(shared: Path, work: Path, qwen_layers: int) -> dict[str, Path]:
    return {"tiny": make_tiny(work / "tiny", arch="llama", seed=0),
            "qwen-shape": make_tiny(work / "qwen", arch="qwen2", tokenizer=shared / "models" / "qwen2.5-0.5b",
                                    seed=0, layers=qwen_layers, **QWEN_SHAPE)}


def load_baseline(rev: str, work: Path):
    """The `model` module of commit `rev` (its Transformer and generate), imported under another name."""
    import importlib.util
    import subprocess

    src = subprocess.run(["git", "show", f"{rev}:model.py"], cwd=REPO, capture_output=True, text=True, check=True)
    path = work / f"model_{rev}.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


def bench_one(path: Path, questions: list[str], batch_size: int, max_new_tokens: int, repeats: int,
              baseline=None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tpl = data.load_template("boxed")
    prompts = [data.encode_prompt(tpl, q, tok) for q in questions[:batch_size]]
    ours = Transformer.from_pretrained(path).eval()
    forwards = [0]
    ours.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])

    def run_ours():
        return evalmath.decode(ours, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, eos_ids=[])

    def run_hf():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)

    runners = {"evalmath": run_ours, "transformers": run_hf}
    if baseline is not None:
        old = baseline.Transformer.from_pretrained(path).eval()
        old.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        runners["baseline"] = lambda: baseline.generate(old, prompts, max_new_tokens, [], pad_id=pad)
    times: dict[str, list[float]] = {name: [] for name in runners}
    outs, n_fwd = {}, {}
    for rep in range(repeats + 1):  # the first round is a warm-up
        for name, fn in runners.items():
            forwards[0] = 0
            t0 = time.perf_counter()
            outs[name] = fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
            n_fwd[name] = forwards[0]
    hf_tokens = outs["transformers"][:, P:].tolist()
    n_tok = len(prompts) * max_new_tokens
    res = {"layers": ours.args.num_hidden_layers, "params_M": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
           "batch": len(prompts), "prompt_tokens_max": P, "max_new_tokens": max_new_tokens}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = {"seconds_median": round(med, 3), "tokens_per_s": round(n_tok / med, 1),
                     "problems_per_s": round(len(prompts) / med, 3)}
        if name != "transformers":
            res[name] |= {"same_tokens": [g.tokens for g in outs[name]] == hf_tokens, "forwards": n_fwd[name],
                          "speedup": round(statistics.median(times["transformers"]) / med, 2)}
    return res


def markdown(results: dict, args) -> str:
    lines = ["## Decoding", "",
             "evalmath's decoder (`evalmath.decode` -> `decode.generate`: static KV cache, continuous batching, "
             "eager step on CPU) vs transformers' batched `generate` (left-padded, `do_sample=False`), same "
             "weights/prompts/max_new_tokens, fp32, CPU, EOS disabled so every row generates max_new_tokens "
             f"tokens; timed alternately in one process (median of {args.repeats} after a warm-up). Prompts: GSM8K "
             "test questions in the `boxed` template. `baseline` is the decoder of commit "
             f"{args.baseline} (`model.generate`), when given; `forwards` counts model forwards incl. prefill.",
             "", f"command: `python scripts/bench_decode.py --shared ../shared --batch_size {args.batch_size} "
             f"--max_new_tokens {args.max_new_tokens} --qwen_max_new_tokens {args.qwen_max_new_tokens} "
             f"--qwen_layers {args.qwen_layers} --repeats {args.repeats}"
             + (f" --baseline {args.baseline}" if args.baseline else "")
             + (f" --threads {args.threads}" if args.threads else "") + "` "
             f"(torch {torch.__version__}, {torch.get_num_threads()} threads, shared 2-core machine)", "",
             "| model | layers | params | batch | new tokens | decoder | tok/s | problems/s | forwards | speedup vs "
             "transformers | same tokens as transformers |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        for dec in ["evalmath"] + (["baseline"] if args.baseline else []) + ["transformers"]:
            x = r[dec]
            lines.append(f"| {name} | {r['layers']} | {r['params_M']}M | {r['batch']} | {r['max_new_tokens']} | "
                         f"{dec} | {x['tokens_per_s']} | {x['problems_per_s']} | {x.get('forwards', '')} | "
                         f"{str(x['speedup']) + 'x' if 'speedup' in x else ''} | {x.get('same_tokens', '')} |")
    lines += ["", "`qwen-shape` is the Qwen2.5-0.5B config with random weights and the real tokenizer, cut to "
              f"{args.qwen_layers} of its 24 layers (CPU time); the 136M-parameter tied embedding / LM head is kept, "
              "so the per-token LM-head cost is the real one. Target: >= 2x at batch 16.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the shared material folder")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=128, help="for the tiny model")
    ap.add_argument("--qwen_max_new_tokens", type=int, default=32)
    ap.add_argument("--qwen_layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["tiny", "qwen-shape"])
    ap.add_argument("--baseline", default=None, help="also time the decoder of this git commit (model.generate)")
    ap.add_argument("--append", type=Path, default=None, help="append the markdown section to this file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    questions = [r["question"] for r in data.load_records("gsm8k", "test", args.shared / "data")]
    with tempfile.TemporaryDirectory() as work:
        paths = build_models(args.shared, Path(work), args.qwen_layers)
        baseline = load_baseline(args.baseline, Path(work)) if args.baseline else None
        results = {}
        for name in args.models:
            new_tokens = args.qwen_max_new_tokens if name == "qwen-shape" else args.max_new_tokens
            results[name] = bench_one(paths[name], questions, args.batch_size, new_tokens, args.repeats, baseline)
            print(json.dumps({name: results[name]}), flush=True)
    md = markdown(results, args)
    print(md)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + md)


if __name__ == "__main__":
    main()
