"""Data: raw files -> one record schema -> splits -> prompt templates -> token cache (.npy memmaps).

    python data.py prepare --datasets gsm8k math --data_dir ../shared/data \
        --tokenizer ../shared/models/qwen2.5-0.5b --template boxed --max_seq_length 2048

Read top to bottom: answers (gold extraction), records (loaders), templates, tokenization,
prepare (splits, sampling, validation report, atomic cache), CLI. The packed loader lives next
door in packing.py (it needs torch; this file does not). Formats are documented in docs/data.md.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np

IGNORE_INDEX = -100  # label value that the loss ignores (the one definition in the project)
REPO = Path(__file__).resolve().parent
CACHE_VERSION = 1  # bump when the cache layout or tokenization logic changes
TOKENIZE_CHUNK = 5000  # rows rendered and encoded per progress update
NAMED = {"gsm8k": ("train", "test"), "math": ("train", "test"), "math500": ("test",)}


class DataError(ValueError):
    """Bad input data or arguments; the message names the file/line/flag and the fix."""


# ----------------------------------------------------------------------------- answers

def extract_boxed(text: str) -> str | None:
    """Content of the last brace-balanced \\boxed{...} / \\fbox{...} (also `\\boxed 5`), raw."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\b", text))):
        i = m.end()
        if text.startswith(" ", i) and not text[i:].lstrip(" ").startswith("{"):  # `\boxed 5`
            arg = re.match(r"\s*([^\s$]+)", text[i:])
            if arg:
                return arg.group(1)
            continue
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text) or text[i] != "{":
            continue
        depth, j = 0, i
        while j < len(text):
            if text[j] == "\\":  # an escaped character (\{, \}, \\) never counts as a brace
                j += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j]
            j += 1
    return None


def normalize_number(s: str) -> str:
    """GSM8K-style number: drop commas, `$`, trailing period and units ("1,000 dollars." -> "1000")."""
    s = s.strip().replace(",", "").replace("$", "").strip().rstrip(".").strip()
    m = re.match(r"^(-?\d+(?:\.\d+)?(?:/\d+)?)(?:\s*[A-Za-z%][\w %.]*)?$", s)
    return m.group(1) if m else s


def gsm8k_final_answer(text: str) -> str | None:
    """The normalized number after the last `####` of a GSM8K answer, or None."""
    if "####" not in text:
        return None
    final = normalize_number(text.rsplit("####", 1)[1])
    return final or None


def _strip_text_unit(s: str) -> str:
    # "5 \text{ cm}" -> "5": a trailing \text{letters} after a number or closing brace is a unit.
    return re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z ]+\}\s*$", "", s)


def normalize_math_answer(s: str) -> str:
    """Light, safe LaTeX normalization of a MATH gold answer (the raw answer is kept too)."""
    s = s.strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left\b|\\right\b", "", s)
    s = re.sub(r"(?<=\d)(?:,\\!|\{,\})(?=\d{3})", "", s)  # LaTeX thousands separators: 34,\!560
    s = re.sub(r"(?<!\\)\\[!,;:]|(?<!\\)\\ ", " ", s)  # thin spaces (not the `\\` row break)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = _strip_text_unit(s)
    s = s.replace("\\$", "").replace("$", "").strip().rstrip(".").strip()
    # spacing: drop spaces outside \text{...} unless they separate two letters (`\pi r` stays)
    parts = re.split(r"(\\text\{[^{}]*\})", s)
    s = "".join(p if p.startswith("\\text{") else re.sub(r"\s+(?![A-Za-z])|(?<![A-Za-z])\s+", "", p)
                for p in parts)
    return s


# ----------------------------------------------------------------------------- records

def _record(id, source, split, question, solution, answer, **meta) -> dict:
    return {"id": id, "source": source, "split": split, "question": question,
            "solution": solution, "answer": answer, "meta": meta}


def _read_rows(path: Path, skip_bad_rows: bool, problems: list | None):
    """Yield (where, row-dict) from a jsonl (or parquet) file; malformed lines raise or are skipped."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                            "or convert the file to jsonl") from e
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}:{i}", row
        return
    n, offset = 0, 0
    with open(path, "rb") as f:  # bytes, so a line that is not UTF-8 is reported with its byte offset
        for i, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                _bad(f"{path}:{i}", f"not UTF-8 text at byte offset {start + e.start} of the file "
                     f"({raw[e.start:e.start + 4]!r}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                     skip_bad_rows, problems)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:
                _bad(f"{path}:{i}", f"malformed JSON ({e})", skip_bad_rows, problems)
                continue
            n += 1
            yield f"{path}:{i}", row
    if n == 0 and not (problems and any(p["where"].startswith(f"{path}:") for p in problems)):
        raise DataError(f"{path}: the file is empty (expected one JSON object per line)")


def _bad(where: str, why: str, skip_bad_rows: bool, problems: list | None) -> None:
    if not skip_bad_rows:
        raise DataError(f"{where}: {why}. Fix the row, or pass --skip_bad_rows to skip and count it.")
    if problems is not None:
        problems.append({"where": where, "why": why})


def _need(row: dict, keys: tuple[str, ...], where: str, fmt: str) -> None:
    for k in keys:
        if not isinstance(row.get(k), str):
            got = "missing" if k not in row else f"a {type(row[k]).__name__}, not a string"
            raise KeyError(f"field '{k}' is {got} (the {fmt} format needs {', '.join(keys)}; "
                           f"row keys: {sorted(row)})")


def _parse_level(level) -> int | None:
    if isinstance(level, int):
        return level
    m = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", str(level or ""))
    return int(m.group(1)) if m else None  # "Level ?" -> None (counted in the report)


def _gsm8k(row, where, source, split, idx):
    _need(row, ("question", "answer"), where, "GSM8K")
    rationale = row["answer"].rsplit("####", 1)[0].rstrip()
    final_raw = row["answer"].rsplit("####", 1)[1].strip() if "####" in row["answer"] else None
    return _record(row.get("id", f"{source}/{split}/{idx}"), source, split, row["question"], rationale,
                   gsm8k_final_answer(row["answer"]), answer_raw=final_raw)


def _math(row, where, source, split, idx):
    _need(row, ("problem", "solution"), where, "MATH")
    raw = row["answer"] if isinstance(row.get("answer"), str) else extract_boxed(row["solution"])
    uid = row.get("unique_id") or row.get("id") or f"{source}/{split}/{idx}"
    return _record(uid, source, split, row["problem"], row["solution"],
                   normalize_math_answer(raw) if raw is not None else None, answer_raw=raw,
                   level=_parse_level(row.get("level")), level_raw=row.get("level"),
                   subject=row.get("type") or row.get("subject"), unique_id=row.get("unique_id"))


def _generic(row, where, source, split, idx):
    """instruction/input/output, question/answer(/solution), problem/solution, prompt/completion, messages."""
    rid = str(row.get("id", f"{source}/{split}/{idx}"))
    src = row.get("dataset", source)
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise KeyError("field 'messages' must be a non-empty list of {role, content}")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise KeyError(f"bad message {str(m)[:80]} (role must be system/user/assistant, "
                               "content a string)")
        user = next((m["content"] for m in msgs if m["role"] == "user"), "")
        reply = next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), "")
        return _record(rid, src, split, user, reply, None, format="messages", messages=msgs)
    if "instruction" in row:
        _need(row, ("instruction", "output"), where, "instruction/input/output")
        q = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return _record(rid, src, split, q, row["output"], None, format="instruction")
    if "prompt" in row and "completion" in row:
        _need(row, ("prompt", "completion"), where, "prompt/completion")
        return _record(rid, src, split, row["prompt"], row["completion"], None, format="prompt_completion")
    if "problem" in row:
        return {**_math(row, where, src, split, idx), "id": rid}
    if "question" in row and "####" in str(row.get("answer", "")):
        return {**_gsm8k(row, where, src, split, idx), "id": rid}
    if "question" in row:
        _need(row, ("question", "answer"), where, "question/answer")
        sol = row["solution"] if isinstance(row.get("solution"), str) else row["answer"]
        return _record(rid, src, split, row["question"], sol, row["answer"].strip(), format="qa")
    raise KeyError(f"unrecognized row (keys {sorted(row)}); expected one of: messages, "
                   "instruction/input/output, question/answer, problem/solution, prompt/completion")


def _math_tree_rows(root: Path):
    files = sorted(root.glob("*/*.json"), key=lambda p: (p.parent.name, int(p.stem) if p.stem.isdigit()
                                                         else p.stem))
    if not files:
        raise DataError(f"{root}: no <subject>/<n>.json files (expected the MATH release tree)")
    for p in files:
        try:
            row = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(f"{p}:1: malformed JSON ({e})") from e
        row.setdefault("unique_id", f"{root.name}/{p.parent.name}/{p.name}")
        yield str(p), row


def dataset_files(name_or_path: str, split: str, data_dir: str | Path) -> Path:
    """The file (or MATH json tree) that holds `split` of a named dataset or a path."""
    if name_or_path in NAMED:
        if split not in NAMED[name_or_path]:
            raise DataError(f"{name_or_path} has splits {NAMED[name_or_path]}, not '{split}'")
        base = Path(data_dir) / name_or_path
        path = base / f"{split}.jsonl"
        if not path.exists() and (base / split).is_dir():
            return base / split  # the official per-problem JSON tree
        if not path.exists():
            raise DataError(f"{path} not found: put the official {name_or_path} files under "
                            f"{base}/ (see docs/data.md) or pass --data_dir")
        return path
    path = Path(name_or_path)
    if not path.exists():
        near = difflib.get_close_matches(name_or_path, list(NAMED), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise DataError(f"unknown dataset '{name_or_path}': not one of {sorted(NAMED)} and no such file."
                        f"{hint}")
    return path


def load_records(name_or_path: str, split: str, data_dir: str | Path = "data/raw", *,
                 skip_bad_rows: bool = False, problems: list | None = None) -> list[dict]:
    """Read one split into the record schema. Bad rows raise DataError (file:line) unless skipped;
    skipped rows are appended to `problems` as {"where", "why"}."""
    path = dataset_files(name_or_path, split, data_dir)
    source = name_or_path if name_or_path in NAMED else path.stem
    convert = {"gsm8k": _gsm8k, "math": _math, "math500": _math}.get(name_or_path, _generic)
    rows = _math_tree_rows(path) if path.is_dir() else _read_rows(path, skip_bad_rows, problems)
    out = []
    for idx, (where, row) in enumerate(rows):
        try:
            out.append(convert(row, where, source, split, idx))
        except KeyError as e:
            _bad(where, e.args[0] if e.args else str(e), skip_bad_rows, problems)
    return out


# ----------------------------------------------------------------------------- templates

@dataclass(frozen=True)
class Template:
    """A prompt format, loaded from data/prompts/<name>.json (format: docs/data.md)."""
    name: str
    kind: Literal["text", "tulu", "chat"]
    prompt: str = "{question}"  # user text; placeholders {question} {solution} {answer} {solution_boxed}
    completion: str = "{solution_boxed}"  # trained target (the tokenizer's EOS is appended)
    system: str | None = None  # optional system message (tulu/chat)
    stop: tuple[str, ...] = ()  # extra stop strings for decoding (EOS always stops)
    add_special_tokens: bool = True  # let the tokenizer add BOS (Llama) when encoding the text
    description: str = ""


def load_template(name: str, prompts_dir: str | Path = REPO / "data" / "prompts") -> Template:
    """Template by name (data/prompts/<name>.json) or by path to a .json file."""
    path = Path(name) if name.endswith(".json") else Path(prompts_dir) / f"{name}.json"
    if not path.exists():
        have = sorted(p.stem for p in Path(prompts_dir).glob("*.json"))
        raise DataError(f"template '{name}' not found ({path}); available: {have}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: malformed JSON ({e})") from e
    known = {f.name for f in fields(Template)}
    for k in spec:
        if k not in known:
            near = difflib.get_close_matches(k, known, n=1)
            raise DataError(f"{path}: unknown key '{k}'" + (f"; did you mean '{near[0]}'?" if near else "")
                            + f" (allowed: {sorted(known)})")
    spec.setdefault("name", path.stem)
    if spec.get("kind") not in ("text", "tulu", "chat"):
        raise DataError(f"{path}: 'kind' must be text, tulu or chat (got {spec.get('kind')!r})")
    spec["stop"] = tuple(spec.get("stop", ()))
    return Template(**spec)


def _solution_boxed(record: dict) -> str:
    """The solution ending with its final answer in \\boxed{} (MATH solutions already have one)."""
    sol = (record.get("solution") or "").strip()
    answer = record.get("answer") or record.get("meta", {}).get("answer_raw")  # GSM8K: 1000, not 1,000
    if answer is None or extract_boxed(sol) is not None:
        return sol
    return f"{sol}\nThe final answer is \\boxed{{{answer}}}".lstrip()


def _fill(text: str, record: dict) -> str:
    values = {"question": record.get("question") or "", "solution": record.get("solution") or "",
              "answer": record.get("answer") or "", "solution_boxed": None}
    def sub(m):
        if m.group(1) == "solution_boxed":
            return _solution_boxed(record)
        return values[m.group(1)]
    return re.sub(r"\{(question|solution|answer|solution_boxed)\}", sub, text)


def _messages(template: Template, record: dict) -> list[dict]:
    msgs = record.get("meta", {}).get("messages")
    if msgs is None:
        msgs = [{"role": "user", "content": _fill(template.prompt, record)},
                {"role": "assistant", "content": _fill(template.completion, record)}]
    if template.system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": template.system}, *msgs]
    return msgs


def _merge(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for text, trained in segments:
        if out and out[-1][1] == trained:
            out[-1] = (out[-1][0] + text, trained)
        elif text:
            out.append((text, trained))
    return out


def _chat_segments(msgs: list[dict], tokenizer) -> list[tuple[str, bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"template 'chat' needs a tokenizer with a chat_template; "
                        f"{tokenizer.name_or_path} has none (use --template tulu or boxed)")
    segments, done = [], ""
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(msgs[:k], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs[:k + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(f"the chat template of {tokenizer.name_or_path} is not prefix-stable "
                            "(a later turn rewrites earlier text); use --template tulu")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    if msgs[-1]["role"] != "assistant":  # prompt only (evaluation)
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        segments.append((prompt[len(done):], False))
    return segments


def render_example(template: Template, record: dict, tokenizer) -> list[tuple[str, bool]]:
    """Text segments with trained flags; their concatenation is the exact training string."""
    eos = tokenizer.eos_token or ""
    if template.kind == "text":
        segs = [(_fill(template.prompt, record), False)]
        if record.get("solution") is not None:
            segs.append((_fill(template.completion, record) + eos, True))
        return _merge(segs)
    msgs = _messages(template, record)
    if template.kind == "chat":
        return _merge(_chat_segments(msgs, tokenizer))
    segs = []  # tulu, exactly LESS's concat_messages: loss on assistant content + EOS + "\n"
    for m in msgs:
        if m["role"] == "assistant":
            segs += [("<|assistant|>\n", False), (m["content"].strip() + eos + "\n", True)]
        else:
            segs.append((f"<|{m['role']}|>\n" + m["content"].strip() + "\n", False))
    if msgs[-1]["role"] != "assistant":
        segs.append(("<|assistant|>\n", False))
    return _merge(segs)


def render_prompt(template: Template, question: str, tokenizer) -> str:
    """What evaluation feeds the model: the training text up to where the completion starts."""
    record = {"question": question, "solution": None, "answer": None, "meta": {}}
    if template.kind != "text":
        record["meta"]["messages"] = [{"role": "user", "content": _fill(template.prompt, record)}]
    return "".join(t for t, trained in render_example(template, record, tokenizer) if not trained)


def encode_prompt(template: Template, question: str, tokenizer) -> list[int]:
    """Token ids of render_prompt, with BOS exactly as in training."""
    text = render_prompt(template, question, tokenizer)
    return tokenizer(text, add_special_tokens=template.add_special_tokens)["input_ids"]


# ----------------------------------------------------------------------------- tokenization

def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer  # lazy: a warm cache never loads it
    if not Path(path).is_dir():
        raise DataError(f"tokenizer folder not found: {path} (pass --tokenizer a local folder with "
                        "tokenizer.json or vocab/merges files)")
    tok = AutoTokenizer.from_pretrained(str(path))
    if not tok.is_fast:
        print(f"warning: {path} loaded a slow tokenizer; tokenization will be slow", file=sys.stderr)
    return tok


_WORKER_TOK = None


def _worker_init(tokenizer_path: str) -> None:
    global _WORKER_TOK
    _WORKER_TOK = load_tokenizer(tokenizer_path)


def _worker_encode(args) -> list[tuple[np.ndarray, np.ndarray]]:
    return _encode_batch(_WORKER_TOK, *args)


def _encode_batch(tokenizer, texts: list[str], add_special: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, start character of each token) per text, from the Rust tokenizer in one call."""
    encs = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special)
    return [(np.asarray(e.ids, dtype=np.uint32), np.asarray([o[0] for o in e.offsets], dtype=np.int64))
            for e in encs]


def _encode(texts: list[str], tokenizer, add_special: bool, num_proc: int, tokenizer_path) -> list:
    """Batch-encode with the fast tokenizer (Rust threads); num_proc > 1 adds processes on top."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{tokenizer.name_or_path}: a fast tokenizer (tokenizer.json or vocab/merges) is "
                        "needed for offsets-based loss masks")
    if num_proc <= 1 or len(texts) < 2000:
        return _encode_batch(tokenizer, texts, add_special)
    import multiprocessing as mp
    size = -(-len(texts) // num_proc)
    chunks = [(texts[i:i + size], add_special) for i in range(0, len(texts), size)]
    with mp.get_context("spawn").Pool(num_proc, _worker_init, (str(tokenizer_path),)) as pool:
        return [enc for part in pool.map(_worker_encode, chunks) for enc in part]


def tokenize_records(records: list[dict], template: Template, tokenizer, max_seq_length: int,
                     truncation: str = "truncate", num_proc: int = 1, tokenizer_path=None,
                     progress=None) -> dict:
    """Render and tokenize the full text once; a token is trained when its first character lies in a
    trained segment (completion, EOS included). Returns tokens, masks, kept indices and counts.
    `progress(done, total)` is called after each chunk of rows."""
    if truncation not in ("truncate", "drop"):
        raise DataError(f"--truncation must be 'truncate' or 'drop', not {truncation!r}")
    chunk = TOKENIZE_CHUNK if num_proc <= 1 else max(len(records), 1)  # one process pool for num_proc > 1
    tokens, masks, kept, stats = [], [], [], Counter()
    for lo in range(0, len(records), chunk):
        _tokenize_chunk(records[lo:lo + chunk], lo, template, tokenizer, max_seq_length, truncation, num_proc,
                        tokenizer_path, (tokens, masks, kept, stats))
        if progress is not None:
            progress(min(lo + chunk, len(records)), len(records))
    return {"tokens": tokens, "masks": masks, "kept": kept, "stats": dict(stats)}


def _tokenize_chunk(records, first: int, template, tokenizer, max_seq_length, truncation, num_proc,
                    tokenizer_path, out) -> None:
    """tokenize_records on records[first:first + len(records)]: appends to out = (tokens, masks, kept, stats)."""
    tokens, masks, kept, stats = out
    texts, bounds = [], []
    for rec in records:
        segs = render_example(template, rec, tokenizer)
        texts.append("".join(t for t, _ in segs))
        bounds.append((np.cumsum([len(t) for t, _ in segs]), np.array([f for _, f in segs], dtype=np.uint8)))
    encs = _encode(texts, tokenizer, template.add_special_tokens, num_proc, tokenizer_path) if texts else []
    for i, ((ids, starts), (ends, flags)) in enumerate(zip(encs, bounds), first):
        mask = flags[np.minimum(np.searchsorted(ends, starts, side="right"), len(flags) - 1)]
        if len(ids) > max_seq_length:
            stats["truncated" if truncation == "truncate" else "dropped"] += 1
            if truncation == "drop":
                continue
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
        if not mask.any():
            stats["no_target"] += 1
        tokens.append(ids)
        masks.append(mask)
        kept.append(i)


def write_token_cache(out: Path, tok: dict, meta: dict) -> None:
    """tokens.npy (uint32), loss_mask.npy (uint8), doc_offsets.npy (int64, n+1), meta.json."""
    out.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(t) for t in tok["tokens"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    empty32, empty8 = np.zeros(0, np.uint32), np.zeros(0, np.uint8)
    np.save(out / "tokens.npy", np.concatenate(tok["tokens"]) if tok["tokens"] else empty32)
    np.save(out / "loss_mask.npy", np.concatenate(tok["masks"]) if tok["masks"] else empty8)
    np.save(out / "doc_offsets.npy", offsets)
    meta = {**meta, "num_docs": len(lengths), "num_tokens": int(offsets[-1]),
            "num_trained_tokens": int(sum(int(m.sum()) for m in tok["masks"])),
            "max_doc_len": int(lengths.max()) if len(lengths) else 0, **tok["stats"]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# ----------------------------------------------------------------------------- prepare

def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        for f in sorted(p.rglob("*.json")) if p.is_dir() else [p]:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def _tokenizer_files(path: Path) -> list[Path]:
    pats = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "added_tokens.json", "*.model",
            "chat_template*")
    return sorted({f for pat in pats for f in Path(path).glob(pat) if f.is_file()})


def _source_splits(source: str, data_dir) -> dict[str, Path]:
    if source == "math500":
        raise DataError("math500 is an evaluation set (test only), not a training source; "
                        "use --datasets gsm8k math or a jsonl path")
    if source in NAMED:
        return {s: dataset_files(source, s, data_dir) for s in NAMED[source]}
    return {"train": dataset_files(source, "train", data_dir)}


def _seeded_rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) for k in keys)])


def _carve(records: list[dict], n_take: int, rng) -> tuple[list[dict], list[dict]]:
    """Take n_take seeded records out; the rest keep their original order."""
    pick = set(rng.permutation(len(records))[:n_take].tolist())
    rest = [r for i, r in enumerate(records) if i not in pick]
    taken = [r for i, r in enumerate(records) if i in pick]
    return rest, taken


def _split_source(source, files, data_dir, seed, valid_fraction, split_ratios, skip_bad_rows, problems):
    recs = {s: load_records(source, s, data_dir, skip_bad_rows=skip_bad_rows, problems=problems)
            for s in files}
    train = recs["train"]
    if "test" in recs or split_ratios is None:
        train, valid = _carve(train, round(len(train) * valid_fraction), _seeded_rng(seed, source, "valid"))
        test = recs.get("test", [])
    else:
        r = np.asarray(split_ratios, dtype=float) / sum(split_ratios)
        n_valid, n_test = round(len(train) * r[1]), round(len(train) * r[2])
        rng = _seeded_rng(seed, source, "split")
        train, held = _carve(train, n_valid + n_test, rng)
        valid, test = held[:n_valid], held[n_valid:]
    for split, rs in (("train", train), ("valid", valid), ("test", test)):
        for r in rs:
            r["split"] = split
    return {"train": train, "valid": valid, "test": test}


def stratified_sample(records: list[dict], n: int, seed: int) -> list[dict]:
    """n records spread over (level, subject) cells in proportion to their sizes (largest remainder)."""
    cells = defaultdict(list)
    for r in records:
        cells[(str(r["meta"].get("level")), str(r["meta"].get("subject")))].append(r)
    keys = sorted(cells)
    quota = np.array([len(cells[k]) for k in keys], dtype=float) * min(n, len(records)) / len(records)
    take = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - take), kind="stable")[: min(n, len(records)) - take.sum()]:
        take[j] += 1
    rng = _seeded_rng(seed, "stratify")
    chosen = {id(cells[k][i]) for k, t in zip(keys, take) for i in rng.permutation(len(cells[k]))[:t]}
    return [r for r in records if id(r) in chosen]


def mix(pools: dict[str, list[dict]], ratios: list[float] | None, seed: int) -> list[dict]:
    """Concatenate (proportional, the default) or sample each source to a target share, no upsampling."""
    if ratios is None:
        return [r for pool in pools.values() for r in pool]
    if len(ratios) != len(pools) or min(ratios) < 0 or sum(ratios) <= 0:
        raise DataError(f"--ratios needs one non-negative weight per dataset ({len(pools)}), got {ratios}")
    share = np.asarray(ratios, dtype=float) / sum(ratios)
    total = min(len(p) / s for p, s in zip(pools.values(), share) if s > 0)
    out = []
    for (name, pool), s in zip(pools.items(), share):
        n = int(round(total * s))
        idx = np.sort(_seeded_rng(seed, name, "mix").permutation(len(pool))[:n])
        out += [pool[i] for i in idx]
    return out


def sample_percentage(records: list[dict], percentage: float, sample_seed: int = 42) -> list[dict]:
    """LESS's --percentage: the first n of np.random.permutation under np.random.seed(sample_seed)."""
    n = int(len(records) * percentage)
    if n == len(records):
        return records
    state = np.random.get_state()
    np.random.seed(sample_seed)
    idx = np.random.permutation(len(records))[:n]
    np.random.set_state(state)
    return [records[i] for i in idx]


def _norm_q(q: str) -> str:
    return re.sub(r"\W+", " ", q.lower()).strip()


def validate(splits: dict[str, list[dict]], problems: list[dict], skip_bad_rows: bool) -> tuple[dict, dict]:
    """Check the split records; drop (or fail on) rows with empty fields; return (splits, report)."""
    report = {"malformed_rows": list(problems), "empty_fields": [], "gold_missing": [],
              "level_unknown": [], "duplicates": {}, "contamination": {}}
    for split, recs in splits.items():
        kept = []
        for r in recs:
            empty = [k for k in ("question", "solution") if not (r[k] or "").strip() and split != "test"]
            if empty:
                report["empty_fields"].append({"id": r["id"], "split": split, "fields": empty})
                _bad(f"{r['source']} {split} id {r['id']}", f"empty {', '.join(empty)}", skip_bad_rows, None)
                continue
            if r["answer"] is None and r["source"] in NAMED:
                report["gold_missing"].append(r["id"])
            if r["source"] in ("math", "math500") and r["meta"].get("level") is None:
                report["level_unknown"].append(r["id"])
            kept.append(r)
        splits[split] = kept
    norm = {s: Counter(_norm_q(r["question"]) for r in rs) for s, rs in splits.items()}
    exact = {s: {r["question"].strip() for r in rs} for s, rs in splits.items()}
    ids = {s: {_norm_q(r["question"]): r["id"] for r in rs} for s, rs in splits.items()}
    for s, c in norm.items():
        dup = [ids[s][q] for q, v in c.items() if v > 1]
        report["duplicates"][s] = {"count": sum(v - 1 for v in c.values() if v > 1), "examples": dup[:10]}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        both = sorted(set(norm[a]) & set(norm[b]))
        report["duplicates"][f"{a}&{b}"] = {"count": len(both), "examples": [ids[a][q] for q in both[:10]]}
    for a in ("train", "valid"):
        report["contamination"][f"{a}_vs_test_exact"] = len(exact[a] & exact["test"])
        report["contamination"][f"{a}_vs_test_normalized"] = report["duplicates"][f"{a}&test"]["count"]
    return splits, report


def _report_md(report: dict) -> str:
    lines = [f"# Data report `{report['key']}`", "", f"sources: {', '.join(report['sources'])}; "
             f"template `{report['template']}`; max_seq_length {report['max_seq_length']} "
             f"({report['truncation']}); seed {report['seed']}", "", "| split | rows | by source |",
             "| --- | ---: | --- |"]
    for s, n in report["sizes"].items():
        lines.append(f"| {s} | {n} | {report['sizes_by_source'][s]} |")
    lines += ["", "| check | value |", "| --- | --- |"]
    for k in ("malformed_rows", "empty_fields", "gold_missing", "level_unknown"):
        v = report[k]
        lines.append(f"| {k} | {len(v)}" + (f" (e.g. {v[:5]})" if v else "") + " |")
    for k, v in report["duplicates"].items():
        lines.append(f"| duplicate questions {k} | {v['count']}" + (f" (e.g. {v['examples'][:5]})"
                                                                  if v["count"] else "") + " |")
    for k, v in report["contamination"].items():
        lines.append(f"| contamination {k} | {v} |")
    for s, st in report["tokenized"].items():
        lines.append(f"| tokenized {s} | {st} |")
    return "\n".join(lines) + "\n"


def cache_key(sources, data_dir, tokenizer_path, template_path: Path, settings: dict) -> str:
    """Hash of raw file contents, tokenizer files, template file and every setting."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **settings}, sort_keys=True).encode())
    for s in sources:
        for split, path in sorted(_source_splits(s, data_dir).items()):
            h.update(f"{s}:{split}:{_sha256_files([path])}".encode())
    h.update(_sha256_files(_tokenizer_files(Path(tokenizer_path))).encode())
    h.update(template_path.read_bytes())
    return h.hexdigest()[:16]


def prepare(sources: list[str], split: str = "train", data_dir: str | Path = "data/raw",
            tokenizer_path: str | Path = "", template: str = "boxed", max_seq_length: int = 2048,
            out_dir: str | Path = "data/processed", seed: int = 0, truncation: str = "truncate",
            ratios: list[float] | None = None, percentage: float = 1.0, sample_seed: int = 42,
            skip_bad_rows: bool = False, valid_fraction: float = 0.05,
            split_ratios: list[float] | None = None, math_levels: list[int] | None = None,
            math_sample: int | None = None, num_proc: int = 1,
            prompts_dir: str | Path = REPO / "data" / "prompts", progress: bool = True) -> Path:
    """Build (or reuse) the cache; return <out_dir>/<key>/<split> ('train' or 'valid').
    The folder holds tokens.npy, loss_mask.npy, doc_offsets.npy and meta.json (it is absent when the
    split is empty, e.g. valid_fraction=0); the key folder also holds records/{train,valid,test}.jsonl
    and report.{json,md}. Every split's meta.json counts `skipped_rows` (bad rows skipped with
    --skip_bad_rows) and `truncated` / `dropped` examples; `progress` prints tokenization progress and
    those counts (summary_line) to stderr."""
    if split not in ("train", "valid"):
        raise DataError(f"split must be 'train' or 'valid' (test is evaluated from records), not {split!r}")
    if not sources:
        raise DataError("no datasets given: pass --datasets gsm8k math (or jsonl paths)")
    tpl = load_template(template, prompts_dir)
    tpl_path = Path(template) if template.endswith(".json") else Path(prompts_dir) / f"{template}.json"
    settings = dict(sources=list(sources), max_seq_length=max_seq_length, truncation=truncation, seed=seed,
                    ratios=ratios, percentage=percentage, sample_seed=sample_seed, skip_bad_rows=skip_bad_rows,
                    valid_fraction=valid_fraction, split_ratios=split_ratios, math_levels=math_levels,
                    math_sample=math_sample, template=tpl.name)
    if not Path(tokenizer_path).is_dir():
        load_tokenizer(tokenizer_path)  # raises the clear error
    key = cache_key(sources, data_dir, tokenizer_path, tpl_path, settings)
    root = Path(out_dir) / f"{'+'.join(Path(s).stem for s in sources)}-{tpl.name}-{key}"
    if not root.exists():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=out_dir))
        try:
            _build(tmp, key, sources, data_dir, tokenizer_path, tpl, settings, num_proc, progress)
            os.rename(tmp, root)  # atomic publish; a concurrent run that won keeps its copy
        except OSError:
            if not root.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif progress:
        _say(f"data: reusing the cache {root}")
    if progress:
        _say(summary_line(root))
    return root / split


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress(what: str, enabled: bool, every_s: float = 2.0):
    """progress(done, total) for tokenize_records: a line at the first chunk, every `every_s`, and at the end."""
    t0, last = time.time(), [None]

    def show(done: int, total: int) -> None:
        now = time.time()
        if enabled and (last[0] is None or done == total or now - last[0] >= every_s):
            last[0] = now
            _say(f"data: tokenizing {what}: {done:,}/{total:,} rows ({now - t0:.1f}s)")
    return show


def summary_line(root: str | Path) -> str:
    """One line on a cache's contents (`data: ` + report_counts of its report.json)."""
    return "data: " + report_counts(json.loads((Path(root) / "report.json").read_text()))


def report_counts(report: dict) -> str:
    """Examples per split, bad rows skipped and examples truncated or dropped (a data cache's report.json);
    prepare prints it, sft.py writes it into train.log."""
    parts = [f"{n:,} {s}" for s, n in report.get("sizes", {}).items()]
    bad = len(report.get("malformed_rows", [])) + len(report.get("empty_fields", []))
    parts.append(f"{bad} bad rows skipped")
    for split, st in report.get("tokenized", {}).items():
        parts += [f"{st[k]} {split} examples {k} (longer than --max_seq_length)" for k in ("truncated", "dropped")
                  if st.get(k)]
    return ", ".join(parts) + " (details: report.md in the data cache)"


def _build(tmp: Path, key: str, sources, data_dir, tokenizer_path, tpl: Template, st: dict, num_proc: int,
           progress: bool = False):
    t0 = time.time()
    problems: list[dict] = []
    per = {s: _split_source(s, _source_splits(s, data_dir), data_dir, st["seed"], st["valid_fraction"],
                            st["split_ratios"], st["skip_bad_rows"], problems) for s in sources}
    if "math" in per and st["math_levels"]:
        per["math"]["train"] = [r for r in per["math"]["train"] if r["meta"]["level"] in st["math_levels"]]
    if "math" in per and st["math_sample"]:
        per["math"]["train"] = stratified_sample(per["math"]["train"], st["math_sample"], st["seed"])
    train = mix({s: p["train"] for s, p in per.items()}, st["ratios"], st["seed"])
    train = sample_percentage(train, st["percentage"], st["sample_seed"])
    splits = {"train": train, "valid": [r for p in per.values() for r in p["valid"]],
              "test": [r for p in per.values() for r in p["test"]]}
    splits, report = validate(splits, problems, st["skip_bad_rows"])
    tok = load_tokenizer(tokenizer_path)
    import tokenizers
    import transformers
    base_meta = {"key": key, "template": asdict(tpl), "tokenizer": str(tokenizer_path),
                 "eos_id": tok.eos_token_id, "bos_id": tok.bos_token_id,
                 "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                 "vocab_size": len(tok), "settings": st,
                 "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                              "numpy": np.__version__, "python": sys.version.split()[0]}}
    (tmp / "records").mkdir()
    report["tokenized"] = {}
    for split, recs in splits.items():
        if split != "test" and recs:  # an empty split gets no token folder
            out = tokenize_records(recs, tpl, tok, st["max_seq_length"], st["truncation"], num_proc,
                                   tokenizer_path, _progress(split, progress))
            recs = [recs[i] for i in out["kept"]]
            skipped = len(report["malformed_rows"]) + len(report["empty_fields"])
            write_token_cache(tmp / split, out, {**base_meta, "split": split, "skipped_rows": skipped})
            report["tokenized"][split] = {"docs": len(recs), **out["stats"]}
        with open(tmp / "records" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        splits[split] = recs
    report.update(key=key, sources=list(sources), template=tpl.name, max_seq_length=st["max_seq_length"],
                  truncation=st["truncation"], seed=st["seed"], settings=st,
                  sizes={s: len(r) for s, r in splits.items()},
                  sizes_by_source={s: dict(Counter(x["source"] for x in r)) for s, r in splits.items()},
                  seconds=round(time.time() - t0, 2))
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "report.md").write_text(_report_md(report))


# ----------------------------------------------------------------------------- CLI

@dataclass
class PrepareConfig:
    """python data.py prepare: build the token cache (flags override --config YAML)."""
    datasets: tuple[str, ...] = ("gsm8k",)  # names (gsm8k, math) or jsonl/parquet paths
    data_dir: str = "data/raw"  # holds <name>/{train,test}.jsonl (or MATH's train/<subject>/<n>.json)
    tokenizer: str = "models/Qwen2.5-0.5B"  # local folder with the tokenizer files (sft.py's default model)
    template: str = "boxed"  # data/prompts/<name>.json: plain, boxed, tulu, chat
    max_seq_length: int = 2048
    truncation: Literal["truncate", "drop"] = "truncate"  # over-long examples
    out_dir: str = "data/processed"
    seed: int = 0  # splits, mixing, stratified sampling
    valid_fraction: float = 0.05  # validation carved from train (datasets with an official test)
    split_ratios: tuple[float, float, float] | None = None  # e.g. 8 1 1 for files without a split
    ratios: tuple[float, ...] | None = None  # mixing weights, one per dataset; default proportional
    percentage: float = 1.0  # LESS --percentage of the pooled train set
    sample_seed: int = 42  # LESS --sample_data_seed
    math_levels: tuple[int, ...] | None = None  # keep only these MATH levels
    math_sample: int | None = None  # stratified (level x subject) sample of MATH train
    skip_bad_rows: bool = False  # skip and count malformed rows instead of failing
    num_proc: int = 1  # tokenizer processes (the fast tokenizer already uses threads)


def parse_config(argv: list[str]) -> PrepareConfig:
    """--config YAML gives defaults, flags override; unknown YAML keys fail with a did-you-mean (cli.py)."""
    import cli

    return cli.parse_config(PrepareConfig, argv, prog="data.py prepare")[0]


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "prepare":
        raise SystemExit("usage: python data.py prepare [--config configs/data_gsm8k.yaml] [flags]; "
                         "see python data.py prepare --help")
    cfg = parse_config(argv[1:])
    kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    t0 = time.time()
    path = prepare(kw.pop("datasets"), tokenizer_path=kw.pop("tokenizer"), **kw)
    print((path.parent / "report.md").read_text())
    print(f"cache: {path.parent} ({time.time() - t0:.2f}s)")


if __name__ == "__main__":
    import cli

    cli.run_main(main, user_errors=(DataError,))
