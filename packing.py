"""The packed loader: fixed-length rows of whole documents from a data.py token cache.

    loader = PackedLoader("data/processed/<key>/train", seq_len=2048, batch_size=8, rank=r, world_size=w)
    for batch in loader.iter_on(device):  # tensors [batch_size, seq_len] on `device`, the next one in flight
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"],
                       cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") / batch["num_labels"]

A batch holds int64 [B, T] `input_ids`, `labels`, `position_ids`, `doc_ids`; `cu_seqlens` (int32 [N_docs + 1],
where every document, padding tails included, starts in the flattened B*T tokens, then B*T: what varlen
attention takes); and numbers computed on the CPU so a trainer never reads them back from the device:
`real_tokens` [B] (non-pad tokens per row), 0-d `num_tokens`, `num_labels` (labels != IGNORE_INDEX) and
`max_seqlen` (the longest document); `label_pos` (int64 [num_labels], the flattened positions of those labels:
`hidden.flatten(0, 1)[label_pos]` selects the trained positions without the host sync of a boolean mask). `to_device` / `iter_on` keep those (HOST_KEYS) on the CPU, and
`max_seqlen` is also a plain int under `max_seqlen` there. With CUDA available the tensors are in pinned
memory, so `to_device`'s non_blocking copies overlap compute.

Labels are ALREADY SHIFTED: labels[b, t] is the target for position t, i.e. the next token of the same
document when that token is trained (a completion token, EOS included), else IGNORE_INDEX. So the loss
is plain cross-entropy of logits[b, t] against labels[b, t]: no shift, no cross-document targets.

The plan of an epoch is a pure function of (seed, epoch): the documents are shuffled, packed best-fit
into rows of seq_len tokens (padding only at a row's tail), and the rows shuffled. Global step s gives
rank r the rows [s*G + r*B, s*G + (r+1)*B) with G = B * world_size: ranks never overlap and all take
the same number of steps. The state is (epoch, rows consumed), independent of the world size.
"""
from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data import IGNORE_INDEX, DataError

HOST_KEYS = ("real_tokens", "num_tokens", "num_labels", "max_seqlen")  # stay on the CPU in to_device


def to_device(batch: dict, device: torch.device | str) -> dict:
    """The batch with its tensors on `device` (non_blocking: asynchronous from pinned memory, in stream order
    before later kernels) except HOST_KEYS, which stay CPU tensors; `max_seqlen` becomes a plain int."""
    out = {k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in batch.items()}
    out["max_seqlen"] = int(batch["max_seqlen"])
    return out


def best_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Place documents, in `order`, into the open row with the least room that still fits them."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for d in order.tolist():
        n = int(lengths[d])
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            room, r = free.pop(i)
            rows[r].append(d)
            if room - n > 0:
                bisect.insort(free, (room - n, r))
        else:
            rows.append([d])
            if capacity - n > 0:
                bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


class PackedLoader:
    """Deterministic, resumable, rank-sharded batches from a token cache (see the module docstring).

    packing=False puts one document per row, padded to the longest row of the rank's batch.
    drop_last=False keeps the last partial global batch; missing rows are empty (all labels ignored).
    pin_memory (default: whether CUDA is available) puts the batch tensors in page-locked memory.
    """

    def __init__(self, cache_dir: str | Path, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, packing: bool = True, drop_last: bool = True,
                 pin_memory: bool | None = None):
        cache_dir = Path(cache_dir)
        if not (cache_dir / "meta.json").exists():
            raise DataError(f"{cache_dir} is not a token cache (no meta.json); build it with "
                            "python data.py prepare ... (or data.prepare)")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.meta = json.loads((cache_dir / "meta.json").read_text())
        self.tokens = np.load(cache_dir / "tokens.npy", mmap_mode="r")
        self.loss_mask = np.load(cache_dir / "loss_mask.npy", mmap_mode="r")
        self.offsets = np.load(cache_dir / "doc_offsets.npy")
        self.lengths = np.diff(self.offsets)
        if len(self.lengths) == 0:
            raise DataError(f"{cache_dir} holds no documents")
        if self.lengths.max() > seq_len:
            raise DataError(f"{cache_dir} has documents of {self.lengths.max()} tokens > seq_len {seq_len}: "
                            f"prepare with --max_seq_length {seq_len} or raise seq_len")
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.packing, self.drop_last = seed, packing, drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.pad_id = int(self.meta.get("pad_id") or 0)
        self.epoch, self.step = 0, 0
        self._plan: tuple[int, list[list[int]]] | None = None

    # ---------------------------------------------------------------- plan
    def rows(self, epoch: int) -> list[list[int]]:
        """Document indices of every global row of `epoch` (cached for the current epoch)."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.lengths))
            if self.packing:
                rows = best_fit(self.lengths, order, self.seq_len)
                rows = [rows[i] for i in rng.permutation(len(rows))]
            else:
                rows = [[d] for d in order.tolist()]
            self._plan = (epoch, rows)
        return self._plan[1]

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def steps_in_epoch(self, epoch: int) -> int:
        n = len(self.rows(epoch))
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def plan(self, accum: int, num_epochs: int, max_steps: int = 0) -> tuple[int, int, list[int]]:
        """The run's optimizer steps with `accum` micro-batches per step, HF Trainer semantics: (total steps,
        steps in epoch 0, the steps at which epochs end). Total = max_steps if > 0, else the sum over epochs of
        batches // accum; a partial accumulation carries over an epoch boundary, so epoch e ends after
        floor(cumulative batches / accum) steps. Packed epochs differ by a row or two, so each one is planned."""
        first = self.steps_in_epoch(0)
        if first < accum:
            raise DataError(f"one epoch has {first} micro-batches per rank, fewer than --gradient_accumulation_steps "
                            f"{accum}: lower the batch size, accumulation or number of processes, or add data")
        total = max_steps if max_steps > 0 else sum(self.steps_in_epoch(e) // accum for e in range(num_epochs))
        ends, cum, e = [], 0, 0
        while not ends or ends[-1] < total:
            cum += self.steps_in_epoch(e)
            ends.append(min(cum // accum, total))
            e += 1
        return total, first // accum, sorted(set(ends))

    @property
    def efficiency(self) -> float:
        """Real tokens / row capacity over the batches of the current epoch (all ranks)."""
        rows, steps = self.rows(self.epoch), self.steps_in_epoch(self.epoch)
        real = capacity = 0
        for s in range(steps):
            for r in range(self.world_size):
                lo = s * self.global_batch + r * self.batch_size
                lens = [int(self.lengths[row].sum()) for row in rows[lo:lo + self.batch_size]]
                real += sum(lens)
                width = self.seq_len if self.packing else max(lens, default=0)
                capacity += self.batch_size * width
        return real / max(capacity, 1)

    # ---------------------------------------------------------------- rows -> tensors
    def _fill(self, docs: list[int], width: int) -> tuple[np.ndarray, ...]:
        ids = np.full(width, self.pad_id, dtype=np.int64)
        labels = np.full(width, IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros(width, dtype=np.int64)
        doc = np.zeros(width, dtype=np.int64)
        t = 0
        for k, d in enumerate(docs):
            s, e = int(self.offsets[d]), int(self.offsets[d + 1])
            n = e - s
            tok = np.asarray(self.tokens[s:e], dtype=np.int64)
            trained = np.asarray(self.loss_mask[s + 1:e], dtype=bool)
            ids[t:t + n] = tok
            labels[t:t + n - 1] = np.where(trained, tok[1:], IGNORE_INDEX)  # last token: no target
            pos[t:t + n] = np.arange(n)
            doc[t:t + n] = k
            t += n
        pos[t:] = np.arange(width - t)  # padding: its own document
        doc[t:] = len(docs)
        return ids, labels, pos, doc

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """This rank's batch for (epoch, step), without moving the cursor."""
        rows = self.rows(epoch)
        lo = step * self.global_batch + self.rank * self.batch_size
        mine = [rows[i] if i < len(rows) else [] for i in range(lo, lo + self.batch_size)]
        width = self.seq_len if self.packing else max(1, max(int(self.lengths[r].sum()) for r in mine))
        cols = list(zip(*(self._fill(r, width) for r in mine)))
        names = ("input_ids", "labels", "position_ids", "doc_ids")
        out = {k: torch.from_numpy(np.stack(c)) for k, c in zip(names, cols)}
        real = [int(self.lengths[r].sum()) if len(r) else 0 for r in mine]
        seqs = []  # document lengths over the flattened rows: each row's documents, then its padding tail
        for docs, n in zip(mine, real):
            seqs += [int(self.lengths[d]) for d in docs] + ([width - n] if width > n else [])
        out["cu_seqlens"] = torch.from_numpy(np.concatenate([[0], np.cumsum(seqs)]).astype(np.int32))
        out["real_tokens"] = torch.tensor(real)  # non-pad tokens per row
        out["num_tokens"] = torch.tensor(sum(real))
        out["label_pos"] = (out["labels"].flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        out["num_labels"] = torch.tensor(len(out["label_pos"]))
        out["max_seqlen"] = torch.tensor(max(seqs))
        return {k: v.pin_memory() for k, v in out.items()} if self.pin_memory else out

    def __iter__(self):
        """Yield the remaining batches of the current epoch, then move to the next epoch."""
        while self.step < self.steps_in_epoch(self.epoch):
            batch = self.batch(self.epoch, self.step)
            self.step += 1
            yield batch
        self.epoch, self.step = self.epoch + 1, 0

    def iter_on(self, device: torch.device | str) -> Iterator[dict]:
        """__iter__ with every batch moved by to_device, the next batch built and its copy queued before the
        current one is handed out (host work and the copy overlap the caller's compute). The cursor moves only
        as batches are handed out, so state_dict() stays exact."""
        steps, nxt = self.steps_in_epoch(self.epoch), None
        while self.step < steps:
            cur = nxt if nxt is not None else to_device(self.batch(self.epoch, self.step), device)
            nxt = to_device(self.batch(self.epoch, self.step + 1), device) if self.step + 1 < steps else None
            self.step += 1
            yield cur
        self.epoch, self.step = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rows_consumed": self.step * self.global_batch, "seed": self.seed,
                "seq_len": self.seq_len, "packing": self.packing, "num_docs": len(self.lengths),
                "cache_key": self.meta.get("key")}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("seed", "seq_len", "packing", "num_docs", "cache_key"):
            mine = self.state_dict()[k]
            if sd.get(k) != mine:
                raise DataError(f"loader state has {k}={sd.get(k)!r} but this loader has {mine!r}; "
                                "resume with the same data cache and loader settings")
        if sd["rows_consumed"] % self.global_batch:
            raise DataError(f"{sd['rows_consumed']} rows consumed is not a multiple of the global batch "
                            f"{self.global_batch}; resume with batch_size*world_size dividing it")
        self.epoch, self.step = sd["epoch"], sd["rows_consumed"] // self.global_batch
