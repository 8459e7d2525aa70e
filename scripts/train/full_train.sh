#!/usr/bin/env bash
# Full fine-tuning with LESS's flag string (the LoRA flags are overridden: --lora False wins).
#   bash scripts/train/full_train.sh "train1.jsonl train2.jsonl" MODEL_PATH JOB_NAME [extra flags]
# Writes OUTPUT_ROOT/JOB_NAME (default outputs/checkpoints/JOB_NAME) with checkpoint-{step}/ folders in
# HF format; stdout and stderr are tee'd into $output_dir/train.log.
set -o pipefail
source "$(dirname "${BASH_SOURCE[0]}")/base_training_args.sh"

train_files=$1
model_path=$2
job_name=$3
shift 3

output_dir=${OUTPUT_ROOT:-outputs/checkpoints}/${job_name}
mkdir -p "$output_dir"

training_args="$base_training_args \
--lora False \
--model_name_or_path $model_path \
--output_dir $output_dir --log_file false \
--train_files ${train_files[@]} $*"

echo "$header $training_args"
eval "$header" "$training_args" 2>&1 | tee "$output_dir/train.log"
