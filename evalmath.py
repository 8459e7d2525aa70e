"""evalmath: prompts -> KV-cached batched decoding -> extraction -> grading -> result JSON and reports.

    python evalmath.py --model PATH [--adapter PATH] --datasets gsm8k math math500 [--limit N] ...
    python evalmath.py --config configs/eval.yaml --model PATH --datasets gsm8k   # YAML defaults, flags win
    python evalmath.py --model outputs/checkpoints/JOB --datasets gsm8k          # run folder: checkpoint-best
    torchrun --standalone --nproc_per_node 2 evalmath.py --model PATH ...        # data-parallel: same results
    python evalmath.py grade --input preds.jsonl --output verdicts.jsonl          # re-grade without a model
    python evalmath.py report RUN [RUN ...] [--out outputs/reports/cmp.md]       # table + charts
    python evalmath.py review export RUN --out failures.csv                       # manual review
    python evalmath.py review import RUN --csv corrected.csv

Read top to bottom:
  1. protocols  - zero-shot CoT in the checkpoint's template (default), a no-CoT variant, and the few-shot
                  protocols of lm-evaluation-harness: gsm8k_cot (8 Wei et al. exemplars) and minerva_math
                  (4 Minerva exemplars); each has a versioned name written into the results
  2. config     - a typed dataclass; YAML defaults via --config (unknown keys are errors), flags override
  3. decoding   - decode.py's continuously batched static-cache decoder, stop strings, n samples, progress
  4. grading    - grader.grade on every response, per-item results, summary (reports.summarize)
  5. API        - evaluate_records(model, tokenizer, records, ...) for sft.py's in-training accuracy
  6. runs       - datasets -> result JSON (outputs/eval/<dataset>/<run_id>.json) + outputs/reports/<run_id>.md
  7. CLI        - the plain form and the grade / report / review subcommands
What to evaluate (model, checkpoint, LoRA adapter, run folder), its pre-flight and loading: evalmodel.py.

Model output is untrusted text: it is only matched with regexes and handed to grader.py (which never
evaluates it). Greedy results do not depend on the batch size or the number of ranks.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import difflib
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

import cli
import evalmodel
import reports
from cli import Bool, write_json
from model import pick_dtype

RESULT_FORMAT = "mathsft-eval-v1"
GRADER_DATASETS = ("gsm8k", "math")

# ----------------------------------------------------------------------------- 1. protocols

# lm-evaluation-harness `gsm8k_cot` (task version 3.0, lm_eval/tasks/gsm8k/gsm8k-cot.yaml): the 8 chain-of-
# thought exemplars of Wei et al. 2022, `first_n` sampler, doc_to_text "Q: {question}\nA:", target_delimiter
# " ", fewshot_delimiter "\n\n", until ["Q:", "</s>", "<|im_end|>"], greedy.
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
)

# lm-evaluation-harness `minerva_math_*` (lm_eval/tasks/minerva_math/utils.py, list_fewshot_samples): the 4
# Minerva (Lewkowycz et al. 2022) exemplars, verbatim, quirks included (the stray "}" in the first problem and
# the "\" + newline where LaTeX has "\\"). doc_to_text "Problem:\n{problem}\n\nSolution:", the exemplar target
# is the solution, target_delimiter " ", fewshot_delimiter "\n\n", until ["Problem:"], greedy.
MINERVA_MATH_EXEMPLARS: tuple[tuple[str, str], ...] = (
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
     "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives "
     "$x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is "
     "$[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
     "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
     "times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
     "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
     "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
     "\\begin{align*}\n30n&=480\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\n"
     "Final Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\n6y-9x &=b.\n\\end{align*}has a solution "
     "$(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we "
     "also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
     "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
)
GSM8K_STOPS = ("Q:", "</s>", "<|im_end|>")
MINERVA_STOPS = ("Problem:",)
# The zero-shot no-CoT variant (--cot false) swaps the templates' step-by-step instruction for this one.
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DIRECT_INSTRUCTION = "Give only the final answer within \\boxed{}, without any explanation."


@dataclass(frozen=True)
class Protocol:
    """How prompts are built and decoding is stopped; `name` is versioned and written into every result."""

    name: str  # e.g. "gsm8k-8shot-cot-lmeval@v1"
    dataset: str  # grader dataset: gsm8k | math
    num_fewshot: int
    cot: bool
    template: str | None  # data/prompts template (zero-shot protocols only)
    stop_strings: tuple[str, ...]
    reference: str  # what it reproduces

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"stop_strings": list(self.stop_strings)}


def make_protocol(dataset: str, num_fewshot: int = 0, cot: bool = True, template=None,
                  extra_stops: tuple[str, ...] = ()) -> Protocol:
    """The protocol for a grader dataset ("gsm8k" or "math"; MATH-500 is "math"). `template` (a data.Template)
    is used by the zero-shot protocols: its name goes into the protocol name, its stop strings are added."""
    if dataset not in GRADER_DATASETS:
        raise ValueError(f"dataset {dataset!r}: expected one of {GRADER_DATASETS}")
    if num_fewshot < 0:
        raise ValueError(f"--num_fewshot {num_fewshot}: must be >= 0")
    if num_fewshot == 0:
        if template is None:
            raise ValueError("zero-shot protocols need a template (data.load_template(name))")
        style = "cot" if cot else "direct"
        return Protocol(f"{dataset}-0shot-{style}-{template.name}@v1", dataset, 0, cot, template.name,
                        tuple(template.stop) + tuple(extra_stops),
                        "zero-shot in the checkpoint's prompt template, \\boxed{} answer (eval-protocols.md §7)"
                        + ("" if cot else "; instruction to answer directly"))
    exemplars = GSM8K_COT_EXEMPLARS if dataset == "gsm8k" else MINERVA_MATH_EXEMPLARS
    if num_fewshot > len(exemplars):
        raise ValueError(f"--num_fewshot {num_fewshot}: the {dataset} few-shot protocol has "
                         f"{len(exemplars)} exemplars (lm-eval uses all {len(exemplars)})")
    style = "cot" if cot else "direct"
    if dataset == "gsm8k":
        return Protocol(f"gsm8k-{num_fewshot}shot-{style}-lmeval@v1", "gsm8k", num_fewshot, cot, None,
                        GSM8K_STOPS + tuple(extra_stops),
                        "lm-evaluation-harness gsm8k_cot v3.0 prompt (Wei et al. 2022 exemplars)"
                        + ("" if cot else "; exemplars reduced to 'The answer is N.'"))
    return Protocol(f"math-{num_fewshot}shot-{style}-minerva@v1", "math", num_fewshot, cot, None,
                    MINERVA_STOPS + tuple(extra_stops),
                    "lm-evaluation-harness minerva_math v1.0 prompt (Lewkowycz et al. 2022 exemplars)"
                    + ("" if cot else "; exemplars reduced to the 'Final Answer:' line"))


def _direct_target(target: str, dataset: str) -> str:
    """A few-shot exemplar without its reasoning: only its final-answer sentence."""
    marker = "The answer is" if dataset == "gsm8k" else "Final Answer:"
    return target[target.rindex(marker):]


def fewshot_prompt(protocol: Protocol, question: str) -> str:
    """The prompt string exactly as lm-eval builds it: (text + " " + target + "\\n\\n") per exemplar + text."""
    if protocol.dataset == "gsm8k":
        exemplars, doc_to_text = GSM8K_COT_EXEMPLARS, "Q: {}\nA:".format
    else:
        exemplars, doc_to_text = MINERVA_MATH_EXEMPLARS, "Problem:\n{}\n\nSolution:".format
    parts = []
    for q, target in exemplars[:protocol.num_fewshot]:
        target = target if protocol.cot else _direct_target(target, protocol.dataset)
        parts.append(doc_to_text(q) + " " + target + "\n\n")
    return "".join(parts) + doc_to_text(question)


def direct_template(template):
    """The no-CoT variant of a template: the step-by-step instruction swapped for 'answer directly'."""
    if COT_INSTRUCTION in template.prompt:
        prompt = template.prompt.replace(COT_INSTRUCTION, DIRECT_INSTRUCTION)
    else:
        prompt = template.prompt.replace("{question}", "{question}\n" + DIRECT_INSTRUCTION, 1)
    return dataclasses.replace(template, prompt=prompt)


def prompt_ids(protocol: Protocol, question: str, tokenizer, template=None) -> list[int]:
    """Token ids of one prompt. Few-shot: the lm-eval string, tokenized with the tokenizer's own special
    tokens (BOS for Llama, none for Qwen). Zero-shot: data.encode_prompt with the template, BOS as in training."""
    if protocol.num_fewshot > 0:
        return tokenizer(fewshot_prompt(protocol, question), add_special_tokens=True)["input_ids"]
    import data

    if template is None:
        raise ValueError("zero-shot protocols need a template (data.load_template(name))")
    return data.encode_prompt(template if protocol.cot else direct_template(template), question, tokenizer)


# ----------------------------------------------------------------------------- 2. config

@dataclass
class EvalConfig:
    """Evaluate a model (base, full checkpoint or LoRA checkpoint) on GSM8K / MATH / MATH-500."""

    model: str | None = None  # base model folder, full checkpoint, LoRA checkpoint, or a sft job folder
    adapter: str | None = None  # LoRA adapter folder to put on --model
    base_model: str | None = None  # overrides the base path recorded in a LoRA checkpoint's adapter_config.json
    datasets: tuple[str, ...] = ()  # gsm8k | math | math500
    data_dir: str = "data/raw"  # folder with <dataset>/<split>.jsonl
    dataset_file: str | None = None  # any jsonl in the unified schema (question, answer)
    grade_as: str | None = None  # grader dataset for --dataset_file (gsm8k | math); default: guessed
    split: str = "test"
    limit: int | None = None  # first N problems of each dataset
    batch_size: int | Literal["auto"] = "auto"  # decoding slots; auto: from free GPU memory (or --max_batch_tokens), 16 on CPU
    max_batch_tokens: int | None = None  # cap on slots x cache positions per slot (K/V cache size in tokens)
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n_samples: int = 1  # >1 (with temperature > 0): pass@k and majority vote
    seed: int = 0
    template: str | None = None  # data/prompts template; default: the one recorded in the checkpoint
    num_fewshot: int = 0  # > 0: the lm-eval few-shot protocols (gsm8k_cot 8-shot, minerva_math 4-shot)
    cot: Bool = True  # false: answer directly, no chain of thought
    stop_strings: tuple[str, ...] = ()  # extra stop strings (besides the protocol's and the EOS tokens)
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    merge_lora: Bool = True  # fold the adapter into the weights before decoding (faster, same outputs)
    output_dir: str = "outputs/eval"
    reports_dir: str = "outputs/reports"  # git-ignored; docs/reports holds the committed example reports
    write_report: Bool = True
    run_name: str | None = None  # replaces the model name in the default run_id
    run_id: str | None = None  # default: <run_name or model>-<dataset>-<protocol>-<YYYYmmdd-HHMMSS>
    quiet: Bool = False


def parse_config(argv: list[str]) -> EvalConfig:
    """--config YAML (repeatable) for defaults, then tyro flags (underscores) on top (cli.parse_config)."""
    return cli.parse_config(EvalConfig, argv, prog="evalmath.py")[0]


# ----------------------------------------------------------------------------- 3. decoding

@dataclass
class Generation:
    text: str  # decoded (special tokens kept) and cut at the first stop string
    n_tokens: int  # generated tokens, stopping EOS excluded
    finish_reason: str  # eos | stop | length
    tokens: list[int] = dataclasses.field(default_factory=list, repr=False)  # the generated ids


def cut_at_stops(text: str, stop_strings: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class DecodeProgress:
    """Progress lines on stderr: problems done / total, generated tok/s and the ETA, both from the last
    `window` seconds (not the average since the start), at most every `every` seconds (and at the end)."""

    def __init__(self, total: int, every: float = 10.0, window: float = 30.0, clock=time.monotonic,
                 stream=None):
        self.total, self.every, self.window, self.clock = total, every, window, clock
        self.stream = stream or sys.stderr
        self.history: list[tuple[float, int, int]] = [(clock(), 0, 0)]
        self.last_print = self.history[0][0]

    def line(self, done: int, tokens: int) -> str:
        now = self.clock()
        self.history.append((now, done, tokens))
        while len(self.history) > 2 and now - self.history[1][0] >= self.window:
            self.history.pop(0)
        t0, d0, k0 = self.history[0]
        dt = max(now - t0, 1e-9)
        rate = (done - d0) / dt
        eta = (self.total - done) / rate if rate > 0 else None
        eta_s = "?" if eta is None else (f"{eta / 60:.0f}m{eta % 60:02.0f}s" if eta >= 60 else f"{eta:.0f}s")
        return f"  decoding: {done}/{self.total} problems, {(tokens - k0) / dt:,.0f} tok/s, ETA {eta_s}"

    def __call__(self, done: int, total: int, tokens: int) -> None:
        text = self.line(done, tokens)
        if self.clock() - self.last_print >= self.every or done == total:
            self.last_print = self.clock()
            print(text, file=self.stream, flush=True)


def decode(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int | str = "auto",
           eos_ids: list[int], stop_strings: tuple[str, ...] = (), temperature: float = 0.0, top_p: float = 1.0,
           seed: int = 0, progress: bool = False, max_batch_tokens: int | None = None,
           should_abort=None) -> list[Generation | None]:
    """Generate for every prompt with decode.py's continuous batching (longest prompts first, `batch_size`
    slots, "auto": decode.pick_slots); same order out. Text is decoded with special tokens kept and cut at
    the first stop string. When should_abort() turns True (asked every few decode steps) it returns early:
    None for the prompts not finished."""
    import decode as decoder

    if not prompts:
        return []
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    stop = decoder.stop_strings_rule(tokenizer, stop_strings, model.args.vocab_size)
    report = DecodeProgress(len(prompts)) if progress else None
    gens = decoder.generate(model, prompts, max_new_tokens, eos_ids, slots=batch_size,
                            max_batch_tokens=max_batch_tokens, temperature=temperature, top_p=top_p,
                            generator=generator, stop=stop, pad_id=pad_id, progress=report,
                            should_abort=should_abort)
    out: list[Generation | None] = []
    for g in gens:
        if g is None:
            out.append(None)
            continue
        text, stopped = cut_at_stops(tokenizer.decode(g.tokens, skip_special_tokens=False), stop_strings)
        out.append(Generation(text, len(g.tokens), "stop" if stopped else g.finish_reason, g.tokens))
    return out


# ----------------------------------------------------------------------------- 4. grading

def gold_of(record: dict) -> str:
    gold = record.get("answer")
    if gold is None:
        gold = (record.get("meta") or {}).get("answer_raw")
    if gold is None:
        raise SystemExit(f"error: record {record.get('id')!r} has no gold answer (field 'answer'); evaluation "
                         "needs question/answer rows")
    return str(gold)


def grade_response(response: str, gold: str, dataset: str, truncated: bool = False) -> dict:
    """grader.grade as a plain dict {correct, extracted, error_type}: the one grading path of evalmath."""
    import grader

    v = grader.grade(response, gold, dataset, truncated=truncated)
    return {"correct": bool(v.correct), "extracted": v.extracted, "error_type": v.error_type}


def make_item(record: dict, gens: list[Generation], dataset: str) -> dict:
    """Per-item result; with several samples the first one fills the top-level fields."""
    gold = gold_of(record)
    samples = []
    for g in gens:
        truncated = g.finish_reason == "length"
        samples.append({"response": g.text, **grade_response(g.text, gold, dataset, truncated),
                        "n_tokens": g.n_tokens, "truncated": truncated, "finish_reason": g.finish_reason})
    meta = record.get("meta") or {}
    item = {"id": str(record["id"]), "question": record["question"], "gold": gold, **samples[0],
            "subject": meta.get("subject"), "level": meta.get("level")}
    if len(samples) > 1:
        item["samples"] = samples
        winner = reports.majority_vote(samples)
        item["majority_answer"] = winner["extracted"] if winner else None
        item["majority_correct"] = bool(winner and winner["correct"])
    return item


# ----------------------------------------------------------------------------- 5. API (also sft.py's)

def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_records(model, tokenizer, records: list[dict], template=None, dataset: str = "gsm8k",
                     max_new_tokens: int = 512, batch_size: int | str = 16, *, num_fewshot: int = 0,
                     cot: bool = True, temperature: float = 0.0, top_p: float = 1.0, n_samples: int = 1,
                     seed: int = 0, eos_ids: list[int] | None = None, stop_strings: tuple[str, ...] = (),
                     shard: bool = True, progress: bool = False, max_batch_tokens: int | None = None,
                     should_abort=None) -> tuple[list[dict], dict]:
    """Decode, grade and summarize `records` with an in-memory model; no file I/O.

    template: a data.Template or its name (zero-shot protocols; ignored few-shot). dataset: the grader
    dataset ("gsm8k" or "math"). batch_size: decoding slots (a number or "auto"). Under torch.distributed (and
    shard=True) each rank decodes records[rank::world] and every rank gets the merged items (all_gather_object),
    in record order. Returns (items, summary).

    should_abort: a callable asked every few decode steps; once it returns True decoding stops and the result
    covers only the problems finished by then: fewer items than records (still in record order) and
    summary["partial"] = True. Every rank must still reach the end (the gather)."""
    if n_samples > 1 and temperature <= 0:
        raise ValueError("n_samples > 1 needs temperature > 0 (greedy samples are all the same)")
    if isinstance(template, str):
        import data

        template = data.load_template(template)
    protocol = make_protocol(dataset, num_fewshot, cot, template if num_fewshot == 0 else None,
                             tuple(stop_strings))
    rank, world = _dist_info() if shard else (0, 1)
    mine = list(range(len(records)))[rank::world]
    prompts = [prompt_ids(protocol, records[i]["question"], tokenizer, template) for i in mine]
    if eos_ids is None:
        eos_ids = evalmodel.eos_token_ids(tokenizer, getattr(model, "generation_config", None))
    was_training = model.training
    model.eval()
    try:
        gens = decode(model, tokenizer, [p for p in prompts for _ in range(n_samples)],
                      max_new_tokens=max_new_tokens, batch_size=batch_size, eos_ids=eos_ids,
                      stop_strings=protocol.stop_strings, temperature=temperature, top_p=top_p,
                      seed=seed + rank, progress=progress, max_batch_tokens=max_batch_tokens,
                      should_abort=should_abort)
    finally:
        model.train(was_training)
    groups = [(i, gens[k * n_samples:(k + 1) * n_samples]) for k, i in enumerate(mine)]
    partial = any(g is None for _, gs in groups for g in gs)
    items = [(i, make_item(records[i], gs, dataset)) for i, gs in groups if all(g is not None for g in gs)]
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (items, partial))
        items = [x for part, _ in gathered for x in part]
        partial = any(p for _, p in gathered)
    items = [it for _, it in sorted(items, key=lambda x: x[0])]
    summary = reports.summarize(items)
    if partial:
        summary["partial"] = True
    return items, summary


def accuracy_during_training(model, records_file: Path, limit: int, tokenizer_path: str, template: str,
                             max_new_tokens: int, autocast=None, should_abort=None, batch_size: int = 16) -> dict:
    """sft.py's in-training accuracy: greedy-decode the first `limit` problems of `records_file` (a data cache's
    records/valid.jsonl) with the training model, `batch_size` decoding slots per rank; `should_abort()` (polled
    every few decode steps, on every rank) ends it early. Under FSDP2 every rank first gathers the full weights
    (unshard), so ranks can run different numbers of forwards; they are resharded afterwards.
    Returns {"eval_accuracy": float}, or {} when there is nothing to decode or it was aborted."""
    import contextlib

    import data

    if not Path(records_file).is_file():
        return {}
    lines = Path(records_file).read_text().splitlines()
    records = [r for r in (json.loads(ln) for ln in lines if ln.strip())][:limit]
    records = [r for r in records if r.get("answer")]
    if not records:
        return {}
    tokenizer = data.load_tokenizer(tokenizer_path)
    fsdp_mods = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    for m in fsdp_mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        with autocast or contextlib.nullcontext():
            items, summary = evaluate_records(model, tokenizer, records, template=template,
                                              dataset=guess_grader_dataset(records), max_new_tokens=max_new_tokens,
                                              batch_size=batch_size, should_abort=should_abort)
    finally:
        for m in fsdp_mods:
            m.reshard()
            m.set_reshard_after_forward(True)
    if summary.get("partial"):
        return {}
    return {"eval_accuracy": sum(bool(it["correct"]) for it in items) / len(records)}


# ----------------------------------------------------------------------------- 6. runs

def load_eval_records(name: str, cfg: EvalConfig) -> list[dict]:
    """One dataset's records via data.load_records (named dataset or --dataset_file path)."""
    import data

    try:
        return data.load_records(name, cfg.split, cfg.data_dir)
    except (data.DataError, FileNotFoundError) as e:
        flag = "--dataset_file" if name == cfg.dataset_file else "--datasets/--data_dir"
        raise SystemExit(f"error: {flag}: {e}") from e


def guess_grader_dataset(records: list[dict]) -> str:
    """gsm8k when every gold answer is a plain number, else math (for --dataset_file without --grade_as)."""
    numeric = re.compile(r"-?[\d,]*\.?\d+")
    return "gsm8k" if records and all(numeric.fullmatch(gold_of(r).strip()) for r in records) else "math"


def eval_sets(cfg: EvalConfig) -> list[tuple[str, str, list[dict]]]:
    """(name, grader dataset, records) for every requested dataset, each cut to --limit."""
    out = []
    for name in cfg.datasets:
        if name not in ("gsm8k", "math", "math500"):
            near = difflib.get_close_matches(name, ["gsm8k", "math", "math500"], n=1)
            raise SystemExit(f"error: --datasets {name}: expected gsm8k, math or math500"
                             + (f"; did you mean '{near[0]}'?" if near else "") + " (other files: --dataset_file)")
        out.append((name, "gsm8k" if name == "gsm8k" else "math", load_eval_records(name, cfg)))
    if cfg.dataset_file:
        records = load_eval_records(cfg.dataset_file, cfg)
        if cfg.grade_as is not None and cfg.grade_as not in GRADER_DATASETS:
            raise SystemExit(f"error: --grade_as {cfg.grade_as}: expected gsm8k or math")
        out.append((Path(cfg.dataset_file).stem, cfg.grade_as or guess_grader_dataset(records), records))
    for name, _, records in out:
        if not records:
            where = f"--dataset_file {cfg.dataset_file}" if name == Path(cfg.dataset_file or "").stem else \
                f"--datasets {name} (split {cfg.split!r} under --data_dir {cfg.data_dir})"
            raise SystemExit(f"error: {where}: the dataset has no records; nothing to evaluate")
    return [(n, g, r[:cfg.limit] if cfg.limit is not None else r) for n, g, r in out]


def data_hash(records: list[dict]) -> str:
    """sha256 of the evaluated records (id, question, gold), in order."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([str(r["id"]), r["question"], gold_of(r)], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def make_run_id(model: str, dataset: str, protocol: Protocol, stamp: str, run_name: str | None = None) -> str:
    """<run_name or model>-<dataset>-<protocol without its dataset prefix>-<YYYYmmdd-HHMMSS>, filename-safe."""
    p = Path(model)
    name = run_name or (f"{p.parent.name}-{p.name}" if p.name.startswith("checkpoint-") else p.name)
    raw = f"{name}-{dataset}-{protocol.name.split('-', 1)[1].replace('@', '_')}-{stamp}"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in raw)


def check_config(cfg: EvalConfig) -> None:
    if not cfg.model:
        raise SystemExit("error: --model PATH is required (a model folder, checkpoint or LoRA adapter)")
    if not cfg.datasets and not cfg.dataset_file:
        raise SystemExit("error: nothing to evaluate: pass --datasets gsm8k math math500 and/or "
                         "--dataset_file FILE.jsonl")
    if cfg.limit is not None and cfg.limit < 1:
        raise SystemExit(f"error: --limit {cfg.limit}: nothing to evaluate; expected N >= 1 (the first N problems "
                         "of each dataset), or leave it out for all of them")
    if cfg.batch_size != "auto" and not (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1):
        raise SystemExit(f"error: --batch_size {cfg.batch_size}: expected auto or a number of rows >= 1")
    for flag, value, ok in (("--max_new_tokens", cfg.max_new_tokens, cfg.max_new_tokens >= 1),
                            ("--max_batch_tokens", cfg.max_batch_tokens,
                             cfg.max_batch_tokens is None or cfg.max_batch_tokens >= 1),
                            ("--n_samples", cfg.n_samples, cfg.n_samples >= 1),
                            ("--top_p", cfg.top_p, 0 < cfg.top_p <= 1),
                            ("--temperature", cfg.temperature, cfg.temperature >= 0)):
        if not ok:
            raise SystemExit(f"error: {flag} {value}: out of range")
    if cfg.n_samples > 1 and cfg.temperature <= 0:
        raise SystemExit("error: --n_samples > 1 needs --temperature > 0 (greedy samples are all identical)")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """torchrun: one process group (nccl on GPU, gloo on CPU); each rank decodes a shard."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _dist_info()


def build_result(cfg: EvalConfig, src: evalmodel.ModelSource, name: str, protocol: Protocol,
                 records: list[dict], items: list[dict], summary: dict, extra: dict) -> dict:
    stamp = extra.pop("stamp")
    run_id = cfg.run_id or make_run_id(str(src.checkpoint or cfg.model), name, protocol, stamp, cfg.run_name)
    if cfg.run_id and len(cfg.datasets) + bool(cfg.dataset_file) > 1:
        run_id = f"{cfg.run_id}-{name}"
    decoding = {k: getattr(cfg, k) for k in ("temperature", "top_p", "max_new_tokens", "n_samples", "batch_size",
                                                 "max_batch_tokens")}
    config = {"model": cfg.model, "checkpoint": str(src.checkpoint) if src.checkpoint else None,
              "fine_tuned_from": src.fine_tuned_from,
              "adapter": str(src.adapter) if src.adapter else None,
              "base_model": str(src.base), "tokenizer": str(src.tokenizer), "dataset": name,
              "dataset_file": cfg.dataset_file, "split": cfg.split, "limit": cfg.limit,
              "n_problems": len(records), "data_hash": data_hash(records),
              "protocol": protocol.to_dict() | {"template_from": src.template_from if protocol.template else None},
              "decoding": decoding | extra.pop("decoding"), "seed": cfg.seed, "versions": cli.versions() | {"result_format": RESULT_FORMAT},
              "args": dataclasses.asdict(cfg)}
    return {"format": RESULT_FORMAT, "run_id": run_id, "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "config": config, "summary": summary, **extra, "items": items}


class StopOnCtrlC:
    """Inside `with`: the first Ctrl-C (SIGINT) sets a flag that decoding polls (it is the should_abort
    callable), the second raises KeyboardInterrupt. Outside the main thread nothing is installed."""

    def __init__(self, say):
        self.say, self.flag, self.old = say, False, None

    def __call__(self) -> bool:
        return self.flag

    def _handler(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        self.say("stopping: finishing the current decoding step, then writing the partial results; press Ctrl-C "
                 "again to quit without writing")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def run(cfg: EvalConfig) -> list[Path]:
    """Evaluate cfg.model on every dataset; rank 0 writes result JSONs and reports. Returns the JSON paths.
    Ctrl-C: the decoded problems of the current dataset are written with "partial": true, then SystemExit(130)."""
    import data
    import decode as decoder

    check_config(cfg)
    device = evalmodel.pick_device(cfg.device)
    try:
        dtype = pick_dtype(cfg.dtype, device.type)
    except ValueError as e:
        raise cli.UserError(f"error: --{e}") from None
    rank, world = init_distributed(device)
    say = (lambda *a: None) if (cfg.quiet or rank != 0) else (lambda *a: print(*a, file=sys.stderr, flush=True))
    src = evalmodel.resolve_model(cfg.model, cfg.adapter, cfg.base_model)
    evalmodel.check_model_files(src)
    if src.checkpoint is not None:
        say(f"evalmath: {cfg.model} is a run folder: evaluating {src.checkpoint.name} "
            f"({'checkpoint-best' if (Path(cfg.model) / 'checkpoint-best').is_dir() else 'latest'})")
    say(f"evalmath: base model {src.base}" + (f", adapter {src.adapter}" if src.adapter else "")
        + (f" (fine-tuned from {src.fine_tuned_from})" if src.fine_tuned_from else ""))
    template = None
    if cfg.num_fewshot == 0:
        name = cfg.template or src.template
        if name is None:
            say("notice: no template recorded in the checkpoint and no --template: using 'boxed'")
            name = "boxed"
        try:
            template = data.load_template(name)
        except data.DataError as e:
            raise SystemExit(f"error: --template: {e}") from e
    sets = eval_sets(cfg)
    model, tokenizer = evalmodel.load_model(src, device, dtype, merge=cfg.merge_lora, check=False)
    eos = evalmodel.eos_token_ids(tokenizer, model.generation_config)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    written = []
    with StopOnCtrlC(lambda m: print(m, file=sys.stderr, flush=True) if rank == 0 else None) as interrupted:
        for name, grader_ds, records in sets:
            protocol = make_protocol(grader_ds, cfg.num_fewshot, cfg.cot, template, cfg.stop_strings)
            say(f"evalmath: {name} ({len(records)} problems, {protocol.name}) on {world} rank(s)")
            t0 = time.time()
            try:
                items, summary = evaluate_records(
                    model, tokenizer, records, template, grader_ds, cfg.max_new_tokens, cfg.batch_size,
                    num_fewshot=cfg.num_fewshot, cot=cfg.cot, temperature=cfg.temperature, top_p=cfg.top_p,
                    n_samples=cfg.n_samples, seed=cfg.seed, eos_ids=eos, stop_strings=cfg.stop_strings,
                    progress=not cfg.quiet and rank == 0, max_batch_tokens=cfg.max_batch_tokens,
                    should_abort=interrupted)
            except decoder.DecodeLimitError as e:
                raise SystemExit(f"error: {name}: {e}") from e
            elapsed = time.time() - t0
            partial = bool(summary.get("partial"))
            if rank == 0 and items:
                written.append(write_result(cfg, src, name, protocol, records, items, summary, elapsed, stamp,
                                            eos, dtype, device, world, partial, say))
            if interrupted.flag:
                break
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if interrupted.flag:
        print(f"evalmath: interrupted; wrote {len(written)} result file(s)"
              + (" (the last one partial)" if written and partial else ""), file=sys.stderr, flush=True)
        raise SystemExit(130)
    return written


def write_result(cfg: EvalConfig, src: evalmodel.ModelSource, name: str, protocol: Protocol,
                 records: list[dict], items: list[dict], summary: dict, elapsed: float, stamp: str,
                 eos: list[int], dtype, device, world: int, partial: bool, say) -> Path:
    """The result JSON (and report) of one dataset; `partial`: only the problems decoded before a Ctrl-C."""
    n_tok = sum(s["n_tokens"] for it in items for s in it.get("samples", [it]))
    extra = {"stamp": stamp, "timing": {"seconds": round(elapsed, 3), "generated_tokens": n_tok,
                                        "tokens_per_s": round(n_tok / max(elapsed, 1e-9), 2),
                                        "problems_per_s": round(len(items) / max(elapsed, 1e-9), 4)},
             "decoding": {"eos_ids": eos, "dtype": str(dtype).removeprefix("torch."), "device": device.type,
                          "merge_lora": cfg.merge_lora, "world_size": world}}
    if partial:
        extra["partial"] = True
    result = build_result(cfg, src, name, protocol, records, items, summary, extra)
    path = Path(cfg.output_dir) / name / f"{result['run_id']}.json"
    write_json(path, result)
    md = reports.write_report(result, cfg.reports_dir) if cfg.write_report else None
    say(f"  {name}: accuracy {100 * summary['accuracy']:.2f} ± {100 * summary['stderr']:.2f} "
        f"({summary['correct']}/{summary['n']}"
        + (f" decoded of {len(records)}, PARTIAL" if partial else "") + f"), truncated "
        f"{100 * summary['truncation_rate']:.1f}%, no answer {100 * summary['no_answer_rate']:.1f}%, "
        f"{elapsed:.1f}s -> {path}" + (f", {md}" if md else ""))
    return path


# ----------------------------------------------------------------------------- 7. CLI: subcommands

def cmd_grade(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="evalmath.py grade", description="Re-grade responses without a model.")
    ap.add_argument("--input", required=True, help='jsonl rows {"id", "dataset", "response", "gold"} (dataset gsm8k, '
                    'math or math500; optional "finish_reason" (length = cut off) or "truncated")')
    ap.add_argument("--output", required=True, help='jsonl rows {"id", "correct", "extracted", "error_type"} '
                    "(written to a temporary file, then renamed; never the input)")
    ap.add_argument("--skip_bad_rows", action="store_true", help="skip and count rows that cannot be graded "
                    "instead of stopping at the first")
    a = ap.parse_args(argv)
    import grader

    if not Path(a.input).is_file():
        what = "is a folder" if Path(a.input).is_dir() else "file not found"
        raise SystemExit(f"error: --input {a.input}: {what}; expected a predictions .jsonl file")
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    try:
        s = grader.grade_file(a.input, a.output, skip_bad_rows=a.skip_bad_rows)  # the same grade() as evaluation
    except grader.BadRow as e:
        if str(e).startswith("--output"):
            raise SystemExit(f"error: {e}") from None
        hint = "" if a.skip_bad_rows else " (or pass --skip_bad_rows)"
        raise SystemExit(f"error: {e}{hint}; nothing was written to {a.output}") from None
    except OSError as e:
        raise SystemExit(f"error: grade {a.input} -> {a.output}: {e.strerror or e}") from None
    skipped = f", skipped {s['skipped']} bad rows" if s["skipped"] else ""
    print(f"graded {s['n']} rows: accuracy {100 * s['accuracy']:.2f}{skipped} -> {a.output}")


def cmd_report(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="evalmath.py report", description="Report one run or compare several.")
    ap.add_argument("runs", nargs="+", help="result JSON paths or run ids (searched under --eval_dir); an sft.py "
                    "run folder gets its training report (loss, learning rate, validation charts)")
    ap.add_argument("--eval_dir", default="outputs/eval")
    ap.add_argument("--reports_dir", default="outputs/reports")
    ap.add_argument("--out", default=None, help="markdown path of the comparison (default: reports_dir/compare-*.md)")
    ap.add_argument("--manual", action="store_true", help="use summary_manual where a run has one")
    a = ap.parse_args(argv)
    folders = [r for r in a.runs if (Path(r) / "metrics.jsonl").is_file()]
    for job in folders:
        print(f"wrote {reports.write_run_report(job, a.reports_dir)}")
    results = [reports.load_result(r, a.eval_dir)[0] for r in a.runs if r not in folders]
    if not results:
        return
    if len(results) == 1 and a.out is None:
        print(f"wrote {reports.write_report(results[0], a.reports_dir)}")
        return
    table = reports.compare(results, use_manual=a.manual)
    out = Path(a.out or Path(a.reports_dir) / f"compare-{_dt.datetime.now():%Y%m%d-%H%M%S}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    charts = reports.plot_groups(results, out.with_suffix(""))
    out.write_text("# Comparison\n\n" + table + "".join(f"\n![{p.stem}]({p.name})\n" for p in charts))
    print(table + f"\nwrote {out}" + "".join(f", {p}" for p in charts))


def cmd_review(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="evalmath.py review", description="Manual review of a run's verdicts.")
    sub = ap.add_subparsers(dest="action", required=True)
    ex = sub.add_parser("export", help="write the failed items to a CSV with an empty manual_correct column")
    ex.add_argument("run")
    ex.add_argument("--out", required=True)
    ex.add_argument("--all", action="store_true", help="export every item, not only the failures")
    im = sub.add_parser("import", help="read manual_correct verdicts back, recompute summary_manual")
    im.add_argument("run")
    im.add_argument("--csv", required=True)
    for p in (ex, im):
        p.add_argument("--eval_dir", default="outputs/eval")
        p.add_argument("--reports_dir", default="outputs/reports")
    a = ap.parse_args(argv)
    result, path = reports.load_result(a.run, a.eval_dir)
    if a.action == "export":
        n = reports.export_failures(result, a.out, include_correct=a.all)
        print(f"exported {n} items of {result['run_id']} to {a.out}; fill manual_correct (true/false) and run "
              f"`python evalmath.py review import {path} --csv {a.out}`")
        return
    n = reports.import_verdicts(result, a.csv)
    write_json(path, result)
    md = reports.write_report(result, a.reports_dir)
    sm = result["summary_manual"]
    print(f"imported {n} verdicts into {path}: accuracy {100 * result['summary']['accuracy']:.2f} (auto) -> "
          f"{100 * sm['accuracy']:.2f} (manual); report {md}")


SUBCOMMANDS = {"grade": cmd_grade, "report": cmd_report, "review": cmd_review}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]](argv[1:])
        return
    run(parse_config(argv))


if __name__ == "__main__":
    import cli
    import data
    import model

    cli.run_main(main, user_errors=(data.DataError, model.ModelFileError))
