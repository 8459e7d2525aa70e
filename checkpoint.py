"""Checkpoint I/O for sft.py: atomic folders, manifests, per-rank safetensors state shards, LESS files.

A checkpoint folder (`checkpoint-000100/`, or `checkpoint-100/` in LESS mode) holds:

    adapter_config.json, adapter_model.safetensors   LoRA runs (PEFT format, written by lora.py)
    config.json, model*.safetensors[.index.json]     full runs (HF format) or LoRA with --save_merged
    tokenizer files                                  copied byte for byte from the base model folder
    state-rank00000-of-00002.safetensors ...         training state: trainable weights (fp32 master),
    state.index.json                                   optimizer moments, per-rank RNG; one shard per rank
    trainer_state.json                               step, epoch, scheduler, optimizer hyper-params,
                                                       data-loader state, metrics, config, template, versions
    optimizer.bin                                    LESS mode only: name-keyed Adam moments (see less.md)
    manifest.json                                    written last: size and sha256 of every other file

Atomicity: everything is written into `.tmp-<name>/` inside the job folder, files are fsynced, the
manifest is written last, then the folder is renamed into place. A folder without a valid manifest is
never resumed from. `latest` (a one-line text file) names the newest complete checkpoint;
`checkpoint-best` is a symlink replaced atomically (os.replace of a new link).

State shards: a tensor sharded by FSDP2 (a DTensor with Shard(0)) is stored as each rank's local
chunk under the same key in that rank's file; a replicated tensor is stored once, in rank 0's file; a
per-rank tensor carries `.rank{r}` in its key. Loading on the same number of ranks reads one's own
file; on a different number the chunks are concatenated and re-chunked (torch.chunk, as FSDP2 does).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import shard_state_dict

MANIFEST = "manifest.json"
STATE_INDEX = "state.index.json"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
BEST = "checkpoint-best"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


# ----------------------------------------------------------------------------- names and small files

def checkpoint_name(step: int, less_style: bool = False) -> str:
    """`checkpoint-000100` (sorts by name), or `checkpoint-100` as LESS and the HF Trainer write it."""
    return f"checkpoint-{step}" if less_style else f"checkpoint-{step:06d}"


def tmp_path(job_dir: Path, name: str) -> Path:
    return Path(job_dir) / f".tmp-{name}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj, fsync: bool = True) -> None:
    """Write JSON through a temporary file and os.replace, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the base model's tokenizer files byte for byte (a re-saved tokenizer may not load in old
    transformers, e.g. the 4.36 that LESS pins). Returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------- atomic folder + manifest

def begin(job_dir: Path, name: str) -> Path:
    """Rank 0: (re)create the empty temporary folder for checkpoint `name` and return it."""
    tmp = tmp_path(job_dir, name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_manifest(folder: Path, meta: dict | None = None) -> dict:
    """fsync every file in `folder`, then write manifest.json (sizes + sha256) last."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            _fsync_file(p)
            files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": "mathsft-checkpoint-v1", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **(meta or {}), "files": files}
    write_json(folder / MANIFEST, manifest)
    _fsync_dir(folder)
    return manifest


def verify(folder: Path, check_hashes: bool = True) -> str | None:
    """None when `folder` is a complete checkpoint, else the reason it is not."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, info in files.items():
        p = folder / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != info["size"]:
            return f"{rel}: size {p.stat().st_size} != {info['size']} in the manifest"
        if check_hashes and sha256_file(p) != info["sha256"]:
            return f"{rel}: sha256 does not match the manifest"
    return None


def commit(job_dir: Path, tmp: Path, name: str) -> Path:
    """Rank 0, after every rank has written its files: manifest, rename into place, update `latest`."""
    job_dir = Path(job_dir)
    write_manifest(tmp, {"name": name})
    final = job_dir / name
    if final.exists():  # e.g. the same step saved again after a roll-back
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(job_dir)
    (job_dir / (LATEST + ".tmp")).write_text(name + "\n")
    os.replace(job_dir / (LATEST + ".tmp"), job_dir / LATEST)
    return final


def list_checkpoints(job_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoint-N` folder (not the best link), oldest first."""
    out = []
    if Path(job_dir).is_dir():
        for p in Path(job_dir).iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir() and not p.is_symlink():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_resumable(job_dir: Path, check_hashes: bool = True) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint in `job_dir` and notes about every folder skipped on the way."""
    notes = []
    for tmp in sorted(Path(job_dir).glob(".tmp-checkpoint-*")) if Path(job_dir).is_dir() else []:
        notes.append(f"skipping {tmp.name}: an interrupted save (no manifest, never renamed into place)")
    for _step, path in reversed(list_checkpoints(job_dir)):
        reason = verify(path, check_hashes)
        if reason is None:
            return path, notes
        notes.append(f"skipping {path.name}: incomplete or corrupt: {reason}")
    return None, notes


def prune(job_dir: Path, keep_last: int | None, protect: set[str]) -> list[str]:
    """Delete the oldest interval checkpoints beyond `keep_last` (never one named in `protect`)."""
    if not keep_last or keep_last <= 0:
        return []
    ckpts = [p for _, p in list_checkpoints(job_dir)]
    removed = []
    for p in ckpts[:-keep_last]:
        if p.name not in protect:
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


def set_best(job_dir: Path, name: str) -> None:
    """Point `checkpoint-best` at checkpoint `name` (relative symlink, swapped in with os.replace)."""
    link = Path(job_dir) / BEST
    tmp = Path(job_dir) / (BEST + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, link)


def best_target(job_dir: Path) -> str | None:
    link = Path(job_dir) / BEST
    return os.readlink(link) if link.is_symlink() else None


def move_aside(job_dir: Path, names: list[str]) -> Path:
    """Move the named entries of `job_dir` into a new `damaged-<time>/` folder there; returns that folder."""
    job_dir = Path(job_dir)
    dest = job_dir / f"damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        dest, n = job_dir / f"damaged-{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
    dest.mkdir()
    for name in names:
        if (job_dir / name).exists() or (job_dir / name).is_symlink():
            os.replace(job_dir / name, dest / name)
    return dest


# ----------------------------------------------------------------------------- run-folder lock

LOCK = "run.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def acquire_lock(job_dir: Path) -> str | None:
    """Take `<job_dir>/run.lock` (pid, host, start time) so that one process at a time writes a run folder.

    A lock held by a live process (or by a process on another host) raises SystemExit naming the holder.
    A lock left by a dead process on this host is taken over; the returned note says so (else None)."""
    path = Path(job_dir) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    note = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid, host = {}, -1, "?"
            if host == me["host"] and pid == me["pid"]:  # this process took it before (in-process reruns)
                path.unlink(missing_ok=True)
                continue
            if host == me["host"] and pid > 0 and not _pid_alive(pid):
                note = (f"removed a stale lock {path} left by pid {pid} on {host} (started "
                        f"{holder.get('started', '?')}; that process is no longer running)")
                path.unlink(missing_ok=True)
                continue
            raise SystemExit(f"error: the run folder {job_dir} is in use by pid {pid} on host {host} (since "
                             f"{holder.get('started', '?')}): wait for that run to finish or stop it, or choose "
                             f"another --job_name. If that process is gone, delete {path}.") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return note
    raise SystemExit(f"error: could not take the lock {path}; another process is starting in {job_dir}")


def release_lock(job_dir: Path) -> None:
    """Remove `run.lock` if this process holds it."""
    path = Path(job_dir) / LOCK
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


# ----------------------------------------------------------------------------- state shards

def shard_file(rank: int, world: int) -> str:
    return f"state-rank{rank:05d}-of-{world:05d}.safetensors"


def save_state_shard(folder: Path, tensors: dict[str, torch.Tensor], sharded: set[str],
                     global_shapes: dict[str, list[int]], rank: int, world: int) -> None:
    """Write this rank's shard. `tensors` holds local tensors (a DTensor's `to_local()` for the keys in
    `sharded`); replicated keys are written by rank 0 only, `.rank{r}` keys by rank r."""
    mine = {}
    for k, t in tensors.items():
        per_rank = re.search(r"\.rank(\d+)$", k)
        if k in sharded or (per_rank and int(per_rank.group(1)) == rank) or (not per_rank and rank == 0):
            mine[k] = t.detach().to("cpu").contiguous()
    save_file(mine, str(Path(folder) / shard_file(rank, world)), metadata={"rank": str(rank)})
    if rank == 0:
        index = {"world_size": world, "files": [shard_file(r, world) for r in range(world)],
                 "tensors": {k: {"shape": global_shapes.get(k, list(t.shape)), "dtype": str(t.dtype),
                                 "sharded": k in sharded} for k, t in tensors.items()}}
        write_json(Path(folder) / STATE_INDEX, index)


def load_state_shard(folder: Path, rank: int, world: int) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's view of the training state: sharded keys as this rank's chunk (re-chunked when the
    checkpoint was written by another number of ranks), replicated keys, and this rank's `.rank{r}`
    keys (only when the world size matches). Returns (tensors, saved world size)."""
    folder = Path(folder)
    index = json.loads((folder / STATE_INDEX).read_text())
    saved_world = index["world_size"]
    files = [folder / f for f in index["files"]]
    is_sharded = {k: v["sharded"] for k, v in index["tensors"].items()}  # rank 0's view; others add .rank{r}
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(files[0]), "pt") as f0:
        for k in f0.keys():
            if not is_sharded.get(k) and not re.search(r"\.rank\d+$", k):
                out[k] = f0.get_tensor(k)
    if saved_world == world:
        with safe_open(str(files[rank]), "pt") as f:
            for k in f.keys():
                if is_sharded.get(k) or k.endswith(f".rank{rank}"):
                    out[k] = f.get_tensor(k)
        return out, saved_world
    sharded = [k for k, v in index["tensors"].items() if v["sharded"]]
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in sharded}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for k in sharded:
                if k in f.keys():
                    parts[k].append(f.get_tensor(k))
    for k in sharded:
        full = torch.cat(parts[k], dim=0)
        chunks = torch.chunk(full, world, dim=0)
        out[k] = chunks[rank].clone() if rank < len(chunks) else full[:0].clone()
    return out, saved_world


# ----------------------------------------------------------------------------- RNG

def rng_state_tensors(rank: int) -> dict[str, torch.Tensor]:
    """Python, numpy, torch CPU and (if present) CUDA generator states of this rank, as tensors."""
    py = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    assert np_name == "MT19937"
    out = {
        f"rng.python.rank{rank}": torch.tensor([py[0], *py[1]], dtype=torch.int64),
        f"rng.numpy_keys.rank{rank}": torch.from_numpy(np_keys.astype(np.int64)),
        f"rng.numpy_meta.rank{rank}": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        f"rng.torch.rank{rank}": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"rng.cuda.rank{rank}"] = torch.cuda.get_rng_state()
    return out


def set_rng_state_tensors(state: dict[str, torch.Tensor], rank: int) -> bool:
    """Restore what rng_state_tensors saved; False when this rank's states are absent."""
    if f"rng.torch.rank{rank}" not in state:
        return False
    py = state[f"rng.python.rank{rank}"].tolist()
    random.setstate((int(py[0]), tuple(int(x) for x in py[1:]), None))
    meta = state[f"rng.numpy_meta.rank{rank}"].tolist()
    np.random.set_state(("MT19937", state[f"rng.numpy_keys.rank{rank}"].numpy().astype(np.uint32),
                         int(meta[0]), int(meta[1]), float(meta[2])))
    torch.set_rng_state(state[f"rng.torch.rank{rank}"])
    if f"rng.cuda.rank{rank}" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[f"rng.cuda.rank{rank}"])
    return True


# ----------------------------------------------------------------------------- HF weights and LESS files

def save_hf_weights(state_dict: dict[str, torch.Tensor], folder: Path, hf_config: dict,
                    dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """HF-format weights (`model.safetensors`, or `model-0000k-of-0000n.safetensors` + index) and
    `config.json`. A tied `lm_head.weight` is dropped, as transformers does."""
    folder = Path(folder)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in state_dict.items()}
    if hf_config.get("tie_word_embeddings") and "lm_head.weight" in sd:
        del sd["lm_head.weight"]
    shards = shard_state_dict(sd, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in sd.values())
        write_json(folder / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg = dict(hf_config)
    if dtype is not None:
        cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
    write_json(folder / "config.json", cfg)
    return names


def save_less_optimizer(path: Path, moments: dict[str, dict[str, torch.Tensor]], lr: float,
                        betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """LESS's `optimizer.bin`: `{"state": {peft_name: {"exp_avg", "exp_avg_sq", "step"}}, "param_groups"}`
    keyed by the live PeftModel parameter names (with `.default.`), full (unsharded) contiguous tensors.
    LESS's get_info reads only state[name]["exp_avg"/"exp_avg_sq"] (less.md 4.2)."""
    state = {name: {k: v.detach().cpu().contiguous() for k, v in m.items()} for name, m in moments.items()}
    groups = [{"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
               "params": list(state)}]
    torch.save({"state": state, "param_groups": groups}, str(path))
