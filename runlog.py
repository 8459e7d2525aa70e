"""What sft.py tells the user while it runs: progress lines to the console and `<run>/train.log`, records to
`<run>/metrics.jsonl`, optionally TensorBoard or W&B (when installed), the summary printed at the start, and
Ctrl-C / SIGTERM acknowledged at once (StopFlag). Only rank 0 writes; on other ranks every call is a no-op."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path


class RunLog:
    def __init__(self, job_dir: Path, on: bool, log_file: bool = True):
        self.on = on
        self.job_dir = Path(job_dir)
        self.tb = self.wandb = None
        self.file = None
        if on:
            self.job_dir.mkdir(parents=True, exist_ok=True)
            if log_file:  # --log_file false: a wrapper script tees the console into train.log instead
                self.file = open(self.job_dir / "train.log", "a", buffering=1)

    def __call__(self, msg: str) -> None:
        if self.on:
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            print(line, flush=True)
            if self.file is not None:
                self.file.write(line + "\n")

    def start_reporting(self, cfg, job_name: str) -> None:
        """--report_to tensorboard|wandb when the package is installed; else a notice."""
        if not self.on or cfg.report_to == "none":
            return
        try:
            if cfg.report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(cfg.logging_dir) / job_name))
            else:
                import wandb

                self.wandb = wandb.init(project="mathsft", name=job_name, config=dataclasses.asdict(cfg))
        except Exception as e:  # not installed, not logged in, ...
            self(f"notice: --report_to {cfg.report_to} unavailable ({type(e).__name__}: {e}); "
                 f"metrics go to metrics.jsonl only (pip install {cfg.report_to})")

    def metrics(self, record: dict) -> None:
        if not self.on:
            return
        with open(self.job_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they are recomputed identically)."""
        path = self.job_dir / "metrics.jsonl"
        if self.on and path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.on:
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()
            if self.file is not None:
                self.file.close()


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def read_step(res: dict) -> dict:
    """The numbers of an sft.train_step result (its device tensors, one device -> host copy)."""
    import torch

    loss, tokens, labels, stop, norm, ok = torch.cat([res["sums"], res["norm"].reshape(1).float(),
                                                      res["ok"].reshape(1).float()]).tolist()
    return {"loss": loss / max(labels, 1.0), "grad_norm": norm, "lr": res["lr"], "ok": ok > 0,
            "label_tokens": int(labels), "tokens": int(tokens), "stop": stop > 0}


def log_step(log: RunLog, step: int, data, steps: list[tuple[int, dict]], dt: float, s_per_step: float) -> None:
    """The progress line and metrics.jsonl record of `step`, the last of the read_step results `steps` (step,
    numbers) that took `dt` seconds; the ETA from `s_per_step`; `data` is sft.Data (step counts)."""
    res, tokens, epoch = steps[-1][1], sum(r["tokens"] for _, r in steps), step / data.updates_per_epoch
    eta = fmt_time(s_per_step * (data.total_steps - step))
    log(f"step {step}/{data.total_steps} | loss {res['loss']:.4f} | lr {res['lr']:.3e} | grad norm "
        f"{res['grad_norm']:.3f} | {tokens / dt:,.0f} tok/s | epoch {epoch:.2f} | ETA {eta}")
    log.metrics({"step": step, "loss": res["loss"], "lr": res["lr"], "grad_norm": res["grad_norm"],
                 "tokens": res["tokens"], "tokens_per_s": tokens / dt, "label_tokens": res["label_tokens"],
                 "epoch": epoch})


def log_setup(log: RunLog, cfg, world: int, device, model, dtype, data, warmup: int) -> None:
    """The lines printed before the first step: parallelism, precision, parameters, batch, steps, data counts."""
    import lora

    n_train, n_total = lora.count_parameters(model)
    parallel = (f"FSDP2 over {world} ranks ({'nccl' if device.type == 'cuda' else 'gloo'})" if world > 1
                else f"single process on {device}")
    rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    unit = f"packed rows of {cfg.max_seq_length} tokens" if cfg.packing else "examples (padded to the longest)"
    mts = cfg.use_lora and cfg.lora_modules_to_save
    log(f"{parallel}; precision {dtype}; {'LoRA' if cfg.use_lora else 'full fine-tuning'}: {n_train:,} trainable of "
        f"{n_total:,} parameters" + (f" (adapters + modules_to_save {' '.join(cfg.lora_modules_to_save)})" if mts else ""))
    log(f"optimizer step = {cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} accum x {world} "
        f"ranks = {rows} {unit}" + (f" = {rows * cfg.max_seq_length:,} tokens per optimizer step" if cfg.packing else
                                    f" (at most {rows * cfg.max_seq_length:,} tokens per optimizer step)"))
    log(f"{data.total_steps} optimizer steps ({data.updates_per_epoch} per epoch; epochs end at steps "
        f"{data.epoch_end_steps[:8]}); warmup {warmup}; data cache {data.cache_root}")
    report = Path(data.cache_root) / "report.json"
    if report.is_file():
        import data

        log("data: " + data.report_counts(json.loads(report.read_text())))


class StopFlag:
    """SIGTERM / Ctrl-C: said at once; the loop finishes the current step or evaluation batch, saves and exits. A
    second Ctrl-C stops at once without saving (KeyboardInterrupt: one line from cli.run_main, exit status 130)."""

    MESSAGE = "stopping: finishing the current batch, then saving; press Ctrl-C again to stop without saving"

    def __init__(self, say: bool = True):
        self.raised = False
        self.say = say
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True
        if self.say:  # os.write: safe inside a signal handler, even in the middle of a print
            os.write(2, f"\n[{time.strftime('%H:%M:%S')}] {self.MESSAGE}\n".encode())

    def agreed(self, device) -> bool:
        """True on every rank when any rank got a signal (a collective under torch.distributed)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)
