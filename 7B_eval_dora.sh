#!/bin/bash
# Evaluate a checkpoint on the seven benchmarks of the paper's table, in the seed's order:
# VQAv2, GQA, VizWiz, ScienceQA, TextVQA, POPE, MMBench.
#
#   CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 bash 7B_eval_dora.sh CKPT CKPT_PATH EVALPATH RESULTPATH BASEPATH
#
#   CKPT        a name for the checkpoint (the row of the table), e.g. llava-v1.5-7b-dora-release
#   CKPT_PATH   its folder: a DoRA/LoRA adapter (with MODEL_BASE), a projector-only folder, or a full model
#   EVALPATH    the evaluation data (./playground/data/eval layout); nothing is written there
#   RESULTPATH  where every output goes: answers, uploads, scores, RESULTPATH/CKPT/results.json
#   BASEPATH    this repository's root
#
# Environment: MODEL_BASE (lmsys/vicuna-7b-v1.5, or a local folder), CONV_MODE (vicuna_v1),
# BATCH_SIZE (16), DORA_MAGNITUDES (trained: the magnitudes training produced; weight_norm:
# m = ||W0|| for every DoRA layer, as the seed's loader evaluated the paper's published DoRA row),
# MMBENCH_ALL_ROUNDS (0: each TSV row asked once, as the seed: the MMBench TSV already holds every
# question's circular copies, from which CircularEval, the paper's metric, is scored; 1: each row also
# in every rotation of its options, for a TSV without the copies), FRESH (1: move the row's answers
# and results.json aside and answer again; without it a rerun skips the questions already answered, and
# answers or a row made by another checkpoint or magnitude mode stop the run), MM_PROJECTOR (a projector file
# to use instead of the checkpoint's), PYTHON (.venv/bin/python when present). One answers chunk
# runs per visible GPU. Benchmarks whose data is absent are skipped.
set -uo pipefail

if [ $# -ne 5 ]; then
  echo "usage: bash 7B_eval_dora.sh CKPT CKPT_PATH EVALPATH RESULTPATH BASEPATH" >&2
  exit 2
fi
CKPT=$1
CKPT_PATH=$2
EVALPATH=$3
RESULTPATH=$4
BASEPATH=$5
cd "$BASEPATH" || { echo "BASEPATH $BASEPATH does not exist" >&2; exit 2; }
[ -e "$CKPT_PATH" ] || { echo "CKPT_PATH $CKPT_PATH does not exist" >&2; exit 2; }
[ -d "$CKPT_PATH" ] && [ ! -f "$CKPT_PATH/config.json" ] && {
  echo "CKPT_PATH $CKPT_PATH has no config.json: give a checkpoint folder as training writes it (see README.md)" >&2; exit 2; }
[ -d "$EVALPATH" ] || { echo "EVALPATH $EVALPATH is not a folder: give the evaluation data (see README.md, Evaluation data)" >&2; exit 2; }

MODEL_BASE=${MODEL_BASE-lmsys/vicuna-7b-v1.5}
CONV_MODE=${CONV_MODE:-vicuna_v1}
BATCH_SIZE=${BATCH_SIZE:-16}
MMBENCH_ALL_ROUNDS=${MMBENCH_ALL_ROUNDS:-0}
DORA_MAGNITUDES=${DORA_MAGNITUDES:-trained}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
case "$DORA_MAGNITUDES" in
  trained|weight_norm) ;;
  *) echo "DORA_MAGNITUDES must be trained or weight_norm, not '$DORA_MAGNITUDES'" >&2; exit 2 ;;
esac
IFS=',' read -ra GPULIST <<< "${CUDA_VISIBLE_DEVICES:-}"
CHUNKS=${#GPULIST[@]}
[ "$CHUNKS" -ge 1 ] || { CHUNKS=1; GPULIST=(""); }

# A folder without full weights (an adapter, or a projector alone) is loaded on top of MODEL_BASE.
MODEL_ARGS=(--model-path "$CKPT_PATH")
BASE_ARG=""
if ! compgen -G "$CKPT_PATH/model*.safetensors" >/dev/null && ! compgen -G "$CKPT_PATH/pytorch_model*.bin" >/dev/null; then
  [ -n "$MODEL_BASE" ] || { echo "$CKPT_PATH holds no full weights: set MODEL_BASE" >&2; exit 2; }
  MODEL_ARGS+=(--model-base "$MODEL_BASE")
  BASE_ARG=$MODEL_BASE
fi
GEN_ARGS=(--temperature 0 --conv-mode "$CONV_MODE" --batch-size "$BATCH_SIZE" --dora-magnitudes "$DORA_MAGNITUDES")
[ "${FRESH:-0}" = 1 ] && GEN_ARGS+=(--fresh)
[ -n "${MM_PROJECTOR:-}" ] && GEN_ARGS+=(--mm-projector "$MM_PROJECTOR")

failed=()
# The row (RESULTPATH/CKPT/results.json) holds one model's scores: the checkpoint's fingerprint (the one its
# answers record) and, for DoRA, the magnitude mode. A row made by another model is refused before anything
# is answered (FRESH=1 moves it aside instead).
CHECKPOINT_ID=$("$PYTHON" -c "import sys; from llava.checkpoint_kind import checkpoint_fingerprint as f
print(f(*[a or None for a in sys.argv[1:]]))" "$CKPT_PATH" "$BASE_ARG" "${MM_PROJECTOR:-}") || exit 2
SUMMARY=(--write "$RESULTPATH/$CKPT" --method "$CKPT" --checkpoint "$CHECKPOINT_ID"
         --model-path "$(cd "$CKPT_PATH" 2>/dev/null && pwd || echo "$CKPT_PATH")")
ROW_CHECK=(--check-row "$RESULTPATH/$CKPT" --checkpoint "$CHECKPOINT_ID")
[ "${FRESH:-0}" = 1 ] && ROW_CHECK+=(--fresh)
KIND=$("$PYTHON" -c "import sys; from llava.checkpoint_kind import adapter_kind; print(adapter_kind(sys.argv[1]) or 'model')" "$CKPT_PATH") || exit 2
if [ "$KIND" = dora ]; then
  SUMMARY+=(--dora-magnitudes "$DORA_MAGNITUDES")
  ROW_CHECK+=(--dora-magnitudes "$DORA_MAGNITUDES")
  echo "== DoRA checkpoint, magnitudes: $DORA_MAGNITUDES"
elif [ "$DORA_MAGNITUDES" != trained ]; then
  echo "== $CKPT_PATH is not a DoRA adapter: DORA_MAGNITUDES=$DORA_MAGNITUDES has no effect"
fi
"$PYTHON" -m llava.eval.summarize "${ROW_CHECK[@]}" || exit 2
if [ -f "$CKPT_PATH/trainable_parameters.json" ]; then
  SUMMARY+=(--params-percent "$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['percent'])" "$CKPT_PATH/trainable_parameters.json")")
fi
ROW_FIELDS=${#SUMMARY[@]}

have() {  # have NAME PATH...: true when every input exists, else a line saying what is missing
  local name=$1 missing=()
  shift
  for path in "$@"; do [ -e "$path" ] || missing+=("$path"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== $name: skipped, missing ${missing[*]} (see README.md, Evaluation data)"
    return 1
  fi
  echo "== $name"
}

generate() {  # generate MODULE ANSWERS_DIR ARGS...: one chunk per GPU, then merge.jsonl in chunk order
  local module=$1 dir=$2 idx pids=() rc=0
  shift 2
  mkdir -p "$dir"
  for idx in $(seq 0 $((CHUNKS - 1))); do
    CUDA_VISIBLE_DEVICES=${GPULIST[$idx]} "$PYTHON" -m "$module" "${MODEL_ARGS[@]}" "${GEN_ARGS[@]}" "$@" \
      --answers-file "$dir/${CHUNKS}_${idx}.jsonl" --num-chunks "$CHUNKS" --chunk-idx "$idx" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  [ $rc -eq 0 ] || return 1
  : > "$dir/merge.jsonl.tmp"
  for idx in $(seq 0 $((CHUNKS - 1))); do cat "$dir/${CHUNKS}_${idx}.jsonl" >> "$dir/merge.jsonl.tmp"; done
  mv "$dir/merge.jsonl.tmp" "$dir/merge.jsonl"
}

run() {  # run NAME COMMAND...: a benchmark's steps; a failure is reported and the next benchmark runs
  local name=$1
  shift
  "$@" || { echo "== $name: FAILED (see the lines above)"; failed+=("$name"); }
}

vqav2() {
  local split=llava_vqav2_mscoco_test-dev2015 dir="$RESULTPATH/vqav2"
  local answers="$dir/answers/$split/$CKPT" upload="$dir/answers_upload/$split/$CKPT.json"
  generate llava.eval.model_vqa_loader "$answers" --question-file "$EVALPATH/vqav2/$split.jsonl" \
    --image-folder "$EVALPATH/vqav2/test2015" || return 1
  "$PYTHON" scripts/convert_vqav2_for_submission.py --answers-file "$answers/merge.jsonl" \
    --question-file "$EVALPATH/vqav2/$split.jsonl" \
    --test-split-file "$EVALPATH/vqav2/llava_vqav2_mscoco_test2015.jsonl" --output-file "$upload" || return 1
  SUMMARY+=(--upload "vqav2=$upload")
  if [ -f "$EVALPATH/vqav2/annotations.json" ]; then
    "$PYTHON" -m llava.eval.eval_vqa --annotation-file "$EVALPATH/vqav2/annotations.json" --upload-file "$upload" \
      --question-file "$EVALPATH/vqav2/$split.jsonl" --metrics-json "$dir/$CKPT.metrics.json" || return 1
    SUMMARY+=(--metrics "vqav2=$dir/$CKPT.metrics.json")
  fi
}

gqa() {
  local split=llava_gqa_testdev_balanced dir="$RESULTPATH/gqa"
  local answers="$dir/answers/$split/$CKPT" predictions="$dir/$CKPT/testdev_balanced_predictions.json"
  generate llava.eval.model_vqa_loader "$answers" --question-file "$EVALPATH/gqa/$split.jsonl" \
    --image-folder "$EVALPATH/gqa/data/images" || return 1
  mkdir -p "$dir/$CKPT"
  "$PYTHON" scripts/convert_gqa_for_eval.py --src "$answers/merge.jsonl" --dst "$predictions" || return 1
  if [ -f "$EVALPATH/gqa/data/testdev_balanced_questions.json" ]; then
    local official=()
    [ -f "$EVALPATH/gqa/data/eval/eval.py" ] && official=(--official-dir "$EVALPATH/gqa/data")
    "$PYTHON" -m llava.eval.eval_gqa --questions "$EVALPATH/gqa/data/testdev_balanced_questions.json" \
      --predictions "$predictions" "${official[@]}" --metrics-json "$dir/$CKPT.metrics.json" || return 1
    SUMMARY+=(--metrics "gqa=$dir/$CKPT.metrics.json")
  else
    echo "GQA: no testdev_balanced_questions.json; predictions are in $predictions"
  fi
}

vizwiz() {
  local split=llava_test dir="$RESULTPATH/vizwiz"
  local answers="$dir/answers/$split/$CKPT" upload="$dir/answers_upload/$CKPT.json"
  generate llava.eval.model_vqa_loader "$answers" --question-file "$EVALPATH/vizwiz/$split.jsonl" \
    --image-folder "$EVALPATH/vizwiz/test" || return 1
  "$PYTHON" scripts/convert_vizwiz_for_submission.py --annotation-file "$EVALPATH/vizwiz/$split.jsonl" \
    --result-file "$answers/merge.jsonl" --result-upload-file "$upload" || return 1
  SUMMARY+=(--upload "vizwiz=$upload")
  if [ -f "$EVALPATH/vizwiz/annotations.json" ]; then
    "$PYTHON" -m llava.eval.eval_vqa --annotation-file "$EVALPATH/vizwiz/annotations.json" --upload-file "$upload" \
      --metrics-json "$dir/$CKPT.metrics.json" || return 1
    SUMMARY+=(--metrics "vizwiz=$dir/$CKPT.metrics.json")
  fi
}

scienceqa() {
  local dir="$RESULTPATH/scienceqa" answers="$RESULTPATH/scienceqa/answers/$CKPT"
  generate llava.eval.model_vqa_science "$answers" --question-file "$EVALPATH/scienceqa/llava_test_CQM-A.json" \
    --image-folder "$EVALPATH/scienceqa/images/test" --single-pred-prompt || return 1
  "$PYTHON" -m llava.eval.eval_science_qa --base-dir "$EVALPATH/scienceqa" --result-file "$answers/merge.jsonl" \
    --output-file "$dir/${CKPT}_output.jsonl" --output-result "$dir/${CKPT}_result.json" \
    --metrics-json "$dir/$CKPT.metrics.json" || return 1
  SUMMARY+=(--metrics "sqa=$dir/$CKPT.metrics.json")
}

textvqa() {
  local dir="$RESULTPATH/textvqa" answers="$RESULTPATH/textvqa/answers/$CKPT"
  generate llava.eval.model_vqa_loader "$answers" --question-file "$EVALPATH/textvqa/llava_textvqa_val_v051_ocr.jsonl" \
    --image-folder "$EVALPATH/textvqa/train_images" || return 1
  "$PYTHON" -m llava.eval.eval_textvqa --annotation-file "$EVALPATH/textvqa/TextVQA_0.5.1_val.json" \
    --result-file "$answers/merge.jsonl" --metrics-json "$dir/$CKPT.metrics.json" || return 1
  SUMMARY+=(--metrics "textvqa=$dir/$CKPT.metrics.json")
}

pope() {
  local dir="$RESULTPATH/pope" answers="$RESULTPATH/pope/answers/$CKPT"
  generate llava.eval.model_vqa_loader "$answers" --question-file "$EVALPATH/pope/llava_pope_test.jsonl" \
    --image-folder "$EVALPATH/pope/val2014" || return 1
  "$PYTHON" -m llava.eval.eval_pope --annotation-dir "$EVALPATH/pope/coco" \
    --question-file "$EVALPATH/pope/llava_pope_test.jsonl" --result-file "$answers/merge.jsonl" \
    --metrics-json "$dir/$CKPT.metrics.json" || return 1
  SUMMARY+=(--metrics "pope=$dir/$CKPT.metrics.json")
}

mmbench() {
  local split=mmbench_dev_20230712 dir="$RESULTPATH/mmbench" rounds=()
  local answers="$RESULTPATH/mmbench/answers/$split/$CKPT"
  [ "$MMBENCH_ALL_ROUNDS" = 1 ] && rounds=(--all-rounds)
  generate llava.eval.model_vqa_mmbench "$answers" --question-file "$EVALPATH/mmbench/$split.tsv" \
    --single-pred-prompt --lang en "${rounds[@]}" || return 1
  cp "$answers/merge.jsonl" "$answers/$CKPT.jsonl"
  "$PYTHON" scripts/convert_mmbench_for_submission.py --annotation-file "$EVALPATH/mmbench/$split.tsv" \
    --result-dir "$answers" --upload-dir "$dir/answers_upload/$split" --experiment "$CKPT" || return 1
  SUMMARY+=(--upload "mmbench=$dir/answers_upload/$split/$CKPT.xlsx")
  "$PYTHON" -m llava.eval.eval_mmbench --annotation-file "$EVALPATH/mmbench/$split.tsv" \
    --result-file "$answers/merge.jsonl" --metrics-json "$dir/$CKPT.metrics.json" || return 1
  SUMMARY+=(--metrics "mmbench=$dir/$CKPT.metrics.json")
}

have VQAv2 "$EVALPATH/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl" "$EVALPATH/vqav2/test2015" && run VQAv2 vqav2
have GQA "$EVALPATH/gqa/llava_gqa_testdev_balanced.jsonl" "$EVALPATH/gqa/data/images" && run GQA gqa
have VizWiz "$EVALPATH/vizwiz/llava_test.jsonl" "$EVALPATH/vizwiz/test" && run VizWiz vizwiz
have ScienceQA "$EVALPATH/scienceqa/llava_test_CQM-A.json" "$EVALPATH/scienceqa/images/test" \
  "$EVALPATH/scienceqa/problems.json" "$EVALPATH/scienceqa/pid_splits.json" && run ScienceQA scienceqa
have TextVQA "$EVALPATH/textvqa/llava_textvqa_val_v051_ocr.jsonl" "$EVALPATH/textvqa/train_images" \
  "$EVALPATH/textvqa/TextVQA_0.5.1_val.json" && run TextVQA textvqa
have POPE "$EVALPATH/pope/llava_pope_test.jsonl" "$EVALPATH/pope/val2014" "$EVALPATH/pope/coco" && run POPE pope
have MMBench "$EVALPATH/mmbench/mmbench_dev_20230712.tsv" && run MMBench mmbench

# Only a run that produced a benchmark's result writes the row: a run refused for every benchmark
# leaves no results.json that would then stand in the way.
if [ ${#SUMMARY[@]} -gt "$ROW_FIELDS" ]; then
  "$PYTHON" -m llava.eval.summarize "${SUMMARY[@]}" || failed+=(results.json)
fi
echo
compgen -G "$RESULTPATH/*/results.json" >/dev/null && "$PYTHON" -m llava.eval.summarize "$RESULTPATH"
if [ ${#failed[@]} -gt 0 ]; then
  echo "7B_eval_dora.sh: failed: ${failed[*]}" >&2
  exit 1
fi
