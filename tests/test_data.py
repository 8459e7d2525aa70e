"""data.py and packing.py on the real shared data and tokenizers (no mocks)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import records
from cli import UserError
from data import IGNORE_INDEX, DataError
from packing import PackedLoader

KNOWN_MALFORMED_MATH = {"train/number_theory/7115.json", "train/number_theory/7117.json"}  # `\boxed{}`: empty
# golds the grader does not credit in their own raw form: its normalize_answer is not idempotent on
# `\$\dfrac23 \approx \$0.67` (normalised once: `\frac23 \approx 0.67`, twice: `\frac23`)
KNOWN_UNCREDITED_GOLD = {"train/counting_and_probability/360.json"}


@pytest.fixture(scope="session")
def qwen(shared):
    return data.load_tokenizer(shared / "models" / "qwen2.5-0.5b")


@pytest.fixture(scope="session")
def small_data(shared, tmp_path_factory) -> Path:
    """A data_dir with the first rows of the real GSM8K and MATH files."""
    root = tmp_path_factory.mktemp("raw")
    for name, n in (("gsm8k", 160), ("math", 120)):
        (root / name).mkdir()
        for split in ("train", "test"):
            lines = (shared / "data" / name / f"{split}.jsonl").read_text().splitlines(True)
            (root / name / f"{split}.jsonl").write_text("".join(lines[: n if split == "train" else 40]))
    return root


# ----------------------------------------------------------------------------- real data

def test_gsm8k_counts_and_gold(shared):
    for split, n in (("train", 7473), ("test", 1319)):
        recs = data.load_records("gsm8k", split, shared / "data")
        assert len(recs) == n
        raw = [json.loads(x) for x in (shared / "data" / "gsm8k" / f"{split}.jsonl").open()]
        for r, row in zip(recs, raw):
            assert r["answer"] == row["answer"].split("####")[-1].strip().replace(",", "")
            assert "####" not in r["solution"] and row["answer"].startswith(r["solution"])
            assert r["split"] == split and r["source"] == "gsm8k"


def test_math_counts_gold_levels(shared):
    train = data.load_records("math", "train", shared / "data")
    test = data.load_records("math", "test", shared / "data")
    assert (len(train), len(test)) == (7500, 5000)
    missing = {r["id"] for r in train + test if r["answer"] is None}
    assert missing == KNOWN_MALFORMED_MATH
    by_id = {r["id"]: r for r in train}
    assert by_id["train/algebra/24014.json"]["answer"] == "2"  # `\boxed 2`, no braces
    assert by_id["train/algebra/25040.json"]["answer"] == "9"
    unknown = {r["id"] for r in train + test if r["meta"]["level"] is None}
    assert unknown == {"train/geometry/377.json", "train/geometry/471.json"}
    assert {r["meta"]["level"] for r in test} == {1, 2, 3, 4, 5}
    assert len({r["meta"]["subject"] for r in train}) == 7


def test_math500_joins_math_test(shared):
    m500 = data.load_records("math500", "test", shared / "data")
    test = {r["id"]: r for r in data.load_records("math", "test", shared / "data")}
    assert len(m500) == 500
    for r in m500:
        t = test[r["meta"]["unique_id"]]
        assert (t["question"], t["solution"], t["meta"]["level"]) == (r["question"], r["solution"],
                                                                      r["meta"]["level"])
        assert records.boxed_answer(t["solution"]) == r["meta"]["answer_raw"]


def test_math_json_tree_equals_jsonl(shared, tmp_path):
    rows = [json.loads(x) for x in (shared / "data" / "math" / "train.jsonl").open()][:40]
    for row in rows:
        _, subject, name = row["unique_id"].split("/")
        p = tmp_path / "math" / "train" / subject / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({k: v for k, v in row.items() if k != "unique_id"}))
    (tmp_path / "math" / "test.jsonl").write_text("")
    tree = data.load_records("math", "train", tmp_path)
    flat = data.load_records("math", "train", shared / "data")[:40]
    assert sorted(tree, key=lambda r: r["id"]) == sorted(flat, key=lambda r: r["id"])


def test_every_gold_answer_is_read_and_credited_by_the_grader(shared):
    """Every gold answer of the shipped data is extracted (records.py, through the grader), and the grader credits
    each dataset's own answer against the stored gold: GSM8K's whole answer text (rationale and `#### N`), MATH's
    and MATH-500's raw answer boxed as a model would write it."""
    import grader

    sizes, missing, uncredited = {}, set(), set()
    for name, splits in records.NAMED.items():
        for split in splits:
            recs = data.load_records(name, split, shared / "data")
            rows = [json.loads(x) for x in (shared / "data" / name / f"{split}.jsonl").open()]
            sizes[f"{name}/{split}"] = len(recs)
            for r, row in zip(recs, rows, strict=True):
                if r["answer"] is None:
                    missing.add(r["id"])
                    continue
                raw = r["meta"]["answer_raw"]
                response = row["answer"] if name == "gsm8k" else f"The final answer is $\\boxed{{{raw}}}$."
                if not grader.grade(response, r["answer"], grader.GRADE_DATASETS[name]).correct:
                    uncredited.add(r["id"])
    assert sizes == {"gsm8k/train": 7473, "gsm8k/test": 1319, "math/train": 7500, "math/test": 5000,
                     "math500/test": 500}
    assert missing == KNOWN_MALFORMED_MATH and uncredited == KNOWN_UNCREDITED_GOLD


# ----------------------------------------------------------------------------- answers

@pytest.mark.parametrize("text,want", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\{1,2\}}", r"\{1,2\}"),
    (r"$x = \boxed{-2}$ or $x = \boxed{1}$.", "1"),  # the last box only (the grader joins boxes in responses)
    ("$= \\boxed{24}$.\n\nChallenge: Is it a coincidence that the answer is 24?", "24"),  # later remarks
    (r"first \fbox{3}", "3"),
    (r"is $\boxed 5$.", "5"),
    (r"\boxed{a} and \boxed{unbalanced", "a"),
    (r"there are $\boxed{}$ primes", None),
    ("no box here", None),
])
def test_boxed_answer(text, want):
    assert records.boxed_answer(text) == want


@pytest.mark.parametrize("raw,dataset,want", [
    (r"\dfrac{3}{4}", "math", r"\frac{3}{4}"), (r"60^\circ", "math", "60"), (r"34,\!560", "math", "34560"),
    (r"\$30", "math", "30"), ("1,080", "math", "1,080"), ("1,080", "gsm8k", "1080"), ("-12,345.5", "gsm8k", "-12345.5"),
])
def test_gold_answer_is_the_graders_normal_form(raw, dataset, want):
    import grader

    assert records.gold_answer(raw, dataset) == want
    assert grader.is_equiv(raw, want, dataset)


def test_gsm8k_final_answer():
    assert records.gsm8k_final_answer("x\n#### 1,234") == "1234"
    assert records.gsm8k_final_answer("#### $18.") == "18"
    assert records.gsm8k_final_answer("#### 5 dollars") == "5"
    assert records.gsm8k_final_answer("no marker") is None


# ----------------------------------------------------------------------------- templates

def _one_of_each(shared):
    g = data.load_records("gsm8k", "train", shared / "data")[0]
    m = data.load_records("math", "train", shared / "data")[0]
    msg = {"id": "x", "source": "dolly", "split": "train", "question": "", "solution": "", "answer": None,
           "meta": {"messages": [{"role": "user", "content": "Hi there"},
                                 {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}]}}
    return [g, m, msg]


@pytest.mark.parametrize("name", ["plain", "boxed", "tulu", "chat"])
def test_loss_mask_covers_exactly_the_completion(shared, qwen, name):
    tpl = data.load_template(name)
    recs = _one_of_each(shared)
    out = data.tokenize_records(recs, tpl, qwen, max_seq_length=4096)
    for rec, toks, mask in zip(recs, out["tokens"], out["masks"]):
        segs = data.render_example(tpl, rec, qwen)
        trained = [t for t, f in segs if f]
        assert trained and segs[-1][1]
        want = sum(len(qwen(t, add_special_tokens=False)["input_ids"]) for t in trained)
        assert int(mask.sum()) == want
        assert qwen.decode(toks[mask == 1].tolist()) == "".join(trained)
        assert qwen.decode(toks.tolist()) == "".join(t for t, _ in segs)
        if rec["meta"].get("messages") is None:  # the prompt the evaluator sees is the untrained head
            prompt = data.render_prompt(tpl, rec["question"], qwen)
            assert "".join(t for t, _ in segs).startswith(prompt) and segs[0][0] == prompt
    boxed = data.render_example(data.load_template("boxed"), recs[0], qwen)
    assert boxed[0][0].rstrip("\n").endswith(
        "Please reason step by step, and put your final answer within \\boxed{}.")
    assert boxed[1][0] == recs[0]["solution"] + "\nThe final answer is \\boxed{72}" + qwen.eos_token


def _less_concat_messages(messages, eos):
    """LESS / open-instruct concat_messages, transcribed from notes/less.md section 3.2."""
    text = ""
    for m in messages:
        if m["role"] == "system":
            text += "<|system|>\n" + m["content"].strip() + "\n"
        elif m["role"] == "user":
            text += "<|user|>\n" + m["content"].strip() + "\n"
        else:
            text += "<|assistant|>\n" + m["content"].strip() + eos + "\n"
    return text


def test_tulu_reproduces_less_byte_for_byte(shared, tmp_path):
    tok = data.load_tokenizer(shared / "models" / "gpt2")
    tok.eos_token = "</s>"  # as Llama-2 (whose sentencepiece model cannot be read here)
    row = {"dataset": "flan_v2", "id": "flan_v2_7", "messages": [
        {"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What is 2+2?\n"},
        {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"}]}
    f = tmp_path / "less.jsonl"
    f.write_text(json.dumps(row) + "\n")
    rec = data.load_records(str(f), "train", tmp_path)[0]
    assert (rec["id"], rec["source"], rec["meta"]["messages"]) == ("flan_v2_7", "flan_v2", row["messages"])
    segs = data.render_example(data.load_template("tulu"), rec, tok)
    text = "".join(t for t, _ in segs)
    assert text == _less_concat_messages(row["messages"], "</s>")
    assert text == ("<|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n4</s>\n"
                    "<|user|>\nAnd 3+3?\n<|assistant|>\n6</s>\n")
    assert [t for t, f in segs if f] == ["4</s>\n", "6</s>\n"]
    out = data.tokenize_records([rec], data.load_template("tulu"), tok, 2048)
    ids, mask = out["tokens"][0], out["masks"][0]
    # LESS labels: the tokens of everything but the assistant contents (+ </s> + "\n") are masked
    assert tok.decode(ids[mask == 1].tolist()) == "4</s>\n6</s>\n"


# ----------------------------------------------------------------------------- errors

def test_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        data.load_records(str(bad), "train", tmp_path)
    problems: list = []
    assert len(data.load_records(str(bad), "train", tmp_path, skip_bad_rows=True, problems=problems)) == 1
    assert problems[0]["where"].endswith("bad.jsonl:2")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"instruction": "do it"}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl:1: field 'output' is missing"):
        data.load_records(str(missing), "train", tmp_path)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:1: field 'answer' is missing"):
        data.load_records("gsm8k", "train", tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        data.load_records(str(empty), "train", tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'gsm8kk'.*Did you mean 'gsm8k'"):
        data.load_records("gsm8kk", "train", tmp_path)
    with pytest.raises(DataError, match="template 'nope' not found"):
        data.load_template("nope")


def test_generic_formats(tmp_path):
    f = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"question": "1+1?", "answer": "2"},
            {"question": "How many?", "answer": "3 plus 4 is 7.\n#### 7"},
            {"prompt": "Say hi", "completion": "hi"},
            {"problem": "Find $x$.", "solution": "So $x=\\boxed{4}$."}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = data.load_records(str(f), "train", tmp_path)
    assert [r["question"] for r in recs] == ["Add.\n\n2 and 3", "1+1?", "How many?", "Say hi", "Find $x$."]
    assert [r["solution"] for r in recs] == ["5", "2", "3 plus 4 is 7.", "hi", "So $x=\\boxed{4}$."]
    assert [r["answer"] for r in recs] == [None, "2", "7", None, "4"]
    assert {r["source"] for r in recs} == {"mixed"} and recs[0]["id"] == "mixed/train/0"


def test_parquet_needs_pyarrow(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        f = tmp_path / "x.parquet"
        f.write_bytes(b"PAR1")
        with pytest.raises(DataError, match="pyarrow"):
            data.load_records(str(f), "train", tmp_path)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "1"}]), tmp_path / "x.parquet")
        assert data.load_records(str(tmp_path / "x.parquet"), "train", tmp_path)[0]["answer"] == "1"


def test_chat_template_needs_one(shared):
    gpt2 = data.load_tokenizer(shared / "models" / "gpt2")
    with pytest.raises(DataError, match="chat_template"):
        data.render_prompt(data.load_template("chat"), "q", gpt2)


def test_config_yaml_and_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets: [math]\nmax_seq_len: 10\n")
    with pytest.raises(UserError, match="unknown key 'max_seq_len'; did you mean 'max_seq_length'"):
        data.parse_config(["--config", str(cfg)])
    cfg.write_text("datasets: [math]\nmax_seq_length: 1024\ntemplate: tulu\n")
    c = data.parse_config(["--config", str(cfg), "--template", "plain", "--ratios", "1", "2"])
    assert (c.datasets, c.max_seq_length, c.template, c.ratios) == (("math",), 1024, "plain", (1.0, 2.0))


def test_percentage_is_less_sampling():
    recs = [{"i": i} for i in range(1000)]
    np.random.seed(42)
    want = np.random.permutation(1000)[:250]
    assert [r["i"] for r in data.sample_percentage(recs, 0.25, 42)] == want.tolist()
    assert data.sample_percentage(recs, 1.0) is recs


def test_mix_and_stratified_sample(shared):
    math = data.load_records("math", "train", shared / "data")
    s = data.stratified_sample(math, 700, seed=0)
    assert len(s) == 700 and s == data.stratified_sample(math, 700, seed=0)
    lv = np.bincount([r["meta"]["level"] or 0 for r in s], minlength=6)
    full = np.bincount([r["meta"]["level"] or 0 for r in math], minlength=6)
    assert np.abs(lv / 700 - full / 7500).max() < 0.01
    mixed = data.mix({"a": [{"s": "a"}] * 100, "b": [{"s": "b"}] * 300}, [1, 1], seed=0)
    assert sum(r["s"] == "a" for r in mixed) == sum(r["s"] == "b" for r in mixed) == 100


# ----------------------------------------------------------------------------- cache

def _prepare(small_data, shared, out, **kw):
    return data.prepare(data.DataConfig(datasets=("gsm8k", "math"), data_dir=small_data, out_dir=out,
                                        tokenizer=shared / "models" / "qwen2.5-0.5b", max_seq_length=1024, **kw))


def test_cache_hit_miss_and_report(small_data, shared, tmp_path):
    path = _prepare(small_data, shared, tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    report = json.loads((path.parent / "report.json").read_text())
    assert report["sizes"]["train"] + report["sizes"]["valid"] == 280 and report["sizes"]["test"] == 80
    assert meta["num_docs"] == report["sizes"]["train"] and meta["template"]["name"] == "boxed"
    assert (path.parent / "valid" / "tokens.npy").exists() and (path.parent / "report.md").exists()
    offsets = np.load(path / "doc_offsets.npy")
    assert offsets[-1] == len(np.load(path / "tokens.npy")) == len(np.load(path / "loss_mask.npy"))
    stamp = (path / "meta.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert _prepare(small_data, shared, tmp_path) == path  # hit: same folder, not rebuilt
    assert time.perf_counter() - t0 < 1.0 and (path / "meta.json").stat().st_mtime_ns == stamp
    changed = tmp_path / "changed"
    shutil.copytree(small_data, changed)
    f = changed / "gsm8k" / "train.jsonl"
    f.write_text(f.read_text().replace("Natalia", "Natalie", 1))
    assert _prepare(changed, shared, tmp_path) != path  # miss on a content change
    assert not list(tmp_path.glob(".tmp-*"))


def test_truncate_and_drop_are_counted(small_data, shared, tmp_path):
    def meta(truncation):
        path = data.prepare(data.DataConfig(datasets=("math",), data_dir=small_data, max_seq_length=200,
                                            tokenizer=shared / "models" / "qwen2.5-0.5b", out_dir=tmp_path,
                                            truncation=truncation, valid_fraction=0.0))
        assert not (path.parent / "valid").exists()  # empty split: no token folder
        return json.loads((path / "meta.json").read_text())
    kept, dropped = meta("truncate"), meta("drop")
    assert kept["truncated"] > 0 and kept["max_doc_len"] == 200
    assert dropped["dropped"] == kept["truncated"] and dropped["num_docs"] == kept["num_docs"] - kept["truncated"]


# ----------------------------------------------------------------------------- loader

@pytest.fixture(scope="module")
def cache(small_data, shared, tmp_path_factory):
    return _prepare(small_data, shared, tmp_path_factory.mktemp("proc"))


def _docs_of(batch) -> list[tuple]:
    out = []
    for ids, doc, lab in zip(batch["input_ids"], batch["doc_ids"], batch["labels"]):
        for d in doc.unique().tolist():
            sel = doc == d
            if (lab[sel] != IGNORE_INDEX).any():
                out.append(tuple(ids[sel].tolist()))
    return out


def test_rows_never_mix_documents(cache):
    loader = PackedLoader(cache, seq_len=1024, batch_size=2, seed=3, drop_last=False)
    meta = json.loads((cache / "meta.json").read_text())
    n_trained = 0
    for b in loader:
        assert b["input_ids"].shape == (2, 1024) and all(v.dtype == torch.long for k, v in b.items()
                                                         if k != "cu_seqlens")
        ids, lab, pos, doc = b["input_ids"], b["labels"], b["position_ids"], b["doc_ids"]
        on = lab != IGNORE_INDEX
        n_trained += int(on.sum())
        nxt_same = torch.zeros_like(on)
        nxt_same[:, :-1] = doc[:, 1:] == doc[:, :-1]
        assert not (on & ~nxt_same).any()  # a label never points into another document
        assert torch.equal(lab[:, :-1][on[:, :-1]], ids[:, 1:][on[:, :-1]])  # already shifted
        starts = torch.ones_like(on)
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        assert torch.equal(pos == 0, starts)  # positions restart exactly at each document
    assert n_trained == meta["num_trained_tokens"]  # every completion token, EOS included, once
    assert loader.epoch == 1 and loader.step == 0


@pytest.mark.parametrize("packing", [True, False])
def test_batch_counts_and_cu_seqlens_are_computed_on_the_cpu(cache, packing):
    """cu_seqlens / max_seqlen / num_tokens / num_labels equal what the device would compute from the batch."""
    from attention import cu_seqlens_from_doc_ids

    loader = PackedLoader(cache, seq_len=1024, batch_size=3, seed=1, packing=packing, drop_last=False)
    for b in loader:
        cu = b["cu_seqlens"]
        assert cu.dtype == torch.int32 and torch.equal(cu, cu_seqlens_from_doc_ids(b["doc_ids"]))
        assert int(b["max_seqlen"]) == int(cu.diff().max()) and int(cu[-1]) == b["input_ids"].numel()
        assert int(b["num_labels"]) == int((b["labels"] != IGNORE_INDEX).sum()) == len(b["label_pos"])
        assert torch.equal(b["labels"].flatten()[b["label_pos"]], b["labels"][b["labels"] != IGNORE_INDEX])
        assert int(b["num_tokens"]) == int(b["real_tokens"].sum())
        assert not b["input_ids"].is_pinned()  # no CUDA here: pin_memory defaults to off


def test_iter_on_device_yields_the_same_batches_and_keeps_the_cursor_exact(cache):
    """iter_on builds the next batch ahead, but state_dict() after k batches is __iter__'s after k batches."""
    from packing import HOST_KEYS

    a = PackedLoader(cache, seq_len=1024, batch_size=2, seed=5)
    b = PackedLoader(cache, seq_len=1024, batch_size=2, seed=5)
    plain, ahead = iter(a), b.iter_on("cpu")
    for _ in range(3):
        x, y = next(plain), next(ahead)
        assert a.state_dict() == b.state_dict()
        assert isinstance(y["max_seqlen"], int) and all(y[k].device.type == "cpu" for k in HOST_KEYS[:-1])
        assert all(torch.equal(x[k], y[k]) for k in x if k != "max_seqlen") and y["max_seqlen"] == int(x["max_seqlen"])
    assert sum(1 for _ in ahead) == a.steps_in_epoch(0) - 3 and b.epoch == 1 and b.step == 0


def test_resume_yields_exactly_the_remaining_batches(cache):
    full = list(PackedLoader(cache, 1024, 2, seed=1))
    a = PackedLoader(cache, 1024, 2, seed=1)
    it = iter(a)
    for _ in range(3):
        next(it)
    sd = json.loads(json.dumps(a.state_dict()))
    b = PackedLoader(cache, 1024, 2, seed=1)
    b.load_state_dict(sd)
    rest = list(b)
    assert len(rest) == len(full) - 3
    for x, y in zip(rest, full[3:]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    again = PackedLoader(cache, 1024, 2, seed=1)
    again.set_epoch(1)
    assert not torch.equal(next(iter(again))["input_ids"], full[0]["input_ids"])  # epochs differ


def test_ranks_disjoint_equal_steps(cache):
    loaders = [PackedLoader(cache, 1024, 2, rank=r, world_size=2, seed=0) for r in range(2)]
    assert loaders[0].steps_in_epoch(0) == loaders[1].steps_in_epoch(0) > 0
    seen = [[d for b in ld for d in _docs_of(b)] for ld in loaders]
    assert len(seen[0]) == len(set(seen[0])) and not set(seen[0]) & set(seen[1])
    single = [d for b in PackedLoader(cache, 1024, 4, seed=0) for d in _docs_of(b)]
    assert sorted(seen[0] + seen[1]) == sorted(single)  # same global rows, split between ranks
    assert loaders[0].state_dict()["epoch"] == 1 and loaders[0].state_dict()["rows_consumed"] == 0


def test_cursor_is_world_size_independent(cache):
    two = [PackedLoader(cache, 1024, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    for ld in two:
        it = iter(ld)
        next(it), next(it)
    sd = two[0].state_dict()
    assert sd == two[1].state_dict() and sd["rows_consumed"] == 8
    one = PackedLoader(cache, 1024, 4, seed=5)
    one.load_state_dict(sd)  # resume the 2-rank run on 1 rank: the same global rows follow
    rest_two = [d for ld in two for b in ld for d in _docs_of(b)]
    assert sorted(d for b in one for d in _docs_of(b)) == sorted(rest_two)


@pytest.mark.slow
def test_concurrent_prepare_publishes_one_cache(small_data, shared, tmp_path):
    import subprocess
    import sys
    cmd = [sys.executable, str(Path(data.__file__)), "prepare", "--datasets", "gsm8k", "--data_dir",
           str(small_data), "--tokenizer", str(shared / "models" / "qwen2.5-0.5b"), "--out_dir", str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    caches = [o.strip().splitlines()[-1].split()[1] for o in outs]
    assert caches[0] == caches[1] and len(list(tmp_path.iterdir())) == 1  # no .tmp-* left behind
    assert len(list(PackedLoader(Path(caches[0]) / "train", 1024, 2))) > 0


def test_unpacked_mode_and_efficiency(cache):
    packed = PackedLoader(cache, 1024, 2)
    assert 0.9 < packed.efficiency <= 1.0
    plain = PackedLoader(cache, 1024, 3, packing=False, drop_last=False)
    meta = json.loads((cache / "meta.json").read_text())
    assert plain.steps_in_epoch(0) == -(-meta["num_docs"] // 3)  # counts examples like HF
    batches = list(plain)
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches) == meta["num_trained_tokens"]
    assert all(b["input_ids"].shape[1] <= 1024 for b in batches) and 0 < plain.efficiency <= 1
    with pytest.raises(DataError, match="seq_len"):
        PackedLoader(cache, 64, 2)


def test_progress_and_skipped_and_truncated_counts_on_the_console(shared, tmp_path, capsys, monkeypatch):
    """prepare prints tokenization progress (rows done / total, elapsed) and one summary line with the bad rows
    skipped and the examples truncated; the counts are in the split's meta.json too (sft.py logs them)."""
    lines = (shared / "data" / "gsm8k" / "train.jsonl").read_bytes().splitlines(True)[:60]
    lines[7] = b'{"question": "caf\xe9", "answer": "#### 1"}\n'  # not UTF-8
    lines[20] = b'{"question": "no answer"}\n'
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b"".join(lines))
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 16)
    cfg = data.DataConfig(datasets=(str(rows),), data_dir=tmp_path, tokenizer=shared / "models" / "qwen2.5-0.5b",
                          max_seq_length=128, out_dir=tmp_path / "cache", skip_bad_rows=True,
                          split_ratios=(1.0, 0.0, 0.0))
    path = data.prepare(cfg)
    err = capsys.readouterr().err.splitlines()
    progress = [e for e in err if e.startswith("data: tokenizing train: ")]
    assert [p.split(": ")[2].split(" rows")[0] for p in progress][-1] == "58/58"
    assert progress[0].startswith("data: tokenizing train: 16/58 rows (")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["skipped_rows"] == 2 and meta["truncated"] > 0
    assert err[-1] == (f"data: 58 train, 0 valid, 0 test, 2 bad rows skipped, {meta['truncated']} train examples "
                       "truncated (longer than --max_seq_length) (details: report.md in the data cache)")
    data.prepare(cfg)
    assert capsys.readouterr().err.splitlines() == [f"data: reusing the cache {path.parent}", err[-1]]


def test_non_utf8_row_names_file_line_and_byte_offset(tmp_path):
    f = tmp_path / "rows.jsonl"
    first = b'{"question": "q", "answer": "1"}\n'
    f.write_bytes(first + b'{"question": "\xff\xfe", "answer": "2"}\n')
    with pytest.raises(DataError, match=rf"rows\.jsonl:2: not UTF-8 text at byte offset {len(first) + 14} "):
        data.load_records(str(f), "train", tmp_path)
    problems: list = []
    assert len(data.load_records(str(f), "train", tmp_path, skip_bad_rows=True, problems=problems)) == 1
    assert problems[0]["where"].endswith("rows.jsonl:2")
