#!/bin/bash
# DoRA visual instruction tuning of LLaVA-1.5-7B (the seed's hyperparameters and flags).
#
#   CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 bash ./Dora_7b.sh [extra training flags...]
#
# Paths and sizes come from the environment, with the seed's values as defaults:
#   MODEL_BASE      lmsys/vicuna-7b-v1.5 (a hub id or a local folder)
#   DATA_PATH       ./playground/data/llava_v1_5_mix665k.json
#   IMAGE_FOLDER    ./playground/data
#   VISION_TOWER    openai/clip-vit-large-patch14-336
#   PRETRAIN_MM     ./checkpoints/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin
#   OUTPUT_DIR      ./checkpoints/llava-v1.5-7b-dora
#   DS_CONFIG       ./scripts/zero3.json
#   NUM_GPUS        the number of devices in CUDA_VISIBLE_DEVICES, else 8
#   BATCH, GRAD_ACC per-device batch 4, gradient accumulation 4 (4 x 4 x 8 GPUs = 128)
#   PRECISION       "--bf16 True --tf32 True" (set it empty for float32, e.g. on a CPU)
#   LAUNCHER        deepspeed (or "python" for one process without DeepSpeed); MASTER_PORT 29500
#   SAVE_STEPS      a checkpoint every 250 optimizer steps (the seed's 50000 never wrote one in its
#                   5.2k-step epoch); SAVE_TOTAL_LIMIT 2: the last two are kept. Rerunning the same
#                   command resumes from the newest complete checkpoint.
# Extra arguments are passed to the training module and override the flags below.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

MODEL_BASE=${MODEL_BASE:-lmsys/vicuna-7b-v1.5}
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
PRETRAIN_MM=${PRETRAIN_MM:-./checkpoints/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-dora}
DS_CONFIG=${DS_CONFIG:-./scripts/zero3.json}
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  DEFAULT_GPUS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
else
  DEFAULT_GPUS=8
fi
NUM_GPUS=${NUM_GPUS:-$DEFAULT_GPUS}
BATCH=${BATCH:-4}
GRAD_ACC=${GRAD_ACC:-4}
SAVE_STEPS=${SAVE_STEPS:-250}
SAVE_TOTAL_LIMIT=${SAVE_TOTAL_LIMIT:-2}
PRECISION=${PRECISION---bf16 True --tf32 True}
LAUNCHER=${LAUNCHER:-deepspeed}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
DEEPSPEED=${DEEPSPEED:-$( [ -x .venv/bin/deepspeed ] && echo .venv/bin/deepspeed || echo deepspeed )}

# Check every input before launching 8 processes that would fail one by one.
missing=0
need() {  # need PATH WHAT WHERE
  if [ ! -e "$1" ]; then
    echo "missing: $2 at $1"
    echo "         $3"
    missing=1
  fi
}
SETUP="README.md, 'Reproducing the paper' > 'Setup and downloads'"
# A hub id is exactly org/name; anything else (no slash, two or more, a leading . / ~) is a local path,
# which must exist: transformers would take it for a hub id and fail only after loading the language model.
hub_or_local() {  # hub_or_local VALUE WHAT VARIABLE EXAMPLE
  [ -e "$1" ] && return
  case "$1" in
    .*|/*|'~'*|*/*/*) ;;
    ?*/?*) echo "note: $2 '$1' is not a local folder: it will be loaded from the Hugging Face hub (cache)"; return;;
  esac
  need "$1" "$2" "a local path (read from the repository root; a hub id is exactly org/name): fix it, or set $3 to a hub id such as $4"
}
need "$DATA_PATH" "the instruction-tuning annotations" \
  "download llava_v1_5_mix665k.json ($SETUP) or set DATA_PATH"
need "$IMAGE_FOLDER" "the image folder" "create ./playground/data with coco, gqa, ocr_vqa, textvqa, vg ($SETUP) or set IMAGE_FOLDER"
need "$PRETRAIN_MM" "the pretrained projector" \
  "download mm_projector.bin of liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5 into ./checkpoints/ ($SETUP) or set PRETRAIN_MM"
[ "$LAUNCHER" = "deepspeed" ] && need "$DS_CONFIG" "the DeepSpeed config" "use one of scripts/zero2.json, zero3.json, zero3_offload.json"
hub_or_local "$MODEL_BASE" "the base language model" MODEL_BASE lmsys/vicuna-7b-v1.5
hub_or_local "$VISION_TOWER" "the vision tower" VISION_TOWER openai/clip-vit-large-patch14-336
if [ "$missing" = 1 ]; then
  echo "Dora_7b.sh: inputs are missing (above); nothing was launched." >&2
  exit 2
fi

ARGS=(
  --lora_enable True --use_dora True --lora_r 128 --lora_alpha 256 --lora_dropout 0.05 --mm_projector_lr 2e-5
  --model_name_or_path "$MODEL_BASE"
  --version v1
  --data_path "$DATA_PATH"
  --image_folder "$IMAGE_FOLDER"
  --vision_tower "$VISION_TOWER"
  --pretrain_mm_mlp_adapter "$PRETRAIN_MM"
  --mm_projector_type mlp2x_gelu
  --mm_vision_select_layer -2
  --mm_use_im_start_end False
  --mm_use_im_patch_token False
  --image_aspect_ratio pad
  --group_by_modality_length True
  $PRECISION
  --output_dir "$OUTPUT_DIR"
  --num_train_epochs 1
  --per_device_train_batch_size "$BATCH"
  --per_device_eval_batch_size 4
  --gradient_accumulation_steps "$GRAD_ACC"
  --eval_strategy no
  --save_strategy steps
  --save_steps "$SAVE_STEPS"
  --save_total_limit "$SAVE_TOTAL_LIMIT"
  --learning_rate 2e-4
  --weight_decay 0.
  --warmup_ratio 0.03
  --lr_scheduler_type cosine
  --logging_steps 1
  --model_max_length 2048
  --gradient_checkpointing True
  --dataloader_num_workers 4
  --lazy_preprocess True
  --report_to "${REPORT_TO:-none}"
)

if [ "$LAUNCHER" = "deepspeed" ]; then
  # The seed's DeepSpeed did not clip gradients (its configs named no gradient_clipping, read as 0);
  # DeepSpeed 0.19 would clip at 1.0. The configs say "auto", which takes this value.
  exec "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" llava/train/train_mem.py --deepspeed "$DS_CONFIG" \
    "${ARGS[@]}" --max_grad_norm 0 "$@"
else
  exec "$PYTHON" -m llava.train.train_mem "${ARGS[@]}" "$@"
fi
