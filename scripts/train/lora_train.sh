#!/usr/bin/env bash
# Like LESS's less/scripts/train/lora_train.sh: LoRA training on (selected) data with LESS's flags.
#   bash scripts/train/lora_train.sh "train1.jsonl train2.jsonl" MODEL_PATH JOB_NAME
# Writes OUTPUT_ROOT/JOB_NAME (default outputs/checkpoints/JOB_NAME) with checkpoint-{step}/ folders
# that LESS's get_info reads (adapter, tokenizer files, name-keyed optimizer.bin); stdout and stderr
# are tee'd into $output_dir/train.log (sft.py runs with --log_file false). Extra flags after the three arguments are appended (last wins).
set -o pipefail
source "$(dirname "${BASH_SOURCE[0]}")/base_training_args.sh"

train_files=$1
model_path=$2
job_name=$3
shift 3

output_dir=${OUTPUT_ROOT:-outputs/checkpoints}/${job_name}
mkdir -p "$output_dir"

# LESS adds FSDP flags for these model ids; here FSDP2 is used whenever there is more than one process,
# so the flags are accepted and listed as without effect.
if [[ $model_path == "meta-llama/Llama-2-13b-hf" ]]; then
    base_training_args="$base_training_args --fsdp 'full_shard auto_wrap' --fsdp_config llama2_13b_finetune"
elif [[ $model_path == "mistralai/Mistral-7B-v0.1" ]]; then
    base_training_args="$base_training_args --fsdp 'full_shard auto_wrap' --fsdp_config mistral_7b_finetune"
fi

training_args="$base_training_args \
--model_name_or_path $model_path \
--output_dir $output_dir --log_file false \
--train_files ${train_files[@]} $*"

echo "$header $training_args"
eval "$header" "$training_args" 2>&1 | tee "$output_dir/train.log"
