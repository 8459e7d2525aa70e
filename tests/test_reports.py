"""Reports with charts: SVG files next to the Markdown and linked from it (a training run's loss, learning rate
and validation curves; accuracy per MATH level and subject, runs side by side), paths relative to the repo;
evalmath on a run folder picks checkpoint-best (else latest) and names it and the base model."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import evalmath
import evalmodel
import reports
import svg
from cli import write_json

REPO = Path(__file__).resolve().parents[1]
NS = "{http://www.w3.org/2000/svg}"


def parse_svg(path: Path) -> ET.Element:
    root = ET.fromstring(path.read_text())
    assert root.tag == f"{NS}svg" and root.get("width") and root.get("viewBox")
    return root


def polyline_points(root: ET.Element) -> list[list[tuple[float, float]]]:
    return [[tuple(map(float, p.split(","))) for p in pl.get("points").split()] for pl in root.iter(f"{NS}polyline")]


def linked_images(md: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())


def test_line_chart_scales_points_into_the_plot():
    text = svg.line_chart([("a", [(0, 1.0), (50, 3.0), (100, 2.0)]), ("b", [(0, None), (100, float("nan"))])],
                          "t", y_label="loss")
    root = ET.fromstring(text)
    (pts,) = polyline_points(root)  # series b has no finite point: no line
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    assert xs == sorted(xs) and svg.LEFT <= xs[0] < xs[-1] <= svg.W - svg.RIGHT
    assert ys[1] < ys[2] < ys[0]  # higher values are drawn higher (smaller y)
    assert svg.nice_ticks(0.0, 0.93) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert "no data" in svg.line_chart([("a", [])], "t")


def test_bar_chart_heights_follow_values():
    text = svg.bar_chart(["Level 1", "Level 2"], [("base", [10.0, 50.0]), ("ckpt", [100.0, None])], "acc")
    bars = [r for r in ET.fromstring(text).iter(f"{NS}rect") if r.get("fill") in svg.COLORS and
            float(r.get("width")) > 10]
    heights = [float(r.get("height")) for r in bars]
    assert len(heights) == 3  # None draws no bar
    # drawn group by group: Level 1 (base 10, ckpt 100), then Level 2 (base 50)
    assert heights[2] == pytest.approx(5 * heights[0]) and heights[1] == pytest.approx(2 * heights[2])


def _metrics(job: Path) -> None:
    rows = []
    for step in range(1, 101):
        rows.append({"step": step, "loss": 5.0 * math.exp(-step / 30) + 0.1, "lr": 1e-3 * min(1, step / 10),
                     "grad_norm": 1.0, "tokens_per_s": 100.0})
        if step % 25 == 0:
            rows.append({"step": step, "eval_loss": 4.0 * math.exp(-step / 40), "eval_accuracy": step / 100})
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10')  # torn tail
    (job / "config.json").write_text(json.dumps({"model_name_or_path": str(REPO / "models" / "base"),
                                                 "use_lora": True, "datasets": ["gsm8k"]}))
    (job / "checkpoint-000100").mkdir()
    os.symlink("checkpoint-000100", job / "checkpoint-best")
    (job / "latest").write_text("checkpoint-000100\n")


def test_run_report_charts_loss_lr_and_validation(tmp_path):
    job = tmp_path / "checkpoints" / "myrun"
    job.mkdir(parents=True)
    _metrics(job)
    md = reports.write_run_report(job, tmp_path / "reports")
    assert md == tmp_path / "reports" / "myrun.md"
    links = linked_images(md)
    assert links == ["myrun-loss.svg", "myrun-lr.svg", "myrun-accuracy.svg"]
    loss = parse_svg(md.parent / "myrun-loss.svg")
    train, valid = polyline_points(loss)
    assert len(train) == 100 and len(valid) == 4
    assert train[0][1] < train[-1][1]  # the loss falls: its line goes down the picture
    (lr,) = polyline_points(parse_svg(md.parent / "myrun-lr.svg"))
    assert lr[0][1] > lr[9][1] == pytest.approx(lr[-1][1])  # warm-up, then flat
    (acc,) = polyline_points(parse_svg(md.parent / "myrun-accuracy.svg"))
    assert [p[1] for p in acc] == sorted((p[1] for p in acc), reverse=True)
    text = md.read_text()
    assert "base model: `models/base`" in text and "checkpoint-best -> `checkpoint-000100`" in text
    assert "| 100 | " in text and "100.0%" in text
    assert "`/" not in text and "run folder: `../" in text  # paths relative to the repository
    with pytest.raises(reports.UserError, match="no metrics.jsonl"):
        reports.write_run_report(tmp_path, tmp_path / "reports")
    evalmath.main(["report", str(job), "--reports_dir", str(tmp_path / "cli")])  # the same through the CLI
    assert (tmp_path / "cli" / "myrun.md").read_text() == text
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.svg")) == sorted(links)


def _result(run_id: str, model: str, correct: list[bool]) -> dict:
    subjects = ["Algebra", "Geometry", "Intermediate Algebra", "Number Theory"]
    items = [{"id": f"i{k}", "question": "q", "gold": "1", "response": "r", "correct": c, "extracted": "1",
              "error_type": None, "n_tokens": 5, "truncated": False, "subject": subjects[k % 4],
              "level": 1 + k % 5} for k, c in enumerate(correct)]
    return {"format": evalmath.RESULT_FORMAT, "run_id": run_id, "summary": reports.summarize(items), "items": items,
            "config": {"model": model, "adapter": None, "base_model": model, "dataset": "math500",
                       "split": "test", "data_hash": "0" * 64, "seed": 0, "versions": {},
                       "protocol": {"name": "math-0shot-cot-boxed@v1", "template": "boxed", "num_fewshot": 0,
                                    "cot": True},
                       "decoding": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, "n_samples": 1}}}


def test_eval_report_and_comparison_charts_side_by_side(tmp_path):
    base = _result("base", str(REPO.parent / "shared" / "models" / "qwen"), [k % 3 == 0 for k in range(20)])
    ckpt = _result("ckpt", "outputs/checkpoints/run/checkpoint-best", [k % 3 != 1 for k in range(20)])
    md = reports.write_report(base, tmp_path / "rep")
    assert linked_images(md) == ["base-level.svg", "base-subject.svg"]
    assert "base model: `../shared/models/qwen`" in md.read_text()
    for r in (base, ckpt):
        write_json(tmp_path / "eval" / "math500" / f"{r['run_id']}.json", r)
    out = tmp_path / "cmp" / "compare.md"
    evalmath.main(["report", "base", "ckpt", "--eval_dir", str(tmp_path / "eval"), "--out", str(out)])
    assert linked_images(out) == ["compare-level.svg", "compare-subject.svg"]
    level = parse_svg(out.parent / "compare-level.svg")
    texts = [t.text for t in level.iter(f"{NS}text")]
    assert {"Level 1", "Level 5", "base", "ckpt"} <= set(texts)
    bars = [r for r in level.iter(f"{NS}rect") if r.get("fill") in svg.COLORS[:2] and float(r.get("width")) > 10]
    assert len(bars) == 2 * 5  # one bar per run and level
    assert "| ../shared/models/qwen |" in out.read_text() and " /" not in out.read_text()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from maketiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", arch="llama", seed=0)


def test_run_folder_evaluates_checkpoint_best_else_latest(tiny, tmp_path, capsys):
    job = tmp_path / "job"
    for step in (2, 4):
        shutil.copytree(tiny, job / f"checkpoint-00000{step}")
    (job / "latest").write_text("checkpoint-000004\n")
    os.symlink("checkpoint-000002", job / "checkpoint-best")
    state = {"step": 2, "template": "plain", "base_model_name_or_path": str(REPO / "models" / "tiny")}
    (job / "checkpoint-000002" / "trainer_state.json").write_text(json.dumps(state))
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": "What is 3 + 4?", "answer": "7"}) + "\n")
    evalmath.main(["--model", str(job), "--dataset_file", str(problems), "--max_new_tokens", "2",
                   "--output_dir", str(tmp_path / "eval"), "--reports_dir", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert f"{job} is a run folder: evaluating checkpoint-000002 (checkpoint-best)" in err
    assert f"base model {job / 'checkpoint-000002'} (fine-tuned from {REPO / 'models' / 'tiny'})" in err
    (path,) = (tmp_path / "eval").rglob("*.json")
    result = json.loads(path.read_text())
    assert result["config"]["checkpoint"] == str(job / "checkpoint-000002")
    assert result["run_id"].startswith("job-checkpoint-000002-p-0shot-cot-plain_v1-")
    md = (tmp_path / "rep" / f"{result['run_id']}.md").read_text()
    assert "(fine-tuned from `models/tiny`); checkpoint `" in md and "checkpoint-000002` of the run folder" in md
    (job / "checkpoint-best").unlink()
    assert evalmodel.resolve_model(str(job)).checkpoint == job / "checkpoint-000004"


def test_demo_report_on_real_gsm8k_says_what_a_tiny_model_can_reach(shared):
    sys.path.insert(0, str(REPO / "scripts"))
    import demo

    class A:
        data_dir, datasets = str(shared / "data"), ["gsm8k"]
    summary = {"accuracy": 0.0, "n": 200, "no_answer_rate": 0.9}
    text = "\n".join(demo.real_data_note(A, {"summary": summary}, {"summary": dict(summary, no_answer_rate=0.1)}))
    assert "close to 0%" in text and "pretrained base model" in text
    baseline = re.search(r"most common training answer \((\d+)\) would score ([\d.]+)% on these 200", text)
    assert baseline, text
    assert 0 < float(baseline.group(2)) < 5
    assert demo.shown(sys.executable) == "python" and demo.shown(str(REPO / "outputs" / "x")) == "outputs/x"
