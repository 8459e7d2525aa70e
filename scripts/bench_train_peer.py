"""Peer runner for scripts/bench_train.py, run with bench/.venv-peers/bin/python (never a project
dependency): transformers `Trainer` + `DataCollatorForSeq2Seq` padding (--mode lora|full), or TRL
`SFTTrainer` on the same pre-tokenized examples (--mode lora:trl|full:trl). Prints one JSON line with
real (non-pad) tokens/s measured after the warm-up steps."""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    for k, t in (("model", str), ("examples", str), ("mode", str), ("steps", int), ("batch", int),
                 ("warmup", int), ("threads", int), ("seq", int)):
        ap.add_argument(f"--{k}", type=t, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    mode, _, peer = a.mode.partition(":")
    rows = [json.loads(x) for x in open(a.examples)][: a.steps * a.batch]
    rows = [{"input_ids": r["input_ids"][: a.seq], "labels": r["labels"][: a.seq]} for r in rows]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    class Clock(TrainerCallback):  # time only the steps after the warm-up
        t0, last_loss = None, float("nan")

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == a.warmup:
                Clock.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                Clock.last_loss = logs["loss"]

    collated: list[int] = []  # real tokens of each batch, in the order the Trainer drew them (it shuffles)

    def counting(collate):
        def wrapped(features):
            batch = collate(features)
            am = batch.get("attention_mask")
            collated.append(int(am.sum()) if am is not None else sum(len(f["input_ids"]) for f in features))
            return batch
        return wrapped
    common = dict(output_dir="/tmp/mathsft-peer", per_device_train_batch_size=a.batch, max_steps=a.steps,
                  learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                  report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
                  disable_tqdm=True)
    if peer == "trl":
        from trl import SFTConfig, SFTTrainer
        ds = Dataset.from_list([{"input_ids": r["input_ids"],
                                 "completion_mask": [int(x != -100) for x in r["labels"]]} for r in rows])
        cfg = SFTConfig(**common, max_length=a.seq, completion_only_loss=True, packing=False)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                             peft_config=lora if mode == "lora" else None, callbacks=[Clock()])
        trainer.data_collator = counting(trainer.data_collator)
    else:
        if mode == "lora":
            model = get_peft_model(model, lora)
        ds = Dataset.from_list(rows)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=ds,
                          data_collator=counting(DataCollatorForSeq2Seq(tok, padding="longest")), callbacks=[Clock()])
    trainer.train()
    secs = time.perf_counter() - Clock.t0
    if len(collated) != a.steps:
        raise SystemExit(f"expected {a.steps} collated batches, saw {len(collated)}")
    real = sum(collated[a.warmup:])  # the batches of the timed steps (the Trainer shuffles the examples)
    print(json.dumps({"tok_s": real / secs, "loss": Clock.last_loss, "steps": a.steps - a.warmup}))


if __name__ == "__main__":
    main()
