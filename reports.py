"""evalmath's reporting half: result dicts -> summaries, reports with charts, comparisons, manual review;
and the report of a training run folder.

Pure Python over the files `evalmath.py` and `sft.py` write (no torch, no model); charts are SVG (svg.py):

- `summarize(items)`: accuracy with its standard error, per MATH subject and level, average
  solution length in tokens, truncation and no-answer rates, pass@k and maj@k when items hold
  several samples.
- `write_report(result, reports_dir)`: `<reports_dir>/<run_id>.md` and `.csv` (one row per item), with
  `<run_id>-level.svg` / `-subject.svg` (accuracy per MATH level and subject) linked from the Markdown.
- `compare(results)`: one markdown table over several runs (base vs checkpoints); `plot_groups` draws the
  per-subject and per-level accuracies of every run side by side.
- `write_run_report(job_dir, out_dir)`: a training run folder (metrics.jsonl, config.json, checkpoints) ->
  `<job>.md` with the training loss, learning rate and validation loss / accuracy against steps
  (`<job>-loss.svg`, `-lr.svg`, `-accuracy.svg`).
- Manual review: `export_failures(result, csv_path)` and `import_verdicts(result, csv_path)`; the
  imported verdicts go into `manual_correct` next to `correct`, and `summary_manual` is recomputed
  beside the automatic `summary` (both are kept).

Paths shown in reports are relative to the repository (`show_path`), never absolute machine paths.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import svg
from cli import UserError

REPO = Path(__file__).resolve().parent
RESULT_KEYS = ("run_id", "config", "summary", "items")
ITEM_CSV_FIELDS = ["id", "correct", "manual_correct", "extracted", "gold", "error_type", "n_tokens",
                   "truncated", "subject", "level"]
REVIEW_CSV_FIELDS = ["id", "gold", "extracted", "error_type", "correct", "manual_correct", "question",
                     "response"]


# ----------------------------------------------------------------------------- statistics

def stderr_of_mean(p: float, n: int) -> float:
    """Standard error of a mean of n 0/1 outcomes, with the sample (n-1) variance, as lm-eval reports it."""
    return math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): probability that k of the n samples contain a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(samples: list[dict]) -> dict | None:
    """The sample whose extracted answer is the most frequent (ties: the earliest); None if no answers."""
    answers = [s["extracted"].strip() for s in samples if s.get("extracted") is not None]
    if not answers:
        return None
    counts = Counter(answers)
    best = max(counts.values())
    winner = next(a for a in answers if counts[a] == best)
    return next(s for s in samples if s.get("extracted") is not None and s["extracted"].strip() == winner)


def _verdict(item: dict, manual: bool) -> bool:
    if manual and item.get("manual_correct") is not None:
        return bool(item["manual_correct"])
    return bool(item["correct"])


def _acc(flags: list[bool]) -> dict:
    n = len(flags)
    acc = sum(flags) / n if n else 0.0
    return {"n": n, "correct": sum(flags), "accuracy": acc, "stderr": stderr_of_mean(acc, n)}


def summarize(items: list[dict], manual: bool = False) -> dict:
    """Summary of per-item results; `manual=True` uses `manual_correct` where a reviewer set one."""
    flags = [_verdict(it, manual) for it in items]
    out = _acc(flags)
    n = len(items)
    out["avg_tokens"] = sum(it.get("n_tokens", 0) for it in items) / n if n else 0.0
    out["truncation_rate"] = sum(bool(it.get("truncated")) for it in items) / n if n else 0.0
    out["no_answer_rate"] = sum(it.get("extracted") is None for it in items) / n if n else 0.0
    out["error_types"] = dict(Counter(it["error_type"] for it in items if it.get("error_type")))
    for key in ("subject", "level"):
        groups: dict[str, list[bool]] = defaultdict(list)
        for it, ok in zip(items, flags):
            if it.get(key) is not None:
                groups[str(it[key])].append(ok)
        if groups:
            out[f"by_{key}"] = {g: _acc(v) for g, v in sorted(groups.items())}
    if items and "samples" in items[0]:
        out.update(_sampled_metrics(items))
    if manual:
        out["n_reviewed"] = sum(it.get("manual_correct") is not None for it in items)
    return out


def _sampled_metrics(items: list[dict]) -> dict:
    """pass@k for k = 1, 2, 4, ... up to the number of samples, and maj@k over all samples."""
    n_samples = min(len(it["samples"]) for it in items)
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n_samples} | {n_samples})
    out = {"n_samples": n_samples}
    for k in ks:
        vals = [pass_at_k(len(it["samples"]), sum(s["correct"] for s in it["samples"]), k) for it in items]
        out[f"pass@{k}"] = sum(vals) / len(vals)
    maj = [bool(it.get("majority_correct")) for it in items]
    out[f"maj@{n_samples}"] = sum(maj) / len(maj)
    out[f"maj@{n_samples}_stderr"] = stderr_of_mean(out[f"maj@{n_samples}"], len(maj))
    return out


# ----------------------------------------------------------------------------- result files

def load_result(run: str | os.PathLike, eval_dir: str | os.PathLike = "outputs/eval") -> tuple[dict, Path]:
    """A result JSON given as a path, or as a run_id searched under `eval_dir/<dataset>/<run_id>.json`."""
    path = Path(run)
    if not path.is_file():
        hits = sorted(Path(eval_dir).glob(f"*/{run}.json"))
        if len(hits) != 1:
            what = "no file" if not hits else f"{len(hits)} files ({', '.join(map(str, hits))})"
            raise UserError(f"run {run!r}: {what} found as a path or as {eval_dir}/*/{run}.json; "
                            "pass the result JSON's path")
        path = hits[0]
    expected = "expected a result JSON that evalmath.py writes (outputs/eval/<dataset>/<run_id>.json)"
    raw = path.read_bytes()
    try:
        result = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); {expected}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); {expected}") from None
    missing = [k for k in RESULT_KEYS if k not in result] if isinstance(result, dict) else list(RESULT_KEYS)
    if missing or not isinstance(result.get("summary"), dict) or not isinstance(result.get("items"), list):
        got = f"keys {sorted(result)[:8]}" if isinstance(result, dict) else f"a JSON {type(result).__name__}"
        raise UserError(f"{path}: not a result file (missing {', '.join(missing) or 'summary/items'}; got {got}); "
                        f"{expected}")
    return result, path


# ----------------------------------------------------------------------------- single-run report

def show_path(p: str | os.PathLike | None) -> str | None:
    """A path as a report shows it: relative to the repository when absolute (`../shared/...` outside it);
    names that are not local paths (e.g. a hub id) as they are."""
    if p is None:
        return None
    s = str(p)
    return os.path.relpath(s, REPO) if os.path.isabs(s) else s


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _summary_lines(s: dict) -> list[str]:
    lines = [f"| accuracy | {_pct(s['accuracy'])} ± {_pct(s['stderr'])} ({s['correct']}/{s['n']}) |",
             f"| avg solution tokens | {s['avg_tokens']:.1f} |",
             f"| truncation rate | {_pct(s['truncation_rate'])} |",
             f"| no-answer rate | {_pct(s['no_answer_rate'])} |"]
    for key in sorted(k for k in s if k.startswith(("pass@", "maj@")) and not k.endswith("_stderr")):
        lines.append(f"| {key} | {_pct(s[key])} |")
    return lines


def _breakdown_lines(s: dict, key: str) -> list[str]:
    if f"by_{key}" not in s:
        return []
    lines = ["", f"### By {key}", "", f"| {key} | n | accuracy |", "| --- | ---: | ---: |"]
    for g, v in s[f"by_{key}"].items():
        lines.append(f"| {g} | {v['n']} | {_pct(v['accuracy'])} ± {_pct(v['stderr'])} |")
    return lines


def render_markdown(result: dict, charts: list[Path] | None = None) -> str:
    """The run's Markdown report; `charts` (SVG files next to it) are linked after the breakdowns."""
    cfg, s = result["config"], result["summary"]
    proto, dec = cfg["protocol"], cfg["decoding"]
    lines = [f"# {result['run_id']}", "",
             f"- model: `{show_path(cfg['model'])}`"
             + (f" + adapter `{show_path(cfg['adapter'])}`" if cfg.get("adapter") else ""),
             f"- base model: `{show_path(cfg.get('base_model') or cfg['model'])}`"
             + (f" (fine-tuned from `{show_path(cfg['fine_tuned_from'])}`)" if cfg.get("fine_tuned_from") else "")
             + (f"; checkpoint `{show_path(cfg['checkpoint'])}` of the run folder" if cfg.get("checkpoint") else ""),
             f"- dataset: {cfg['dataset']} ({cfg.get('split')}, {s['n']} problems, data sha256 "
             f"`{cfg['data_hash'][:16]}`)",
             f"- protocol: `{proto['name']}` (template {proto.get('template')}, {proto['num_fewshot']}-shot, "
             f"cot={proto['cot']})",
             f"- decoding: temperature {dec['temperature']}, top_p {dec['top_p']}, max_new_tokens "
             f"{dec['max_new_tokens']}, n_samples {dec['n_samples']}, seed {cfg['seed']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in cfg.get('versions', {}).items())}",
             "", "## Summary", "", "| metric | value |", "| --- | ---: |", *_summary_lines(s)]
    if result.get("summary_manual"):
        sm = result["summary_manual"]
        lines += ["", f"## After manual review ({sm.get('n_reviewed', 0)} verdicts)", "",
                  "| metric | value |", "| --- | ---: |", *_summary_lines(sm)]
    lines += _breakdown_lines(s, "subject") + _breakdown_lines(s, "level")
    lines += [f"\n![accuracy by {c.stem.rsplit('-', 1)[1]}]({c.name})" for c in charts or []]
    if s.get("error_types"):
        lines += ["", "### Error types", "", "| error_type | count |", "| --- | ---: |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(s["error_types"].items())]
    return "\n".join(lines) + "\n"


def write_item_csv(result: dict, path: str | os.PathLike) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ITEM_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for it in result["items"]:
            w.writerow({k: it.get(k) for k in ITEM_CSV_FIELDS})


def write_report(result: dict, reports_dir: str | os.PathLike = "outputs/reports") -> Path:
    """Write `<reports_dir>/<run_id>.md`, `.csv` and the per-level/subject charts; returns the markdown path."""
    out = Path(reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{result['run_id']}.md"
    charts = plot_groups([result], out / result["run_id"])
    md.write_text(render_markdown(result, charts))
    write_item_csv(result, out / f"{result['run_id']}.csv")
    return md


# ----------------------------------------------------------------------------- comparing runs

def compare(results: list[dict], use_manual: bool = False) -> str:
    """One markdown table over several runs, plus per-subject and per-level accuracy columns."""
    key = "summary_manual" if use_manual else "summary"
    summaries = [r.get(key) or r["summary"] for r in results]
    lines = ["| run | model | dataset | protocol | n | accuracy | trunc. | no answer | avg tokens |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r, s in zip(results, summaries):
        c = r["config"]
        model = show_path(c["model"]) + (f" + {show_path(c['adapter'])}" if c.get("adapter") else "")
        if c.get("base_model") and show_path(c["base_model"]) != show_path(c["model"]):
            model += f" (base {show_path(c['base_model'])})"
        lines.append(f"| {r['run_id']} | {model} | {c['dataset']} | {c['protocol']['name']} | {s['n']} | "
                     f"{_pct(s['accuracy'])} ± {_pct(s['stderr'])} | {_pct(s['truncation_rate'])} | "
                     f"{_pct(s['no_answer_rate'])} | {s['avg_tokens']:.1f} |")
    for group in ("subject", "level"):
        table = _group_table(results, summaries, group)
        if table:
            lines += ["", f"### Accuracy by {group}", "", *table]
    return "\n".join(lines) + "\n"


def _group_table(results: list[dict], summaries: list[dict], group: str) -> list[str]:
    names = sorted({g for s in summaries for g in s.get(f"by_{group}", {})})
    if not names:
        return []
    lines = [f"| {group} | " + " | ".join(r["run_id"] for r in results) + " |",
             "| --- |" + " ---: |" * len(results)]
    for g in names:
        cells = [_pct(s[f"by_{group}"][g]["accuracy"]) if g in s.get(f"by_{group}", {}) else "–"
                 for s in summaries]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines


def _group_sort_key(name: str):
    digits = "".join(ch for ch in name if ch.isdigit())
    return (0, int(digits), name) if digits else (1, 0, name)


def plot_groups(results: list[dict], out_prefix: str | os.PathLike) -> list[Path]:
    """SVG bar charts `<out_prefix>-subject.svg` / `-level.svg`: accuracy per MATH subject and level, one bar
    per run side by side (base vs checkpoints). Only for groups the results have; returns the files written."""
    written = []
    for group in ("level", "subject"):
        names = sorted({g for r in results for g in r["summary"].get(f"by_{group}", {})}, key=_group_sort_key)
        if not names:
            continue
        series = []
        for r in results:
            by = r["summary"].get(f"by_{group}", {})
            series.append((r["run_id"], [100 * by[g]["accuracy"] if g in by else None for g in names]))
        labels = [f"Level {g}" if group == "level" and str(g).isdigit() else str(g) for g in names]
        n = sum(v["n"] for r in results[:1] for v in r["summary"][f"by_{group}"].values())
        text = svg.bar_chart(labels, series, f"Accuracy by MATH {group} ({n} problems)")
        written.append(svg.write(f"{out_prefix}-{group}.svg", text))
    return written


# ----------------------------------------------------------------------------- training run report

def read_metrics(path: str | os.PathLike) -> list[dict]:
    """metrics.jsonl rows; a line that is not a JSON object (a crash mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def run_charts(rows: list[dict], out_prefix: str | os.PathLike, title: str) -> list[Path]:
    """`-loss.svg` (training and validation loss), `-lr.svg`, `-accuracy.svg` (validation accuracy) against
    steps, each only when metrics.jsonl has that series."""
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "eval_loss" in r or "eval_accuracy" in r]
    charts = []
    losses = [("training loss", [(r["step"], r["loss"]) for r in train]),
              ("validation loss", [(r["step"], r.get("eval_loss")) for r in valid])]
    if train or any(r.get("eval_loss") is not None for r in valid):
        positive = all(v > 0 for _, pts in losses for _, v in pts if v is not None)
        charts.append(svg.write(f"{out_prefix}-loss.svg", svg.line_chart(
            losses, f"{title}: loss", y_label="loss", log_y=positive)))
    if any("lr" in r for r in train):
        charts.append(svg.write(f"{out_prefix}-lr.svg", svg.line_chart(
            [("learning rate", [(r["step"], r["lr"]) for r in train if "lr" in r])], f"{title}: learning rate",
            y_label="learning rate")))
    acc = [(r["step"], 100 * r["eval_accuracy"]) for r in valid if r.get("eval_accuracy") is not None]
    if acc:
        charts.append(svg.write(f"{out_prefix}-accuracy.svg", svg.line_chart(
            [("validation accuracy", acc)], f"{title}: validation accuracy", y_label="accuracy (%)",
            y_range=(0.0, 100.0))))
    return charts


def _run_config(job_dir: Path) -> dict:
    try:
        cfg = json.loads((job_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def write_run_report(job_dir: str | os.PathLike, out_dir: str | os.PathLike = "outputs/reports",
                     name: str | None = None) -> Path:
    """`<out_dir>/<name>.md` (name: the run folder's) for an sft.py run folder: base model, steps, final
    loss, the charts of run_charts (`<name>-loss.svg`, ...) linked, and the validation table. Returns the
    Markdown path."""
    job_dir, out_dir = Path(job_dir), Path(out_dir)
    if not (job_dir / "metrics.jsonl").is_file():
        raise UserError(f"{job_dir}: no metrics.jsonl; expected an sft.py run folder "
                        "(outputs/checkpoints/<job>/)")
    rows = read_metrics(job_dir / "metrics.jsonl")
    cfg = _run_config(job_dir)  # sft.py's Config as a flat dict
    name = name or job_dir.name
    charts = run_charts(rows, out_dir / name, job_dir.name)
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "eval_loss" in r or "eval_accuracy" in r]
    best = os.readlink(job_dir / "checkpoint-best") if (job_dir / "checkpoint-best").is_symlink() else None
    latest = (job_dir / "latest").read_text().strip() if (job_dir / "latest").is_file() else None
    lines = [f"# Training run {job_dir.name}", "",
             f"- run folder: `{show_path(job_dir.resolve())}/`",
             f"- base model: `{show_path(cfg.get('model_name_or_path'))}`"
             + (f" ({'LoRA' if cfg.get('use_lora') else 'full fine-tuning'})" if "use_lora" in cfg else ""),
             f"- data: {', '.join(show_path(str(x)) for x in cfg.get('train_files') or cfg.get('datasets') or []) or 'see config.json'}",
             f"- steps logged: {train[0]['step'] if train else '-'} to {train[-1]['step'] if train else '-'}; "
             f"checkpoint-best -> `{best}`; latest -> `{latest}`", ""]
    if train:
        lines.append(f"Training loss {train[0]['loss']:.4f} (step {train[0]['step']}) -> {train[-1]['loss']:.4f} "
                     f"(step {train[-1]['step']}).")
    lines += ["", *[f"![{c.stem.rsplit('-', 1)[1]}]({c.name})" for c in charts]]
    if valid:
        lines += ["", "## Validation", "", "| step | loss | accuracy |", "| ---: | ---: | ---: |"]
        for r in valid:
            loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
            acc = f"{100 * r['eval_accuracy']:.1f}%" if r.get("eval_accuracy") is not None else "-"
            lines.append(f"| {r['step']} | {loss} | {acc} |")
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md


# ----------------------------------------------------------------------------- manual review

def export_failures(result: dict, csv_path: str | os.PathLike, include_correct: bool = False) -> int:
    """Write the (automatically) failed items to a CSV with an empty `manual_correct` column to fill in."""
    rows = [it for it in result["items"] if include_correct or not it["correct"]]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=REVIEW_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for it in rows:
            w.writerow({**{k: it.get(k) for k in REVIEW_CSV_FIELDS}, "manual_correct": ""})
    return len(rows)


TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f"}


def import_verdicts(result: dict, csv_path: str | os.PathLike) -> int:
    """Set `manual_correct` from a reviewed CSV (blank cells are skipped); recompute `summary_manual`."""
    by_id = {str(it["id"]): it for it in result["items"]}
    updates = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"id", "manual_correct"} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"error: {csv_path}: missing column(s) {sorted(missing)}; expected the header "
                             "written by `evalmath.py review export`")
        for line, row in enumerate(reader, start=2):
            cell = (row["manual_correct"] or "").strip().lower()
            if not cell:
                continue
            if row["id"] not in by_id:
                raise SystemExit(f"error: {csv_path}:{line}: id {row['id']!r} is not in run {result['run_id']}")
            if cell not in TRUE_WORDS | FALSE_WORDS:
                raise SystemExit(f"error: {csv_path}:{line}: manual_correct={row['manual_correct']!r}; "
                                 "expected true/false (or 1/0, yes/no) or blank")
            updates[row["id"]] = cell in TRUE_WORDS
    for item_id, verdict in updates.items():
        by_id[item_id]["manual_correct"] = verdict
    result["summary_manual"] = summarize(result["items"], manual=True)
    return len(updates)
