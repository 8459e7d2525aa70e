"""A user's mistakes end in one line on stderr (file, what was expected, the fix) and a non-zero exit, never a
traceback: the real CLIs in subprocesses on broken model folders, checkpoints, data and result files.
`--debug` keeps the traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import model as M

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from maketiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", arch="llama", seed=0)


@pytest.fixture
def problems(tmp_path) -> Path:
    f = tmp_path / "problems.jsonl"
    f.write_text(json.dumps({"question": "What is 3 + 4?", "answer": "7"}) + "\n")
    return f


def copy_model(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny, dst)
    return dst


def one_line_error(args: list[str], *expected: str, debug: bool = False) -> str:
    """Run a CLI; assert a non-zero exit and exactly one stderr line that starts with `error:` and names
    every `expected` substring. Returns the line."""
    env = {k: v for k, v in os.environ.items() if k != "MATHSFT_DEBUG"}
    p = subprocess.run([sys.executable, *args, *(["--debug"] if debug else [])], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=env)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0, p.stderr
    if debug:
        assert "Traceback" in p.stderr, p.stderr
        return lines[-1]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def evalmath_error(model: Path, problems: Path, *expected: str) -> str:
    return one_line_error(["evalmath.py", "--model", str(model), "--dataset_file", str(problems)], *expected)


# ----------------------------------------------------------------------------- model folders

def test_truncated_weights(tiny, problems, tmp_path):
    folder = copy_model(tiny, tmp_path / "m")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(M.ModelFileError, match="truncated: the header promises"):
        M.check_weights(folder)
    evalmath_error(folder, problems, str(f), "truncated", "download the file again")


def test_random_bytes_weights(tiny, problems, tmp_path):
    folder = copy_model(tiny, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    evalmath_error(folder, problems, str(folder / "model.safetensors"), "not a safetensors file")


def test_damaged_safetensors_header_and_sound_files(tiny, tmp_path):
    folder = copy_model(tiny, tmp_path / "m")
    assert M.check_weights(folder) == [folder / "model.safetensors"]
    header = M.check_safetensors(folder / "model.safetensors")
    assert "model.embed_tokens.weight" in header
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[8:12] = b"\xff\xfe{{"  # the JSON table of tensors, garbled
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(M.ModelFileError, match="damaged safetensors header"):
        M.check_weights(folder)


def test_folder_without_weights(tiny, problems, tmp_path):
    folder = copy_model(tiny, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    evalmath_error(folder, problems, f"no weights in {folder}", "model.safetensors")


@pytest.mark.parametrize("change, expected", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_type 'yarn'"),
])
def test_unsupported_config(tiny, problems, tmp_path, change, expected):
    folder = copy_model(tiny, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | change))
    evalmath_error(folder, problems, str(folder / "config.json"), expected, "Supported architectures")


def test_config_that_is_not_json(tiny, problems, tmp_path):
    folder = copy_model(tiny, tmp_path / "m")
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"model_type"', "model_type", 1))
    line = 1 + text[:text.index('"model_type"')].count("\n")
    evalmath_error(folder, problems, str(folder / "config.json"), f"not valid JSON at line {line}, column")
    # --debug keeps the traceback
    one_line_error(["evalmath.py", "--model", str(folder), "--dataset_file", str(problems), "--quiet"], debug=True)


def test_damaged_checkpoint_in_a_run_folder(tiny, problems, tmp_path):
    """A checkpoint whose weights no longer match its manifest (sft.py writes the manifest last) is refused
    before loading, also when reached through the run folder's `latest`."""
    import checkpoint as ck

    job = tmp_path / "job"
    ckpt = copy_model(tiny, job / "checkpoint-000004")
    ck.write_manifest(ckpt, {"name": ckpt.name}, checksum=True)  # sft.py --checksum
    (job / "latest").write_text(ckpt.name + "\n")
    weights = ckpt / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # same size, one byte flipped: only the sha256 tells
    weights.write_bytes(bytes(raw))
    evalmath_error(job, problems, f"{ckpt}: damaged checkpoint", "model.safetensors: sha256 does not match")
    (ckpt / "tokenizer.json").unlink()
    evalmath_error(ckpt, problems, "damaged checkpoint: missing file tokenizer.json")


def test_adapter_on_a_base_of_the_wrong_shape(tiny, problems, tmp_path):
    import lora
    from maketiny import make_tiny

    other = make_tiny(tmp_path / "wide", arch="llama", seed=0, hidden=96, heads=4, kv_heads=4,
                      tokenizer=tiny)
    base = M.Transformer.from_pretrained(tiny)
    cfg = lora.LoraConfig(r=2, alpha=4, target_modules=("q_proj",))
    lora.inject_lora(base, cfg)
    adapter = lora.save_adapter(base, cfg, tmp_path / "adapter", base_model_name_or_path=str(tiny))
    one_line_error(["evalmath.py", "--model", str(other), "--adapter", str(adapter), "--dataset_file",
                    str(problems), "--quiet"], f"--adapter {adapter} does not fit the base model", "--base_model")


# ----------------------------------------------------------------------------- data and result files

def test_jsonl_that_is_not_utf8(tiny, tmp_path):
    bad = tmp_path / "rows.jsonl"
    good = json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n"
    bad.write_bytes(good.encode() + b'{"question": "caf\xe9?", "answer": "3"}\n')
    offset = len(good.encode()) + len(b'{"question": "caf')
    one_line_error(["data.py", "prepare", "--datasets", str(bad), "--tokenizer", str(tiny), "--out_dir",
                    str(tmp_path / "cache")], f"{bad}:2", f"byte offset {offset}", "UTF-8")
    one_line_error(["evalmath.py", "--model", str(tiny), "--dataset_file", str(bad), "--quiet"], f"{bad}:2",
                   f"byte offset {offset}")


@pytest.mark.parametrize("content, expected", [
    ('{"learning_rate": 0.001}', "not a result file (missing run_id, config, summary, items"),
    ("[1, 2]", "not a result file"),
    ('{"run_id": "x",\n  "config": ', "not valid JSON at line 2, column"),
])
def test_report_on_a_file_that_is_not_a_result(tmp_path, content, expected):
    f = tmp_path / "config.json"
    f.write_text(content)
    one_line_error(["evalmath.py", "report", str(f), "--reports_dir", str(tmp_path / "rep")], str(f), expected,
                   "evalmath.py writes")
