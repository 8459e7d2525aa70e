"""evalmath.py + reports.py: protocols, decoding parity with transformers, end-to-end runs on tiny models,
LoRA loading paths, data-parallel equality, the grade/report/review subcommands, summary statistics."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch

import evalmath
import evalmodel
import reports
from cli import UserError, write_json

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is 3 + 4?", "Natalia sold clips to 48 of her friends in April.", "x",
             "The sum of the angles of a triangle is 180 degrees. What is the value of 2^{10}?",
             "Weng earns $12 an hour for babysitting.", "Let x be the number of apples. Then 3x + 5 = 20",
             "We compute \\sqrt{16} = 4", "Question: If a train travels 60 miles per hour for 3 hours"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from maketiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", arch="llama", seed=0)


def _run(args: list[str], out: Path) -> dict[str, dict]:
    """evalmath's CLI in-process; returns {dataset: result JSON}."""
    evalmath.main([*args, "--output_dir", str(out / "eval"), "--reports_dir", str(out / "reports"), "--quiet"])
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "eval").glob("*/*.json"))}


# ----------------------------------------------------------------------------- protocols (lm-eval prompts)

def test_gsm8k_fewshot_prompt_is_lm_eval_gsm8k_cot():
    p = evalmath.make_protocol("gsm8k", num_fewshot=2)
    # lm-eval ContextSampler: doc_to_text + target_delimiter " " + target + fewshot_delimiter "\n\n", then the doc
    expected = ("Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they "
                "are done, there will be 21 trees. How many trees did the grove workers plant today?\nA: There are 15 "
                "trees originally. Then there were 21 trees after some more were planted. So there must have been "
                "21 - 15 = 6. The answer is 6.\n\n"
                "Q: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking "
                "lot?\nA: There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.\n\n"
                "Q: How many legs do 2 cats have?\nA:")
    assert evalmath.fewshot_prompt(p, "How many legs do 2 cats have?") == expected
    full = evalmath.fewshot_prompt(evalmath.make_protocol("gsm8k", num_fewshot=8), "Z?")
    blocks = full.split("\n\n")
    assert len(blocks) == 9 and blocks[-1] == "Q: Z?\nA:"
    assert all(b.startswith("Q: ") and b.count("\nA: ") == 1 for b in blocks[:8])
    finals = [b.rsplit("The answer is ", 1)[1] for b in blocks[:8]]
    assert finals == ["6.", "5.", "39.", "8.", "9.", "29.", "33.", "8."]
    starts = ["There are 15 trees", "If there are 3 cars", "Leah had 32 chocolates", "Jason had 20 lollipops",
              "Shawn has five toys", "There were nine computers", "Michael had 58 golf balls", "Olivia has $23"]
    assert [b[3:].startswith(s) for b, s in zip(blocks, starts)] == [True] * 8
    assert evalmath.make_protocol("gsm8k", num_fewshot=8).stop_strings == ("Q:", "</s>", "<|im_end|>")
    direct = evalmath.fewshot_prompt(evalmath.make_protocol("gsm8k", num_fewshot=1, cot=False), "Z?")
    assert direct == ("Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
                      "After they are done, there will be 21 trees. How many trees did the grove workers plant "
                      "today?\nA: The answer is 6.\n\nQ: Z?\nA:")


def test_math_fewshot_prompt_is_lm_eval_minerva_math():
    p = evalmath.make_protocol("math", num_fewshot=4)
    assert p.stop_strings == ("Problem:",) and p.name == "math-4shot-cot-minerva@v1"
    text = evalmath.fewshot_prompt(p, "What is $1+1$?")
    assert text.startswith("Problem:\nFind the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}"
                           "\n\nSolution: The expressions inside each square root must be non-negative.")
    assert text.endswith("Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.\n\n"
                         "Problem:\nWhat is $1+1$?\n\nSolution:")
    assert text.count("Problem:\n") == 5 and text.count("\n\nSolution: ") == 4
    finals = [s.split("$. I hope")[0] for s in text.split("Final Answer: The final answer is $")[1:]]
    assert finals == ["[2,5)", "24", "16", "-\\frac{2}{3}"]
    assert "30n&=480\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}" in text  # lm-eval's "\" + newline quirk
    with pytest.raises(ValueError, match="4 exemplars"):
        evalmath.make_protocol("math", num_fewshot=5)


def test_zero_shot_protocol_uses_template_and_direct_variant():
    import data

    tpl = data.load_template("boxed")
    p = evalmath.make_protocol("gsm8k", 0, True, tpl, ("###",))
    assert p.name == "gsm8k-0shot-cot-boxed@v1" and p.stop_strings == (*tpl.stop, "###")
    direct = evalmath.direct_template(tpl)
    assert evalmath.COT_INSTRUCTION in tpl.prompt and evalmath.COT_INSTRUCTION not in direct.prompt
    assert evalmath.DIRECT_INSTRUCTION in direct.prompt
    assert evalmath.make_protocol("math", 0, False, tpl).name == "math-0shot-direct-boxed@v1"


def test_cut_at_stops_takes_the_earliest():
    assert evalmath.cut_at_stops("a Q: b Problem: c", ("Problem:", "Q:")) == ("a ", True)
    assert evalmath.cut_at_stops("no stop here", ("Q:",)) == ("no stop here", False)


# ----------------------------------------------------------------------------- config

def test_config_yaml_defaults_flags_override_and_bool_forms(tmp_path):
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text("batch_size: 4\nmax_new_tokens: 77\ncot: false\ndatasets: [gsm8k, math]\n")
    cfg = evalmath.parse_config(["--config", str(cfg_file), "--max_new_tokens", "9"])
    assert (cfg.batch_size, cfg.max_new_tokens, cfg.cot, cfg.datasets) == (4, 9, False, ("gsm8k", "math"))
    assert evalmath.parse_config(["--config", str(cfg_file), "--cot"]).cot is True
    assert evalmath.parse_config(["--cot", "false"]).cot is False
    assert evalmath.parse_config(["--cot", "true", "--num_fewshot", "8"]).cot is True
    cfg_file.write_text("max_new_token: 5\n")
    with pytest.raises(UserError, match="did you mean 'max_new_tokens'"):
        evalmath.parse_config(["--config", str(cfg_file)])
    assert evalmath.parse_config(["--merge_lora", "off"]).merge_lora is False  # the same bool forms as sft.py
    repo_cfg = evalmath.parse_config(["--config", str(REPO / "configs" / "eval.yaml")])  # the shipped defaults parse
    assert repo_cfg.batch_size == "auto" and repo_cfg.max_new_tokens >= 256


# ----------------------------------------------------------------------------- decoding

@pytest.fixture(scope="module")
def hf_greedy(tiny):
    """transformers' greedy generate, one unpadded prompt at a time: the reference token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    hf = AutoModelForCausalLM.from_pretrained(tiny).eval()
    eos = evalmodel.eos_token_ids(tok, json.loads((tiny / "generation_config.json").read_text()))
    prompts = [tok(q)["input_ids"] for q in QUESTIONS]
    refs = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        refs.append(out[0, len(p):].tolist())
    return tok, eos, prompts, refs


@pytest.mark.parametrize("batch_size", [1, 8])
def test_greedy_equals_transformers_generate(tiny, hf_greedy, batch_size):
    from model import Transformer

    tok, eos, prompts, refs = hf_greedy
    ours = Transformer.from_pretrained(tiny).eval()
    gens = evalmath.decode(ours, tok, prompts, max_new_tokens=20, batch_size=batch_size, eos_ids=eos)
    for g, ref in zip(gens, refs):
        if g.finish_reason == "eos":  # transformers keeps the EOS it stopped on; evalmath drops it
            assert ref[-1] in eos
            ref = ref[:-1]
        assert g.tokens == ref
        assert g.text == tok.decode(g.tokens, skip_special_tokens=False)


def test_stop_strings_end_rows_early(tiny):
    from transformers import AutoTokenizer

    from model import Transformer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = Transformer.from_pretrained(tiny).eval()
    prompts = [tok(q)["input_ids"] for q in QUESTIONS[:4]]
    free = evalmath.decode(model, tok, prompts, max_new_tokens=16, batch_size=4, eos_ids=[])
    text = free[0].text  # pick a plain-ASCII piece of row 0's greedy continuation as the stop string
    start = next(i for i in range(1, len(text) - 3) if text[i:i + 3].isascii() and text[i:i + 3].isprintable())
    stop = text[start:start + 3]
    cut = evalmath.decode(model, tok, prompts, max_new_tokens=16, batch_size=4, eos_ids=[], stop_strings=(stop,))
    assert cut[0].finish_reason == "stop" and cut[0].text == free[0].text[:free[0].text.index(stop)]
    assert cut[0].n_tokens < free[0].n_tokens
    for f, c in zip(free, cut):
        assert f.text.startswith(c.text)


# ----------------------------------------------------------------------------- end to end

RESULT_ITEM_FIELDS = {"id", "question", "gold", "response", "extracted", "correct", "error_type", "n_tokens",
                      "truncated"}


def test_end_to_end_gsm8k_and_math(tiny, shared, tmp_path):
    res = _run(["--model", str(tiny), "--datasets", "gsm8k", "math", "--data_dir", str(shared / "data"),
                "--limit", "5", "--max_new_tokens", "8", "--batch_size", "3"], tmp_path)
    assert set(res) == {"gsm8k", "math"}
    for name, r in res.items():
        assert r["format"] == evalmath.RESULT_FORMAT and len(r["items"]) == 5
        c = r["config"]
        assert c["protocol"]["name"] == f"{name}-0shot-cot-boxed@v1" and len(c["data_hash"]) == 64
        assert c["decoding"]["max_new_tokens"] == 8 and c["seed"] == 0 and c["versions"]["torch"]
        for it in r["items"]:
            assert RESULT_ITEM_FIELDS <= set(it)
            assert 0 < it["n_tokens"] <= 8 and it["truncated"] == (it["finish_reason"] == "length")
        s = r["summary"]
        assert s["n"] == 5 and {"accuracy", "stderr", "avg_tokens", "truncation_rate", "no_answer_rate"} <= set(s)
        assert (tmp_path / "reports" / f"{r['run_id']}.md").is_file()
        assert (tmp_path / "reports" / f"{r['run_id']}.csv").is_file()
    assert "by_subject" in res["math"]["summary"] and "by_level" in res["math"]["summary"]
    records = [{"id": it["id"], "question": it["question"], "answer": it["gold"]} for it in res["gsm8k"]["items"]]
    assert res["gsm8k"]["config"]["data_hash"] == evalmath.data_hash(records)


def test_fewshot_run_and_dataset_file(tiny, tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": str(i)}) + "\n"
                         for i, q in enumerate(QUESTIONS[:3])))
    res = _run(["--model", str(tiny), "--dataset_file", str(f), "--num_fewshot", "8", "--max_new_tokens", "6",
                "--run_name", "job-before"], tmp_path)
    r = res["mine"]
    assert r["run_id"].startswith("job-before-mine-8shot-cot-lmeval_v1-")
    assert r["config"]["protocol"]["name"] == "gsm8k-8shot-cot-lmeval@v1"  # numeric golds: graded as gsm8k
    assert [it["id"] for it in r["items"]] == ["q0", "q1", "q2"]


@pytest.fixture(scope="module")
def lora_dirs(tiny, tmp_path_factory):
    """A LoRA checkpoint (adapter with nonzero B, base path recorded) and the merged model it equals."""
    import shutil

    import lora
    from model import Transformer

    root = tmp_path_factory.mktemp("lora")
    model = Transformer.from_pretrained(tiny)
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    lora.inject_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.5)
    adapter = lora.save_adapter(model, cfg, root / "checkpoint-000010", base_model_name_or_path=str(tiny))
    (adapter / "trainer_state.json").write_text(json.dumps({"step": 10, "config": {"template": "plain"}}))
    lora.merge_and_unload(model)
    model.save_pretrained(root / "merged")
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, root / "merged" / f.name)
    return adapter, root / "merged"


def test_lora_checkpoint_and_base_plus_adapter_equal_merged(tiny, lora_dirs, shared, tmp_path):
    adapter, merged = lora_dirs
    common = ["--datasets", "gsm8k", "--data_dir", str(shared / "data"), "--limit", "4", "--max_new_tokens", "10",
              "--template", "plain"]
    runs = {
        "ckpt": _run(["--model", str(adapter), *common], tmp_path / "a")["gsm8k"],
        "base+adapter": _run(["--model", str(tiny), "--adapter", str(adapter), "--merge_lora", "false", *common],
                             tmp_path / "b")["gsm8k"],
        "merged": _run(["--model", str(merged), *common], tmp_path / "c")["gsm8k"],
        "base": _run(["--model", str(tiny), *common], tmp_path / "d")["gsm8k"],
    }
    responses = {k: [it["response"] for it in r["items"]] for k, r in runs.items()}
    assert responses["ckpt"] == responses["merged"] == responses["base+adapter"]
    assert responses["base"] != responses["merged"]  # the adapter does change the model
    assert runs["ckpt"]["config"]["base_model"] == str(tiny) and runs["ckpt"]["config"]["adapter"] == str(adapter)


def test_template_recorded_in_checkpoint_is_the_default(lora_dirs, shared, tmp_path):
    adapter, _ = lora_dirs
    r = _run(["--model", str(adapter), "--datasets", "gsm8k", "--data_dir", str(shared / "data"), "--limit", "1",
              "--max_new_tokens", "2"], tmp_path)["gsm8k"]
    assert r["config"]["protocol"]["template"] == "plain"
    assert r["config"]["protocol"]["template_from"].endswith("trainer_state.json")


def test_sft_job_folder_resolves_to_its_latest_checkpoint(lora_dirs, tiny):
    adapter, _ = lora_dirs
    job = adapter.parent
    (job / "config.json").write_text(json.dumps({"learning_rate": 1e-3}))  # sft's run config, not a model
    (job / "latest").write_text(adapter.name + "\n")
    src = evalmodel.resolve_model(str(job))
    assert (src.base, src.adapter, src.template) == (tiny, adapter, "plain")


def test_template_falls_back_to_the_data_cache_meta(tmp_path):
    ckpt, cache = tmp_path / "job" / "checkpoint-000005", tmp_path / "cache" / "abc123"
    ckpt.mkdir(parents=True)
    (cache / "train").mkdir(parents=True)
    (cache / "train" / "meta.json").write_text(json.dumps({"template": "tulu", "tokenizer": "t"}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 5, "data_cache_dir": str(cache)}))
    assert evalmodel.find_template(ckpt) == ("tulu", str(cache / "train" / "meta.json"))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 5}))
    assert evalmodel.find_template(ckpt) == (None, None)


@pytest.mark.slow  # two torchrun workers each import torch + transformers (~40 s on a busy 2-core machine)
def test_two_process_run_equals_one_process(tiny, shared, tmp_path):
    args = ["--model", str(tiny), "--datasets", "gsm8k", "--data_dir", str(shared / "data"), "--limit", "5",
            "--max_new_tokens", "8", "--batch_size", "2", "--quiet", "--write_report", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "evalmath.py"), *args, "--output_dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = _run(args, tmp_path / "one")["gsm8k"]
    (ddp_file,) = (tmp_path / "ddp" / "gsm8k").glob("*.json")
    ddp = json.loads(ddp_file.read_text())
    assert ddp["config"]["decoding"]["world_size"] == 2
    assert ddp["items"] == single["items"]
    assert ddp["summary"] == single["summary"]


def _one_line_error(args: list[str], tmp_path: Path) -> str:
    with pytest.raises(SystemExit) as e:
        evalmath.main([*args, "--output_dir", str(tmp_path / "eval"), "--quiet"])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_decoding_input_errors_are_one_line(tiny, shared, tmp_path):
    common = ["--model", str(tiny), "--datasets", "gsm8k", "--data_dir", str(shared / "data")]
    assert "--limit 0: nothing to evaluate" in _one_line_error([*common, "--limit", "0"], tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    msg = _one_line_error(["--model", str(tiny), "--dataset_file", str(empty)], tmp_path)
    assert str(empty) in msg and "empty" in msg
    msg = _one_line_error([*common, "--limit", "2", "--max_new_tokens", "64", "--max_batch_tokens", "50"], tmp_path)
    assert "--max_batch_tokens 50 is less than one row" in msg  # the longest prompt + 64 does not fit
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
         "base_model_name_or_path": str(tmp_path / "gone")}))
    msg = _one_line_error(["--model", str(adapter), "--datasets", "gsm8k", "--data_dir", str(shared / "data")],
                          tmp_path)
    assert str(tmp_path / "gone") in msg and "--base_model" in msg
    assert not (tmp_path / "eval").exists()  # nothing written


def test_decode_progress_eta_uses_recent_steps():
    now = [0.0]
    lines = []
    p = evalmath.DecodeProgress(100, every=0.0, window=10.0, clock=lambda: now[0],
                                stream=type("S", (), {"write": lambda self, t: lines.append(t), "flush": lambda s: 0})())
    for t in range(1, 11):  # slow start: 1 problem per second (and 100 tok/s) for 10 s
        now[0] = float(t)
        p(t, 100, 100 * t)
    for t in range(11, 21):  # then 4 problems per second (400 tok/s)
        now[0] = float(t)
        p(10 + 4 * (t - 10), 100, 1000 + 400 * (t - 10))
    text = [x for x in lines if x.strip()]
    assert text[-1] == "  decoding: 50/100 problems, 400 tok/s, ETA 12s"  # 50 left at the recent 4/s, not 2.5/s


def test_evaluate_records_should_abort_returns_the_finished_problems(tiny):
    from transformers import AutoTokenizer

    from model import Transformer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = Transformer.from_pretrained(tiny).eval()
    records = [{"id": str(i), "question": q, "answer": "7"} for i, q in enumerate(QUESTIONS)]
    full, _ = evalmath.evaluate_records(model, tok, records, "boxed", "gsm8k", 24, 2, eos_ids=[])
    asked = []
    items, summary = evalmath.evaluate_records(model, tok, records, "boxed", "gsm8k", 24, 2, eos_ids=[],
                                               should_abort=lambda: asked.append(1) or len(asked) > 30)
    assert summary["partial"] is True and 0 < len(items) < len(records) == summary["n"] + len(records) - len(items)
    by_id = {it["id"]: it for it in full}
    assert all(it == by_id[it["id"]] for it in items)  # what was finished is exactly the full run's
    assert "partial" not in evalmath.evaluate_records(model, tok, records[:2], "boxed", "gsm8k", 4, 2)[1]


def test_ctrl_c_writes_partial_results_without_traceback(tiny, shared, tmp_path):
    """SIGINT to a running evalmath: the problems decoded so far are written, marked partial; exit 130."""
    import signal
    import time

    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "evalmath.py"), "--model", str(tiny), "--datasets", "gsm8k", "math",
           "--data_dir", str(shared / "data"), "--max_new_tokens", "256", "--batch_size", "4",
           "--output_dir", str(out), "--write_report", "false"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = ""
    while "evalmath: gsm8k" not in seen:  # decoding has started
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = seen + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopping: finishing the current decoding step" in err
    (path,) = (out / "gsm8k").glob("*.json")
    r = json.loads(path.read_text())
    assert r["partial"] is True and r["summary"]["partial"] is True
    assert 0 < len(r["items"]) < r["config"]["n_problems"] == 1319
    assert not (out / "math").exists()  # the next dataset is not started


# ----------------------------------------------------------------------------- grade / report / review

def test_grade_cli_round_trip(tmp_path):
    import grader

    rows = [{"id": "a", "dataset": "gsm8k", "response": "So 3 + 4 = 7. The answer is 7.", "gold": "7"},
            {"id": "b", "dataset": "gsm8k", "response": "I think it is \\boxed{8}.", "gold": "7"},
            {"id": "c", "dataset": "math", "response": "Hence $\\boxed{\\frac{1}{2}}$.", "gold": "0.5"},
            {"id": "d", "dataset": "math", "response": "no idea", "gold": "\\pi"}]
    inp, out = tmp_path / "preds.jsonl", tmp_path / "verdicts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evalmath.main(["grade", "--input", str(inp), "--output", str(out)])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(g) for g in got] == [{"id", "correct", "extracted", "error_type"}] * 4
    for r, g in zip(rows, got):
        v = grader.grade(r["response"], r["gold"], r["dataset"])
        assert (g["id"], g["correct"], g["extracted"], g["error_type"]) == (r["id"], v.correct, v.extracted,
                                                                            v.error_type)
    assert [g["correct"] for g in got] == [True, False, True, False]
    inp.write_text('{"id": "x", "response": "1"}\n')
    with pytest.raises(SystemExit, match="preds.jsonl:1"):
        evalmath.main(["grade", "--input", str(inp), "--output", str(out)])


def _items() -> list[dict]:
    spec = [(True, "Algebra", 1, 10, False, "2"), (False, "Algebra", 1, 20, True, None),
            (True, "Geometry", 2, 30, False, "x"), (False, "Geometry", 2, 40, False, "y"),
            (True, "Geometry", 3, 50, False, "z")]
    return [{"id": f"i{k}", "question": "q", "gold": "g", "response": "r", "correct": c, "subject": s,
             "level": lv, "n_tokens": n, "truncated": t, "extracted": e,
             "error_type": None if c else ("no_answer" if e is None else "wrong")}
            for k, (c, s, lv, n, t, e) in enumerate(spec)]


def test_summary_statistics_on_hand_built_items():
    s = reports.summarize(_items())
    assert (s["n"], s["correct"]) == (5, 3) and s["accuracy"] == pytest.approx(0.6)
    assert s["stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 4))  # sample-variance stderr, as lm-eval
    assert s["avg_tokens"] == 30 and s["truncation_rate"] == pytest.approx(0.2)
    assert s["no_answer_rate"] == pytest.approx(0.2)
    assert s["by_level"]["1"]["accuracy"] == 0.5 and s["by_level"]["3"] == {"n": 1, "correct": 1, "accuracy": 1.0,
                                                                              "stderr": 0.0}
    assert s["by_subject"]["Geometry"]["n"] == 3 and s["by_subject"]["Geometry"]["accuracy"] == pytest.approx(2 / 3)
    assert s["error_types"] == {"no_answer": 1, "wrong": 1}


def test_pass_at_k_matches_enumeration_and_majority_vote():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (4, 4, 2), (7, 3, 5)]:
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in sub) for sub in subsets) / len(subsets)
        assert reports.pass_at_k(n, c, k) == pytest.approx(brute)
    samples = [{"extracted": "3", "correct": False}, {"extracted": "4", "correct": True},
               {"extracted": None, "correct": False}, {"extracted": " 4", "correct": True}]
    assert reports.majority_vote(samples)["extracted"].strip() == "4"
    items = [{"correct": False, "n_tokens": 1, "extracted": "3", "samples": samples, "majority_correct": True}]
    s = reports.summarize(items)
    assert s["pass@1"] == pytest.approx(0.5) and s["pass@4"] == 1.0 and s["maj@4"] == 1.0


def test_sampling_with_n_samples_reports_pass_at_k(tiny, shared, tmp_path):
    r = _run(["--model", str(tiny), "--datasets", "gsm8k", "--data_dir", str(shared / "data"), "--limit", "2",
              "--max_new_tokens", "5", "--temperature", "1.0", "--top_p", "0.9", "--n_samples", "3", "--seed", "7"],
             tmp_path)["gsm8k"]
    assert all(len(it["samples"]) == 3 for it in r["items"])
    assert {"pass@1", "pass@2", "pass@3", "maj@3", "n_samples"} <= set(r["summary"])
    with pytest.raises(SystemExit, match="temperature"):
        evalmath.main(["--model", str(tiny), "--datasets", "gsm8k", "--n_samples", "2"])


def test_report_compare_and_manual_review(tmp_path):
    def result(run_id, items):
        return {"run_id": run_id, "summary": reports.summarize(items), "items": items,
                "config": {"model": "m", "adapter": None, "dataset": "math", "split": "test", "data_hash": "0" * 64,
                           "protocol": {"name": "math-0shot-cot-boxed@v1", "template": "boxed", "num_fewshot": 0,
                                        "cot": True},
                           "decoding": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, "n_samples": 1},
                           "seed": 0, "versions": {}}}
    a, b = result("base", _items()), result("ckpt", [dict(it, correct=True) for it in _items()])
    for r in (a, b):
        write_json(tmp_path / "eval" / "math" / f"{r['run_id']}.json", r)
    evalmath.main(["report", "base", "ckpt", "--eval_dir", str(tmp_path / "eval"),
                   "--out", str(tmp_path / "cmp.md")])
    table = (tmp_path / "cmp.md").read_text()
    assert "| base | m | math |" in table and "| ckpt | m | math |" in table and "Accuracy by subject" in table

    fails = tmp_path / "fails.csv"
    evalmath.main(["review", "export", "base", "--out", str(fails), "--eval_dir", str(tmp_path / "eval"),
                   "--reports_dir", str(tmp_path / "rep")])
    rows = list(csv.DictReader(fails.open()))
    assert [r["id"] for r in rows] == ["i1", "i3"]
    rows[1]["manual_correct"] = "true"  # the reviewer overrules one verdict, leaves the other blank
    with fails.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    evalmath.main(["review", "import", "base", "--csv", str(fails), "--eval_dir", str(tmp_path / "eval"),
                   "--reports_dir", str(tmp_path / "rep")])
    back = json.loads((tmp_path / "eval" / "math" / "base.json").read_text())
    assert back["summary"]["accuracy"] == pytest.approx(0.6)  # automatic verdicts kept
    assert back["summary_manual"]["accuracy"] == pytest.approx(0.8) and back["summary_manual"]["n_reviewed"] == 1
    assert [it.get("manual_correct") for it in back["items"]] == [None, None, None, True, None]
    assert "After manual review" in (tmp_path / "rep" / "base.md").read_text()
    rows[0]["manual_correct"] = "maybe"
    with fails.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(SystemExit, match="fails.csv:2"):
        evalmath.main(["review", "import", "base", "--csv", str(fails), "--eval_dir", str(tmp_path / "eval")])
