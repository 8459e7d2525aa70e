#!/usr/bin/env bash
# Drop-in for LESS's less/scripts/train/base_training_args.sh: same variable names (`header`,
# `base_training_args`), same flag string; `header` launches mathsft's sft.py through torchrun.
# sft.py detects the LESS flags (--do_train / --lora) and translates them (see docs/checkpoints.md).
# NPROC_PER_NODE (default 1, as in LESS) sets the number of processes.

ID=$RANDOM
MATHSFT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -x "$MATHSFT_DIR/.venv/bin/torchrun" ]; then TORCHRUN="$MATHSFT_DIR/.venv/bin/torchrun"; else TORCHRUN=torchrun; fi
export header="$TORCHRUN --nproc_per_node ${NPROC_PER_NODE:-1} --nnodes 1 --rdzv-id=$ID --rdzv_backend c10d $MATHSFT_DIR/sft.py"

export base_training_args="--do_train True \
--max_seq_length 2048 \
--use_fast_tokenizer True \
--lr_scheduler_type linear \
--warmup_ratio 0.03 \
--weight_decay 0.0 \
--evaluation_strategy no \
--logging_steps 1 \
--save_strategy no \
--num_train_epochs 4 \
--bf16 True \
--tf32 False \
--fp16 False \
--overwrite_output_dir True \
--report_to wandb \
--optim adamw_torch \
--seed 0 \
--percentage 1.0 \
--save_strategy epoch \
--lora True \
--lora_r 128 \
--lora_alpha 512 \
--lora_dropout 0.1 \
--lora_target_modules q_proj k_proj v_proj o_proj \
--learning_rate 2e-05 \
--per_device_train_batch_size 1 \
--gradient_accumulation_steps 32"
