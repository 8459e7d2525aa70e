"""evalmodel: what evalmath.py evaluates and how it is loaded.

    src = resolve_model("outputs/checkpoints/JOB")          # run folder -> checkpoint-best, else latest
    check_model_files(src)                                   # manifest, config.json, safetensors headers
    model, tokenizer = load_model(src, pick_device("auto"), torch.bfloat16)
    eos = eos_token_ids(tokenizer, model.generation_config)

Read top to bottom:
  1. resolving   - --model / --adapter / --base_model -> ModelSource: a Hugging Face model folder, a full sft
                   checkpoint, a LoRA checkpoint (its base from adapter_config.json) or a run folder; the template
                   sft.py recorded (trainer_state.json, else the data cache's meta.json); the tokenizer folder
  2. pre-flight  - checkpoint manifests (sizes, recorded sha256), config.json and the safetensors headers read
                   without loading tensors; each problem is a UserError naming the file and the fix
  3. loading     - device, weights (+ LoRA adapter, merged), tokenizer, EOS ids
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError

REPO = Path(__file__).resolve().parent
# Chat end tokens that also stop decoding when the tokenizer has them (beside generation_config's EOS ids).
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>", "<|end_of_text|>")

# ----------------------------------------------------------------------------- 1. resolving
@dataclass
class ModelSource:
    """Where the weights, the adapter, the tokenizer and the template come from."""

    base: Path  # HF folder with config.json + safetensors
    adapter: Path | None
    tokenizer: Path
    template: str | None
    template_from: str | None  # the file the template name was read from
    checkpoint: Path | None = None  # the checkpoint picked in a run folder (checkpoint-best, else latest)
    fine_tuned_from: str | None = None  # a full checkpoint's base model, from its trainer_state.json


def run_checkpoint(folder: Path) -> Path | None:
    """In an sft.py run folder: the checkpoint `checkpoint-best` links to, else the one `latest` names."""
    best = folder / "checkpoint-best"
    if best.is_dir():
        return folder / os.readlink(best) if best.is_symlink() else best
    latest = folder / "latest"
    if latest.is_file() and (folder / latest.read_text().strip()).is_dir():
        return folder / latest.read_text().strip()
    return None


def _resolve_dir(path: str | os.PathLike, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"error: {flag} {p}: no such file or folder")
    return run_checkpoint(p) or p


def _has_tokenizer(p: Path) -> bool:
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                           "tokenizer_config.json"))


def _read_json(p: Path) -> dict | None:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def find_template(folder: Path) -> tuple[str | None, str | None]:
    """(template, file it was read from): the `template` (or `config.template`) sft.py recorded in the checkpoint's
    trainer_state.json, else that of the data cache its `data_cache_dir` names (a meta.json's `template` or
    `settings.template`)."""
    state = _read_json(folder / "trainer_state.json") or {}
    t = state.get("template") or (state.get("config") or {}).get("template")
    if isinstance(t, str):
        return t, str(folder / "trainer_state.json")
    cache = state.get("data_cache_dir")
    for m in ((Path(cache) / "meta.json", *sorted(Path(cache).glob("*/meta.json"))) if cache else ()):
        meta = _read_json(m) or {}
        t = meta.get("template") if isinstance(meta.get("template"), str) else (meta.get("settings") or {}).get("template")
        if isinstance(t, str):
            return t, str(m)
    return None, None


def resolve_model(model: str, adapter: str | None = None, base_model: str | None = None) -> ModelSource:
    """Base model, full checkpoint (HF weights) or LoRA checkpoint (base path from adapter_config.json)."""
    import lora

    path = _resolve_dir(model, "--model")
    picked = path if path != Path(model) else None
    adapter_dir = _resolve_dir(adapter, "--adapter") if adapter else None
    if adapter_dir is None and (path / lora.ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        adapter_dir = path
    if adapter_dir is not None and adapter_dir == path:
        _, recorded = lora.read_adapter_config(adapter_dir)
        base_str = base_model or recorded
        if not base_str:
            raise SystemExit(f"error: {adapter_dir}/{lora.ADAPTER_CONFIG} names no base_model_name_or_path; "
                             "pass --base_model PATH")
        if not base_model and not Path(base_str).exists() and (REPO / base_str).exists():
            base_str = str(REPO / base_str)  # a repo-relative path recorded by sft.py, run from elsewhere
        base = _resolve_dir(base_str, "--base_model" if base_model else
                            f"base_model_name_or_path in {adapter_dir}/{lora.ADAPTER_CONFIG} (override: "
                            "--base_model PATH)")
    else:
        base = _resolve_dir(base_model, "--base_model") if base_model else path
    if not (base / "config.json").is_file():
        raise SystemExit(f"error: {base} has no config.json: expected a Hugging Face model folder, an sft "
                         "checkpoint (checkpoint-N/) or a LoRA adapter folder")
    meta_dir = adapter_dir or path
    template, template_from = find_template(meta_dir)
    tok_dir = next((d for d in (adapter_dir, path, base) if d is not None and _has_tokenizer(d)), base)
    state = (_read_json(path / "trainer_state.json") or {}) if adapter_dir is None else {}
    origin = state.get("base_model_name_or_path") or (state.get("config") or {}).get("model_name_or_path")
    origin = origin if isinstance(origin, str) else None
    return ModelSource(base, adapter_dir, tok_dir, template, template_from, picked, origin)


# ----------------------------------------------------------------------------- 2. pre-flight

def verify_checkpoint(folder: Path) -> None:
    """A checkpoint with a manifest.json (sft.py writes one last) is checked against it as resume does: every
    file present with its size, and the sha256 (when the save recorded one: sft.py --checksum) of the files
    evaluation reads (not the training state shards).
    Read-only. A folder without a manifest (a model, an adapter, another trainer's checkpoint) passes."""
    import checkpoint as ck

    if not (folder / ck.MANIFEST).is_file():
        return
    reason = ck.verify(folder, check_hashes=False)
    if reason is None:
        files = json.loads((folder / ck.MANIFEST).read_text())["files"]
        for rel, info in files.items():
            if not rel.startswith("state-") and rel != "optimizer.bin" and "sha256" in info and \
                    ck.sha256_file(folder / rel) != info["sha256"]:
                reason = f"{rel}: sha256 does not match the manifest"
                break
    if reason is not None:
        raise UserError(f"{folder}: damaged checkpoint: {reason}; evaluate another checkpoint of the run "
                        f"(the checkpoint-* folders in {folder.parent}) or restore this one")


def check_model_files(src: ModelSource) -> None:
    """Pre-flight before loading: checkpoint manifests, the base model's config.json, its and the adapter's
    safetensors headers. Raises an error naming the file, what was expected and the fix."""
    import lora
    import model as M

    for folder in dict.fromkeys(d for d in (src.adapter, src.base) if d is not None):
        verify_checkpoint(folder)
    M.load_config(src.base)
    M.check_weights(src.base)
    if src.adapter is not None:
        if not (src.adapter / lora.ADAPTER_WEIGHTS).is_file():
            raise UserError(f"{src.adapter}: no {lora.ADAPTER_WEIGHTS}; expected a LoRA adapter folder "
                            "(adapter_config.json + adapter_model.safetensors)")
        M.check_safetensors(src.adapter / lora.ADAPTER_WEIGHTS)


# ----------------------------------------------------------------------------- 3. loading

def pick_device(device: str) -> torch.device:
    """The torch device for --device: cuda when available for "auto", else cpu; a torchrun rank takes
    cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(device)


def load_model(src: ModelSource, device: torch.device, dtype: torch.dtype, merge: bool = True, check: bool = True):
    """(model, tokenizer) in eval mode; a LoRA adapter is loaded onto the base and merged when `merge`.
    `check`: run check_model_files first (evalmath.run does it itself, before printing what it evaluates)."""
    from transformers import AutoTokenizer

    import lora
    from model import Transformer

    if check:
        check_model_files(src)
    model = Transformer.from_pretrained(src.base, dtype=dtype, device=device)
    if src.adapter is not None:
        try:
            lora.load_adapter(model, src.adapter, dtype=dtype)
        except (KeyError, ValueError) as e:
            raise UserError(f"--adapter {src.adapter} does not fit the base model {src.base}: {e}; pass the "
                            "base it was trained on with --base_model PATH") from None
        if merge:
            lora.merge_lora(model)
    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer)
    return model.eval(), tokenizer


def eos_token_ids(tokenizer, generation_config: dict | None = None) -> list[int]:
    """generation_config's eos list + the tokenizer's EOS + chat end tokens that exist in the vocabulary."""
    ids: set[int] = set()
    eos = (generation_config or {}).get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in CHAT_END_TOKENS if t in vocab)
    return sorted(ids)
