"""Checkpoint I/O for sft.py: atomic folders, manifests, per-rank safetensors state shards, LESS files.

A checkpoint folder (`checkpoint-000100/`, or `checkpoint-100/` in LESS mode) holds:

    adapter_config.json, adapter_model.safetensors   LoRA runs (PEFT format, written by lora.py)
    config.json, model*.safetensors[.index.json]     full runs (HF format) or LoRA with --save_merged
    tokenizer files                                  copied byte for byte from the base model folder
    state-rank00000-of-00002.safetensors ...         training state: trainable weights (fp32 master),
    state.index.json                                   optimizer moments, per-rank RNG; one shard per rank
    trainer_state.json                               step, epoch, scheduler, optimizer hyper-params,
                                                       data-loader state, metrics, config, template, versions
    optimizer.bin                                    LESS mode only: name-keyed Adam moments (docs/checkpoints.md)
    manifest.json                                    written last: size (and with --checksum sha256) of
                                                       every other file

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

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli import UserError, write_json

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


def write_manifest(folder: Path, meta: dict | None = None, checksum: bool = False) -> dict:
    """fsync every file in `folder`, then write manifest.json last: every file's size, and its sha256 when
    `checksum` (sft.py --checksum; reading every byte again costs ~1-2 s per GB on one core)."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            _fsync_file(p)
            files[str(p.relative_to(folder))] = {"size": p.stat().st_size,
                                                 **({"sha256": sha256_file(p)} if checksum else {})}
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
        if check_hashes and "sha256" in info and sha256_file(p) != info["sha256"]:
            return f"{rel}: sha256 does not match the manifest"
    return None


def commit(job_dir: Path, tmp: Path, name: str, checksum: bool = False) -> Path:
    """Rank 0, after every rank has written its files: manifest, rename into place, update `latest`."""
    job_dir = Path(job_dir)
    write_manifest(tmp, {"name": name}, checksum)
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
            raise UserError(f"error: the run folder {job_dir} is in use by pid {pid} on host {host} (since "
                             f"{holder.get('started', '?')}): wait for that run to finish or stop it, or choose "
                             f"another --job_name. If that process is gone, delete {path}.") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return note
    raise UserError(f"error: could not take the lock {path}; another process is starting in {job_dir}")


def release_lock(job_dir: Path) -> None:
    """Remove `run.lock` if this process holds it."""
    path = Path(job_dir) / LOCK
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def lock_run_folder(job_dir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Rank 0, before anything is written there: take the lock and refuse to clobber a previous run unless asked
    to resume or overwrite. A folder with a config but no checkpoint (a run that failed before its first save)
    is restartable as is. Returns notes for the log (a stale lock taken over, a restart)."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    notes = [n for n in [acquire_lock(job_dir)] if n]
    if any(job_dir.glob("checkpoint-*")):
        if not (resume or overwrite):
            release_lock(job_dir)
            raise UserError(f"error: the run folder {job_dir} already holds a run (checkpoints). Pass "
                            f"--resume_from_checkpoint auto to continue it, --overwrite_output_dir true to start "
                            f"over, or choose another --job_name/--output_dir.")
    elif (job_dir / "config.json").exists() and not resume:
        notes.append(f"{job_dir} holds the config of a run that saved no checkpoint: starting it again "
                     f"(its metrics.jsonl is replaced)")
    return notes


def model_folder(path: str) -> Path:
    """`path` as a folder, or a FileNotFoundError that says how to get a model."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no such folder. Download the model beforehand (a local HF folder with config.json, "
                                f"*.safetensors and tokenizer files), or make a tiny one: python maketiny.py --out "
                                f"{path} --arch qwen2")
    return Path(path)


def start_run_folder(cfg, job_dir: Path, is_main: bool, world: int, notes: list[str]):
    """After every check passed (sft.py's `cfg`): --overwrite_output_dir clears the previous run, a fresh start
    drops the metrics of a run that saved no checkpoint; then the run log starts (notes, the config) and
    config.json is written. Returns the runlog.RunLog."""
    import sys

    from cli import versions
    from runlog import RunLog

    if is_main and not cfg.resume_from_checkpoint:
        if cfg.overwrite_output_dir:
            clear_run_folder(job_dir, keep_train_log=not cfg.log_file)
        (Path(job_dir) / "metrics.jsonl").unlink(missing_ok=True)
    log = RunLog(job_dir, is_main, cfg.log_file)
    for n in notes:
        log(n)
    log("config:\n" + json.dumps(dataclasses.asdict(cfg), indent=2))
    if is_main:
        write_json(Path(job_dir) / "config.json", {**dataclasses.asdict(cfg), "_versions": versions(),
                                                   "_world_size": world, "_argv": sys.argv[1:]})
    log.start_reporting(cfg, cfg.job_name)
    return log


def clear_run_folder(job_dir: Path, keep_train_log: bool = False) -> None:
    """--overwrite_output_dir: delete a previous run's checkpoints, metrics, config and train.log (unless
    `keep_train_log`: a wrapper is tee-ing the console into it)."""
    job_dir = Path(job_dir)
    for p in list(job_dir.glob("checkpoint-*")) + list(job_dir.glob(".tmp-*")):
        if p.is_symlink() or p.is_file():
            p.unlink()
        else:
            shutil.rmtree(p)
    for name in ("metrics.jsonl", "config.json", LATEST, *(() if keep_train_log else ("train.log",))):
        (job_dir / name).unlink(missing_ok=True)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- collectives (no-ops on one process)

def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if _world() > 1:
        torch.distributed.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if _world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    if _world() == 1:
        return [obj]
    out: list = [None] * _world()
    torch.distributed.all_gather_object(out, obj)
    return out


def on_rank0(is_main: bool, fn):
    """Run `fn` on rank 0 and share its result. When it raises, rank 0 re-raises the exception and the other
    ranks raise a UserError with its message, so no rank is left waiting at a collective."""
    result, error = None, None
    if is_main:
        try:
            result = ("ok", fn())
        except Exception as e:
            result, error = ("error", str(e)), e
    result = broadcast_object(result)
    if error is not None:
        raise error
    if result[0] == "error":
        raise UserError(result[1])
    return result[1]


# ----------------------------------------------------------------------------- save and resume a run

def default_job_name(cfg) -> str:
    """The run folder's name without --job_name: <model>-<lora|full>-<data> (sft.Config `cfg`)."""
    data = "+".join(Path(s).stem for s in (cfg.train_files or cfg.datasets))
    return f"{Path(cfg.model_name_or_path).name}-{'lora' if cfg.use_lora else 'full'}-{data}"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly (saved as JSON)."""
    step: int = 0
    bad_in_row: int = 0
    skipped_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    tokens_seen: int = 0

    def account(self, step: int, res: dict, log, max_bad_steps: int, job_dir: Path) -> None:
        """Tokens and skipped steps of one step's numbers (runlog.read_step); a skipped step is logged, and
        --max_bad_steps non-finite steps in a row raise a UserError."""
        self.tokens_seen += res["tokens"]
        if res["ok"]:
            self.bad_in_row = 0
            return
        self.skipped_steps += 1  # no completion tokens (nothing to learn) or a non-finite loss / norm: no update
        self.bad_in_row += res["label_tokens"] > 0
        why = (f"non-finite loss {res['loss']} or grad norm {res['grad_norm']}" if res["label_tokens"] else
               "no completion tokens in this batch (all truncated away?)")
        log(f"step {step}: {why}: update skipped ({self.bad_in_row} in a row, {self.skipped_steps} in all)")
        if self.bad_in_row >= max_bad_steps:
            raise UserError(f"error: {self.bad_in_row} non-finite steps in a row (--max_bad_steps); stopping. "
                            f"The last good checkpoint is in {job_dir} ({LATEST}). Lower "
                            f"--learning_rate, check the data, or use --precision fp32.")


def _is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def collect_state(named, optim, rank: int) -> tuple[dict, set, dict]:
    """Trainable weights, optimizer moments and this rank's RNG as (local tensors, sharded keys, shapes)."""
    tensors, sharded, shapes = {}, set(), {}

    def add(key, t):
        if _is_dtensor(t):
            tensors[key], shapes[key] = t.to_local(), list(t.shape)
            sharded.add(key)
        else:
            tensors[key] = t

    for n, p in named:
        add(f"model.{n}", p.detach())
        for k, v in optim.state.get(p, {}).items():
            if torch.is_tensor(v):
                add(f"optim.{n}.{k}", v)
    tensors.update(rng_state_tensors(rank))
    return tensors, sharded, shapes


@torch.no_grad()
def restore_state(path: Path, named, optim, rank: int, world: int) -> tuple[dict, bool]:
    """Load weights, optimizer moments and RNG from a checkpoint; returns (trainer_state, exact)."""
    from torch.distributed.tensor import DTensor

    meta = json.loads((path / TRAINER_STATE).read_text())
    tensors, saved_world = load_state_shard(path, rank, world)
    missing = [n for n, _ in named if f"model.{n}" not in tensors]
    if missing:
        raise UserError(f"error: {path} does not match this model/config: no saved state for {missing[:4]} "
                        f"({len(missing)} parameters). Was it written with other --use_lora/--lora_* settings?")
    for n, p in named:
        t = tensors[f"model.{n}"]
        target = p.to_local() if _is_dtensor(p) else p
        if t.shape != target.shape:
            raise UserError(f"error: {path}: {n} has shape {tuple(t.shape)} in the checkpoint, "
                            f"{tuple(target.shape)} here")
        target.copy_(t)
        st = {}
        for key in [k for k in tensors if k.startswith(f"optim.{n}.")]:
            name, v = key[len(f"optim.{n}."):], tensors[key]
            if name == "step":
                group = next(g for g in optim.param_groups if any(q is p for q in g["params"]))
                st[name] = v.to(p.device if (group.get("fused") or group.get("capturable")) else "cpu")
            elif _is_dtensor(p):
                st[name] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                              shape=p.shape, stride=p.stride())
            else:
                st[name] = v.to(p.device)
        if st:
            optim.state[p] = st
    for g, saved in zip(optim.param_groups, meta["optimizer"]["param_groups"]):
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
    exact = saved_world == world and set_rng_state_tensors(tensors, rank)
    if not exact:
        seed_everything(meta["config"]["seed"] + 1000 * rank + meta["step"])
    return meta, exact


def base_model_ref(model_name_or_path: str) -> str:
    """What adapter_config.json's base_model_name_or_path points at: the absolute local folder."""
    p = Path(model_name_or_path)
    return str(p.resolve()) if p.is_dir() else model_name_or_path


def _full_model_state(run) -> dict[str, torch.Tensor]:
    """The unsharded model state dict on CPU (collective under FSDP: every rank must call)."""
    if run.d.world == 1:
        return {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_weights(run, folder: Path) -> None:
    """LoRA: PEFT adapter (+ merged HF model in merged/ with --save_merged); full: HF-format safetensors."""
    import lora
    from model import save_hf_weights

    cfg, main = run.cfg, run.d.main
    export_dtype = torch.bfloat16 if run.dtype == torch.bfloat16 else torch.float32
    if cfg.use_lora:
        adapter = {n: (p.full_tensor() if _is_dtensor(p) else p).detach().cpu() for n, p in run.named}
        if main:
            lora.save_adapter(adapter, run.lcfg, folder, base_model_name_or_path=base_model_ref(cfg.model_name_or_path),
                              tied_embeddings=bool(run.hf_config.get("tie_word_embeddings")))
        if cfg.save_merged:
            full = _full_model_state(run)
            if main:
                save_hf_weights(lora.merged_state_dict(full, run.lcfg), folder / "merged", run.hf_config,
                                dtype=export_dtype)
                copy_tokenizer_files(Path(cfg.model_name_or_path), folder / "merged")
    else:
        full = _full_model_state(run)
        if main:
            save_hf_weights(full, folder, run.hf_config, dtype=export_dtype)


def due(run) -> bool:
    """Whether the current step is saved: the last step always, else per --save_strategy (steps / epoch / no)."""
    cfg, step = run.cfg, run.st.step
    if step >= run.data.total_steps:
        return True
    if cfg.save_strategy == "steps":
        return step % cfg.save_steps == 0
    return cfg.save_strategy == "epoch" and step in run.data.epoch_end_steps


def track_best(run, res: dict) -> bool:
    """After an evaluation (`res`): a new best --metric_for_best is saved and linked as checkpoint-best; else one
    more evaluation without improvement. True when --early_stopping_patience is used up."""
    cfg, st = run.cfg, run.st
    key = "eval_loss" if cfg.metric_for_best == "loss" else "eval_accuracy"
    if key not in res:
        return False
    if st.best_metric is None or (res[key] < st.best_metric if key == "eval_loss" else res[key] > st.best_metric):
        st.best_metric, st.best_step, st.evals_since_best = res[key], st.step, 0
        if cfg.save_strategy != "no":
            save(run, "best", best=f"{key} {res[key]:.4f}")
    else:
        st.evals_since_best += 1
    return bool(cfg.early_stopping_patience and st.evals_since_best >= cfg.early_stopping_patience)


def save(run, reason: str, best: str | None = None) -> Path | None:
    """Atomic save of the current step (every rank calls). `run` is sft.py's Run. `best` (the metric, for the
    log) also points checkpoint-best at it. Returns the folder on rank 0, else None; a step saved already is
    not saved again (but may still become the best)."""
    import less
    from cli import versions

    cfg, d, st = run.cfg, run.d, run.st
    name = checkpoint_name(st.step, cfg.less_compat)
    if st.step in run.saved:
        if best and d.main and (run.job_dir / name).is_dir():
            set_best(run.job_dir, name)
            run.log(f"new best {best} at step {st.step} -> {BEST}")
        return None
    t0 = time.time()
    tmp = begin(run.job_dir, name) if d.main else tmp_path(run.job_dir, name)
    barrier()
    tensors, sharded, shapes = collect_state(run.named, run.optim, d.rank)
    save_state_shard(tmp, tensors, sharded, shapes, d.rank, d.world)
    write_weights(run, tmp)
    if cfg.less_compat and cfg.use_lora:
        less.write_optimizer(tmp / "optimizer.bin", run.named, run.optim, write=d.main)
    loader_states = all_gather_object(run.data.train.state_dict())
    if d.main:
        copy_tokenizer_files(Path(cfg.model_name_or_path), tmp)
        write_json(tmp / TRAINER_STATE, {
            "step": st.step, "epoch": st.step / run.data.updates_per_epoch, "total_steps": run.data.total_steps,
            "world_size": d.world, "template": cfg.template, "reason": reason,
            "base_model_name_or_path": base_model_ref(cfg.model_name_or_path), "use_lora": cfg.use_lora,
            "schedule": dataclasses.asdict(run.sched),
            "optimizer": {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                           for g in run.optim.param_groups]},
            "loader": loader_states, "train": dataclasses.asdict(st), "metrics": run.last_eval,
            "data_cache_dir": str(run.data.cache_root), "config": dataclasses.asdict(cfg), "versions": versions(),
        })
    barrier()
    final = None
    if d.main:
        final = commit(run.job_dir, tmp, name, cfg.checksum)
        removed = prune(run.job_dir, cfg.save_total_limit, {name, best_target(run.job_dir) or ""})
        run.log(f"saved {name} ({reason}, {time.time() - t0:.1f}s)" + (f"; removed {', '.join(removed)}" if removed else ""))
        if best:
            set_best(run.job_dir, name)
            run.log(f"new best {best} at step {st.step} -> {BEST}")
    barrier()
    run.saved.add(st.step)
    return final


def resume(run, where: str) -> bool:
    """Restore the newest complete checkpoint (`auto`) or the folder `where` into `run` (sft.py's Run).
    False when `auto` finds nothing to resume; damaged checkpoints are then moved aside, never overwritten."""
    d = run.d
    if where == "auto":  # rank 0 verifies (sizes; sha256 when saved with --checksum), the others take its answer
        path, notes = broadcast_object(find_resumable(run.job_dir) if d.main else None)
        for n in notes:
            run.log(n)
        if path is None:
            if d.main:
                _set_aside_unresumable(run)
            barrier()
            return False
    else:
        path = Path(where)
        reason = broadcast_object((verify(path) if path.is_dir() else "no such folder") if d.main else None)
        if reason:
            raise UserError(f"error: --resume_from_checkpoint {where}: not a complete checkpoint ({reason})")
    meta, exact = restore_state(path, run.named, run.optim, d.rank, d.world)
    saved_world = meta["world_size"]
    try:  # the loader state is (epoch, rows consumed): it re-splits over another number of ranks
        run.data.train.load_state_dict(meta["loader"][0])
    except ValueError as e:
        raise UserError(f"error: cannot resume the data loader from {path} (written by {saved_world} ranks, "
                        f"this run has {d.world}): {e}") from None
    known = {f.name for f in dataclasses.fields(TrainState)}
    run.st = TrainState(**{k: v for k, v in meta["train"].items() if k in known})
    run.last_eval = meta.get("metrics") or {}
    run.saved.add(run.st.step)
    run.log.truncate_metrics(run.st.step)
    run.log(f"resumed from {path} at step {run.st.step}"
            + ("" if exact else f" (written by {saved_world} ranks: model and optimizer restored, RNG reseeded,"
                                 " so the continuation is not bitwise identical)"))
    if meta.get("total_steps") not in (None, run.data.total_steps):
        run.log(f"the schedule was recomputed: {run.data.total_steps} total steps now (the checkpoint's run had "
                f"{meta['total_steps']}; --max_steps / --num_train_epochs changed), learning rate from step "
                f"{run.st.step} follows the new schedule")
    return True


def _set_aside_unresumable(run) -> None:
    """`auto` found nothing to resume: damaged checkpoints (and the metrics and links that belong to them)
    move into a `damaged-<time>/` folder, named in the log; a run that saved nothing loses its metrics."""
    job = run.job_dir
    damaged = [p.name for _, p in list_checkpoints(job)] + [p.name for p in job.glob(".tmp-checkpoint-*")]
    if damaged:
        names = damaged + [n for n in ("metrics.jsonl", LATEST, BEST) if (job / n).exists() or (job / n).is_symlink()]
        dest = move_aside(job, names)
        run.log(f"--resume_from_checkpoint auto: no complete checkpoint in {job}; moved {', '.join(names)} "
                f"into {dest} (nothing deleted) and starting fresh with a new metrics.jsonl")
    else:
        run.log(f"--resume_from_checkpoint auto: no checkpoint in {job}; starting fresh")
        run.log.truncate_metrics(0)
