"""decode.py: the static-cache, continuously batched decoder against transformers' greedy `generate` and a
no-cache recompute, on tiny random Llama / Mistral / Qwen2 models in fp32 on CPU."""
from __future__ import annotations

import pytest
import torch
from test_model import V, hf_dirs, load_hf  # noqa: F401 (hf_dirs is a fixture)

import decode as D
import model as M

# very different lengths (1 .. 90 tokens), so slots are refilled with prompts of other lengths mid-run
LENGTHS = (6, 2, 11, 1, 90, 33, 4, 57, 9, 3)
PROMPTS = [torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENGTHS]
N_NEW = 16


def greedy_full_recompute(m, prompt, n, eos):
    """The plainest greedy decoder: the whole sequence through the model for every new token, no cache."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(m(torch.tensor([seq]))[0, -1].argmax())
            if t in eos:
                return out, "eos"
            out.append(t)
            seq.append(t)
    return out, "length"


def hf_greedy(hf, prompt, n, eos):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, eos_token_id=sorted(eos) or None, pad_token_id=0)
    toks = out[0, len(prompt):].tolist()
    return (toks[:-1], "eos") if toks and toks[-1] in eos else (toks, "length")


def expected_with_stop(ref, stop_token):
    """A reference row cut after the first `stop_token` (the stop rule below), if it comes first."""
    toks, reason = ref
    return (toks[:toks.index(stop_token) + 1], "stop") if stop_token in toks else (toks, reason)


def token_rule(stop_token: int, decoy: int) -> D.StopRule:
    """Stops after `stop_token`; `decoy` is also a candidate but never stops (the host check must say no)."""
    could = torch.zeros(V, dtype=torch.bool)
    could[[stop_token, decoy]] = True
    return D.StopRule(could, lambda toks: toks[-1] == stop_token)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_equals_transformers_and_recompute_for_any_slot_count(hf_dirs, arch):  # noqa: F811
    m, hf = M.Transformer.from_pretrained(hf_dirs[arch]).eval(), load_hf(hf_dirs[arch])
    free = [hf_greedy(hf, p, N_NEW, set()) for p in PROMPTS]
    eos = {free[0][0][4]}  # row 0 ends on EOS at step 5; others end on it wherever their greedy emits it
    refs = [hf_greedy(hf, p, N_NEW, eos) for p in PROMPTS]
    assert refs[0] == greedy_full_recompute(m, PROMPTS[0], N_NEW, eos) and refs[0][1] == "eos"
    assert refs[4] == greedy_full_recompute(m, PROMPTS[4], N_NEW, eos)
    # a stop token taken from a row that does not hit EOS first: that row ends on "stop" mid-run
    row = next(i for i, r in enumerate(refs) if r[1] == "length" and len(set(r[0][:8])) > 2)
    stop_token = refs[row][0][7]
    decoy = next(t for t in refs[row][0] if t != stop_token)
    want = [expected_with_stop(r, stop_token) for r in refs]
    reasons = {r for _, r in want}
    assert {"eos", "stop", "length"} <= reasons, reasons  # rows end at different steps for different reasons
    for slots in (1, 3, 8):
        outs = D.generate(m, PROMPTS, N_NEW, eos, slots=slots, stop=token_rule(stop_token, decoy))
        assert [(o.tokens, o.finish_reason) for o in outs] == want, slots
        plain = D.generate(m, PROMPTS, N_NEW, eos, slots=slots)
        assert [(o.tokens, o.finish_reason) for o in plain] == refs, slots


def test_sync_every_and_max_new_tokens_edges(hf_dirs):  # noqa: F811
    """Host looks every k steps (rows that ended run idle until then) give the same outputs; max_new_tokens
    1 ends every row after its prefill token; 0 gives empty rows."""
    m = M.Transformer.from_pretrained(hf_dirs["qwen2"]).eval()
    ref = D.generate(m, PROMPTS, N_NEW, {3}, slots=4)
    for k in (2, 5):
        assert D.generate(m, PROMPTS, N_NEW, {3}, slots=4, sync_every=k) == ref
    one = D.generate(m, PROMPTS, 1, [], slots=3)
    assert [o.tokens for o in one] == [r.tokens[:1] for r in D.generate(m, PROMPTS, N_NEW, [], slots=3)]
    assert all(o.finish_reason == "length" for o in one)
    assert all(o.tokens == [] for o in D.generate(m, PROMPTS, 0, [], slots=3))


def test_fixed_shape_step_equals_eager_step(hf_dirs):  # noqa: F811
    """The captured/compiled step attends over all max_len positions with the length mask; the eager step
    over the positions in use: same logits. Folded GQA equals the model's plain (enable_gqa) attention."""
    m = M.Transformer.from_pretrained(hf_dirs["llama"]).eval()
    prompts = [PROMPTS[4][:20], PROMPTS[2], PROMPTS[3]]
    engine = D.Engine(m, slots=4, max_len=64, max_new_tokens=8, eos_ids=[])
    with torch.no_grad():
        engine.prefill([0, 1, 3], prompts)
        eager = D.step_logits(m, engine.cache, engine.tokens, engine.arange[:4], 21)
        fixed = D.step_logits(m, engine.cache, engine.tokens, engine.arange[:4], 64)
        torch.testing.assert_close(fixed[[0, 1, 3]], eager[[0, 1, 3]], rtol=1e-5, atol=1e-5)
        for s, p in zip([0, 1, 3], prompts):  # against a no-cache forward of prompt + token
            seq = torch.tensor([p + [int(engine.tokens[s])]])
            torch.testing.assert_close(eager[s], m(seq)[0, -1], rtol=1e-4, atol=1e-4)


def test_fixed_shapes_buckets_and_compaction_give_the_same_tokens(hf_dirs, monkeypatch):  # noqa: F811
    """The GPU path's logic run eagerly on CPU: length buckets, slot buckets (8, 16, 20) and rows moved down
    into a smaller bucket once no prompt waits, with host looks every 3 steps."""
    m = M.Transformer.from_pretrained(hf_dirs["mistral"]).eval()
    prompts = PROMPTS * 3
    free = D.generate(m, prompts, N_NEW, [], slots=20)
    eos = {free[0].tokens[3], free[5].tokens[9], free[7].tokens[12]}  # rows end at different steps
    ref = D.generate(m, prompts, N_NEW, eos, slots=20)
    assert len({len(o.tokens) for o in ref}) > 2
    moves, buckets, orig_move, orig_step = [], [], D.Engine.move, D.Engine.step
    monkeypatch.setattr(D.Engine, "move", lambda self, src, dst: (moves.append(len(src)), orig_move(self, src, dst)))
    monkeypatch.setattr(D.Engine, "step", lambda self, b, kv: (buckets.append((b, kv)), orig_step(self, b, kv)))
    fixed = D.generate(m, prompts, N_NEW, eos, slots=20, fixed=True, sync_every=3)
    assert [(o.tokens, o.finish_reason) for o in fixed] == [(o.tokens, o.finish_reason) for o in ref]
    assert moves and {b for b, _ in buckets} == {8, 16, 20}, (moves, buckets)
    assert {kv for _, kv in buckets} == {64, 128}  # length buckets of max_len 128 (90 + 16 rounded up to 64)


@pytest.mark.slow
def test_compiled_step_equals_eager_on_cpu(hf_dirs):  # noqa: F811
    """torch.compile of the fixed-shape step (Inductor on CPU) gives eager's greedy tokens."""
    m = M.Transformer.from_pretrained(hf_dirs["qwen2"]).eval()
    eager = D.generate(m, PROMPTS[:5], 8, {3}, slots=3)
    compiled = D.generate(m, PROMPTS[:5], 8, {3}, slots=3, compile=True)
    assert [(o.tokens, o.finish_reason) for o in compiled] == [(o.tokens, o.finish_reason) for o in eager]


def test_sampling_on_device(hf_dirs):  # noqa: F811
    m = M.Transformer.from_pretrained(hf_dirs["llama"]).eval()
    greedy = D.generate(m, PROMPTS, 8, [], slots=3)
    # top_p -> 0 keeps only the most likely token: sampling equals greedy
    tiny_p = D.generate(m, PROMPTS, 8, [], slots=3, temperature=1.0, top_p=1e-6,
                        generator=torch.Generator().manual_seed(0))
    assert [o.tokens for o in tiny_p] == [o.tokens for o in greedy]
    s1, s2, s3 = (D.generate(m, PROMPTS, 8, [], slots=3, temperature=1.5, generator=torch.Generator().manual_seed(s))
                  for s in (3, 3, 4))
    assert [o.tokens for o in s1] == [o.tokens for o in s2] != [o.tokens for o in s3]


def test_exponential_race_samples_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).expand(20000, 4)
    draws = D.sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4) / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015, rtol=0)
    nucleus = D.sample(logits, 1.0, 0.6, torch.Generator().manual_seed(0))  # top_p 0.6: tokens 0 and 1 only
    assert set(nucleus.tolist()) == {0, 1}


def test_should_abort_and_progress(hf_dirs):  # noqa: F811
    m = M.Transformer.from_pretrained(hf_dirs["llama"]).eval()
    calls = []
    outs = D.generate(m, PROMPTS, N_NEW, [], slots=2, progress=lambda *a: calls.append(a),
                      should_abort=lambda: len(calls) >= N_NEW + 2)
    done = [o for o in outs if o is not None]
    assert 0 < len(done) < len(PROMPTS) and all(len(o.tokens) == N_NEW for o in done)
    assert calls[-1][0] == len(done) and calls[-1][1] == len(PROMPTS)
    assert [c[2] for c in calls] == sorted(c[2] for c in calls) and calls[-1][2] >= N_NEW * len(done)


def test_slot_count_and_cache_limits(hf_dirs):  # noqa: F811
    m = M.Transformer.from_pretrained(hf_dirs["llama"]).eval()
    assert D.cache_len(m, PROMPTS, 16) == 128  # 90 + 16 rounded up to 64
    assert D.pick_slots(m, 128, 100) == D.CPU_SLOTS and D.pick_slots(m, 128, 5) == 5
    assert D.pick_slots(m, 128, 100, 7) == 7
    assert D.pick_slots(m, 128, 100, "auto", max_batch_tokens=1000) == 7
    assert D.pick_slots(m, 128, 100, 16, max_batch_tokens=300) == 2
    with pytest.raises(D.DecodeLimitError, match=r"--max_batch_tokens 100 is less than one row.*128"):
        D.generate(m, PROMPTS, 16, [], max_batch_tokens=100)
    mistral = M.Transformer.from_pretrained(hf_dirs["mistral"]).eval()
    mistral.args.sliding_window = 64
    with pytest.raises(D.DecodeLimitError, match=r"longest prompt \(90 tokens\).*sliding_window 64"):
        D.generate(mistral, PROMPTS, 16, [])
    assert D.cache_len(mistral, [[1] * 40], 8) == 64  # rounded up, but never past the window
    with pytest.raises(ValueError, match="non-empty"):
        D.generate(m, [[1], []], 4, [])


def old_stop_checker(tokenizer, stop_strings):
    """evalmath's previous rule: after every token, a stop string in the decoded tail of the row."""
    window = max(len(s) for s in stop_strings) + 3
    return lambda toks: any(s in tokenizer.decode(toks[-window:], skip_special_tokens=False) for s in stop_strings)


@pytest.mark.parametrize("tok_dir", ["models/qwen2.5-0.5b", "models/gpt2"])
def test_stop_string_candidates_cover_every_stop(shared, tok_dir):
    """Wherever the tail rule first fires on real text, the token there is a candidate of the device table."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared / tok_dir)
    stops = ("Q:", "</s>", "<|im_end|>", "Problem:")
    rule = D.stop_strings_rule(tok, stops, len(tok) + 5)
    assert rule.could_end.shape == (len(tok) + 5,) and 0 < int(rule.could_end.sum()) < len(tok) // 4
    old = old_stop_checker(tok, stops)
    texts = ["So 3 + 4 = 7.\n\nQ: What is", "The answer is 5.Q:", "x Problem:\n", "72 Problem:Q:", "a\u00e9Q:Q",
             "done</s> more", "ok<|im_end|>"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        first = next(j for j in range(len(ids)) if old(ids[:j + 1]))
        assert rule.could_end[ids[first]] and rule.hit(ids[:first + 1]), (text, first)
    assert D.stop_strings_rule(tok, (), 10) is None
    assert bool(D.stop_strings_rule(tok, ("end\n",), 10).could_end.all())  # whitespace-ended: all candidates


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_attention_and_graphs(hf_dirs):  # noqa: F811
    """On CUDA in bf16: decode and prefill attention run with only the FLASH / EFFICIENT kernels allowed (no
    math fallback), and the CUDA-graph step gives the eager step's greedy tokens."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for arch in ("llama", "qwen2"):
        m = M.Transformer.from_pretrained(hf_dirs[arch], dtype=torch.bfloat16, device="cuda").eval()
        eager = D.generate(m, PROMPTS, N_NEW, {3}, slots=3, graphs=False)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            fused = D.generate(m, PROMPTS, N_NEW, {3}, slots=3, graphs=False)
            graphed = D.generate(m, PROMPTS, N_NEW, {3}, slots=3, graphs=True)
        assert [o.tokens for o in fused] == [o.tokens for o in eager]
        assert [o.tokens for o in graphed] == [o.tokens for o in eager]


@pytest.mark.slow
def test_bench_gpu_smoke_runs_without_tyro(shared, tmp_path):
    """scripts/bench_gpu.py --smoke (tiny shapes, CPU when there is no GPU) with tyro unimportable, as on the
    GPU machine: every section runs and the Markdown section is appended."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(D.__file__).resolve().parent
    out = tmp_path / "bench.md"
    out.write_text("# earlier content\n")
    code = ("import runpy, sys; sys.modules['tyro'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable, "-c", code, str(repo / "scripts/bench_gpu.py"), "--smoke", "--assets", str(shared),
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    md = out.read_text()
    assert md.startswith("# earlier content\n") and "## GPU benchmark" in md and "(smoke run)" in md
    rows = [line for line in md.splitlines() if line.startswith("| decode") or line.startswith("| evalmath")]
    assert len(rows) == 5 and not any("failed" in row or "skipped" in row for row in rows), md
    assert "| training |" in md and "torch " + torch.__version__ in md
