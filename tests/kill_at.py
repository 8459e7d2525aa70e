"""Test seam: run `sft.py` in this process and SIGKILL it at a chosen point, from outside the product code.

    python tests/kill_at.py STEP[:during_save] SFT_FLAGS...

STEP: right after optimizer step STEP has logged its metrics (before any evaluation or save of that step).
STEP:during_save: while checkpoint STEP is being written (every file in its .tmp- folder, no manifest yet).
Wraps runlog.RunLog.metrics and checkpoint.commit; nothing else changes.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint  # noqa: E402
import runlog  # noqa: E402
import sft  # noqa: E402


def main() -> None:
    at, _, where = sys.argv[1].partition(":")
    step = int(at)
    if where == "during_save":
        commit = checkpoint.commit

        def dying_commit(job_dir, tmp, name, *rest):
            if name == checkpoint.checkpoint_name(step) or name == checkpoint.checkpoint_name(step, True):
                os.kill(os.getpid(), signal.SIGKILL)
            return commit(job_dir, tmp, name, *rest)

        checkpoint.commit = dying_commit
    else:
        metrics = runlog.RunLog.metrics

        def dying_metrics(self, record):
            metrics(self, record)
            if record.get("step") == step and "loss" in record:
                os.kill(os.getpid(), signal.SIGKILL)

        runlog.RunLog.metrics = dying_metrics
    sft.main(sys.argv[2:])


if __name__ == "__main__":
    main()
