"""A random-init model of a real architecture (Llama, Mistral, Qwen2) in Hugging Face format, with a
tokenizer, in seconds: the models the tests, the demo and the benchmarks run on.

    python maketiny.py --out models/tiny --arch qwen2 [--tokenizer ../shared/models/qwen2.5-0.5b]
        [--hidden 64 --layers 2 --heads 4 --kv_heads 2] [--tokenizer_corpus train.jsonl --tokenizer_vocab 1024]
    make_tiny("models/tiny", arch="llama", hidden=128, layers=4)          # the same from Python

Without --tokenizer it trains a small byte-level BPE on a built-in math corpus (plus --tokenizer_corpus files).
Weights are HF-style random init from a seeded generator, saved with model.py's save_pretrained.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model import DTYPES, SUPPORTED_MODEL_TYPES, ModelArgs, Transformer, read_json

_TINY_CORPUS = """\
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May.
Natalia sold 48+24 = 72 clips altogether in April and May. The answer is 72.
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?
Let x be the number of apples. Then 3x + 5 = 20, so x = 5. Therefore the final answer is \\boxed{5}.
The sum of the angles of a triangle is 180 degrees. What is the value of \\frac{1}{2} + \\frac{1}{3}?
Question: If a train travels 60 miles per hour for 3 hours, how far does it travel? Answer: 180 miles.
We compute \\sqrt{16} = 4 and 2^{10} = 1024. The remainder when 100 is divided by 7 is 2.
"""


def _corpus_lines(files: list[Path]) -> list[str]:
    """Text lines of corpus files; a .jsonl file contributes the string values of each row."""
    lines: list[str] = []
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--tokenizer_corpus {f}: no such file")
        for raw in Path(f).read_text(encoding="utf-8").splitlines():
            if str(f).endswith(".jsonl") and raw.strip():
                lines += [v for v in json.loads(raw).values() if isinstance(v, str)]
            else:
                lines.append(raw)
    return lines


def _train_tiny_tokenizer(out: Path, seed: int, corpus: list[Path] = (), vocab_size: int = 512,
                          split_digits: bool = True):
    """A byte-level BPE (digits split individually) trained on a small built-in corpus (plus the given corpus
    files), saved so that transformers.AutoTokenizer loads it. Specials: <|endoftext|> (eos/pad), <|im_start|>,
    <|im_end|>."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    lines = _TINY_CORPUS.splitlines() * 4
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    for _ in range(400):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        sym, fn = rng.choice(ops)
        lines.append(f"What is {a} {sym} {b}? {a} {sym} {b} = {fn(a, b)}. The answer is {fn(a, b)}.")
    lines += _corpus_lines(list(corpus))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    chat = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:], chat_template=chat)
    fast.save_pretrained(out)
    return fast


@dataclass
class MakeTiny:
    """Write a random-init model of a real architecture (HF format, with tokenizer) in seconds."""

    out: Path  # output folder
    arch: str = "llama"  # llama | qwen2 | mistral
    tokenizer: Path | None = None  # copy this tokenizer folder; default: train a small byte-level BPE
    tokenizer_corpus: tuple[Path, ...] = ()  # text/jsonl files the small BPE also learns from (no --tokenizer)
    tokenizer_vocab: int = 512  # vocabulary size of that BPE
    split_digits: bool = True  # that BPE splits numbers into single digits (False: frequent numbers are one token)
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 0  # 0 -> ~8/3 * hidden rounded up to a multiple of 32
    vocab: int = 0  # 0 -> the tokenizer's size rounded up to a multiple of 64
    max_position_embeddings: int = 4096
    rope_scaling: str = "none"  # none | llama3 (llama only)
    dtype: str = "float32"


def make_tiny(out: str | os.PathLike, arch: str = "llama", tokenizer: str | os.PathLike | None = None, seed: int = 0,
              **sizes) -> Path:
    """Function form of `python maketiny.py`. `sizes` are MakeTiny fields (hidden, layers, heads, ...);
    any other keyword must be a ModelArgs field and overrides it (e.g. tie_word_embeddings=True). Returns out."""
    names = set(MakeTiny.__dataclass_fields__)
    extra = {k: v for k, v in sizes.items() if k not in names}
    bad = sorted(set(extra) - set(ModelArgs.__dataclass_fields__))
    if bad:
        raise TypeError(f"make_tiny got unknown arguments {bad}; expected MakeTiny or ModelArgs fields")
    kw = {k: v for k, v in sizes.items() if k in names}
    kw["tokenizer_corpus"] = tuple(Path(c) for c in kw.get("tokenizer_corpus", ()))
    cfg = MakeTiny(out=Path(out), arch=arch, tokenizer=Path(tokenizer) if tokenizer else None, seed=seed, **kw)
    return _make_tiny(cfg, extra)


def _make_tiny(cfg: MakeTiny, extra: dict | None = None) -> Path:
    from transformers import AutoTokenizer

    if cfg.arch not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"--arch {cfg.arch!r}: expected one of {sorted(SUPPORTED_MODEL_TYPES)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gen_cfg = None
    if cfg.tokenizer is not None:
        src = Path(cfg.tokenizer)
        if not src.is_dir():
            raise FileNotFoundError(f"--tokenizer {src}: not a folder")
        # Re-save through transformers so the folder always has a tokenizer.json: without one, AutoTokenizer on
        # a folder whose config says model_type=mistral tries a slow->fast conversion that needs sentencepiece.
        tok = AutoTokenizer.from_pretrained(src)
        tok.save_pretrained(out)
        if (src / "generation_config.json").is_file():
            gen_cfg = read_json(src / "generation_config.json")
    else:
        tok = _train_tiny_tokenizer(out, cfg.seed, [Path(c) for c in cfg.tokenizer_corpus], cfg.tokenizer_vocab,
                                    cfg.split_digits)
    vocab = cfg.vocab or -(-len(tok) // 64) * 64
    if vocab < len(tok):
        raise ValueError(f"--vocab {vocab} is smaller than the tokenizer's {len(tok)} tokens")
    eos = tok.eos_token_id
    gen_cfg = gen_cfg or {"bos_token_id": tok.bos_token_id, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}
    per_arch = {"llama": {"rope_theta": 500000.0}, "mistral": {"rope_theta": 1e6},
                "qwen2": {"rope_theta": 1e6, "tie_word_embeddings": True, "qkv_bias": True, "rms_norm_eps": 1e-6}}
    kw = dict(per_arch[cfg.arch])
    if cfg.rope_scaling == "llama3":
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    inter = cfg.intermediate or -(-int(cfg.hidden * 8 / 3) // 32) * 32
    args = ModelArgs(model_type=cfg.arch, vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=inter,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                     max_position_embeddings=cfg.max_position_embeddings, bos_token_id=gen_cfg.get("bos_token_id"),
                     eos_token_id=gen_cfg.get("eos_token_id"), pad_token_id=tok.pad_token_id, dtype=cfg.dtype,
                     **(kw | (extra or {})))
    model = Transformer.from_args(args, device="cpu", generator=torch.Generator().manual_seed(cfg.seed))
    model.generation_config = {k: v for k, v in gen_cfg.items() if v is not None}
    model.save_pretrained(out, dtype=DTYPES[cfg.dtype])
    return out


def main(argv: list[str] | None = None) -> None:
    import tyro

    cfg = tyro.cli(MakeTiny, args=argv, use_underscores=True, prog="maketiny.py")
    out = _make_tiny(cfg)
    print(json.dumps({"out": str(out), "config": asdict(cfg) | {"out": str(out), "tokenizer": str(cfg.tokenizer),
                                                              "tokenizer_corpus": [str(c) for c in cfg.tokenizer_corpus]}}))


if __name__ == "__main__":
    main()
