"""Raw dataset files -> the record schema (data.py's first stage), with the gold answer of each problem.

    records.load_records("gsm8k", "train", "../shared/data") -> [{"id", "source", "split", "question",
                                                                 "solution", "answer", "meta"}, ...]

Named datasets (gsm8k, math, math500) and generic jsonl/parquet files; bad rows raise DataError naming
file:line, or are skipped and counted. Gold answers are read and normalised by the grader (grader.py), so
a stored gold is exactly what evaluation compares against. Formats: docs/data.md.
"""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

NAMED = {"gsm8k": ("train", "test"), "math": ("train", "test"), "math500": ("test",)}
GOLD_CODE = ("grader.py", "mathparse.py")  # the files that read gold answers (part of data.py's cache key)
_BOX = re.compile(r"\\(?:boxed|fbox)\b")
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{?\s*")


class DataError(ValueError):
    """Bad input data or arguments; the message names the file/line/flag and the fix."""


# ----------------------------------------------------------------------------- gold answers

def boxed_answer(solution: str) -> str | None:
    """The answer in the last \\boxed{...} / \\fbox{...} (also `\\boxed 5`) of a worked solution, or None.
    grader.extract_answer reads it from that box to the end of its paragraph, so neither earlier boxes (which
    the grader joins for model responses) nor a later remark ("... the answer is 24?") count; an unbalanced or
    empty box falls back to the box before it."""
    import grader  # lazy: loading sympy is only paid when raw files are read

    for m in reversed(list(_BOX.finditer(solution))):
        tail = solution[m.start():].split("\n\n", 1)[0]
        answer, _ = grader.extract_answer(tail, "math")
        if answer and tail.startswith(answer, _BOX_OPEN.match(tail).end()):  # read from this box
            return answer
    return None


def gold_answer(raw: str, dataset: str) -> str:
    """A raw gold answer in grader.normalize_answer's form; GSM8K numbers without thousands separators (the
    training target boxes 1080, not 1,080; the grader reads both as the same number)."""
    import grader

    gold = grader.normalize_answer(raw)
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", gold) if dataset == "gsm8k" else gold


def gsm8k_final_answer(text: str) -> str | None:
    """The gold number after the last `####` of a GSM8K answer ("#### 1,000" -> "1000"), or None."""
    if "####" not in text:
        return None
    return gold_answer(text.rsplit("####", 1)[1], "gsm8k") or None


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
                bad_row(f"{path}:{i}", f"not UTF-8 text at byte offset {start + e.start} of the file "
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
                bad_row(f"{path}:{i}", f"malformed JSON ({e})", skip_bad_rows, problems)
                continue
            n += 1
            yield f"{path}:{i}", row
    if n == 0 and not (problems and any(p["where"].startswith(f"{path}:") for p in problems)):
        raise DataError(f"{path}: the file is empty (expected one JSON object per line)")


def bad_row(where: str, why: str, skip_bad_rows: bool, problems: list | None) -> None:
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
    raw = row["answer"] if isinstance(row.get("answer"), str) else boxed_answer(row["solution"])
    uid = row.get("unique_id") or row.get("id") or f"{source}/{split}/{idx}"
    return _record(uid, source, split, row["problem"], row["solution"],
                   (gold_answer(raw, "math") or None) if raw is not None else None, answer_raw=raw,
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
            bad_row(where, e.args[0] if e.args else str(e), skip_bad_rows, problems)
    return out

