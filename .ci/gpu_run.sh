#!/usr/bin/env bash
# One device run of the GPU checks, in priority order, within a time budget
# (development only; the project builds and tests without a GPU).
#
# Prepare here (CPU machine, project root), then one `device` run with carry
# [".gpu-check"]:
#   bash ../shared/gpu-check/prepare.sh && python3 .ci/gpu_check_compat.py
#   bash .ci/gpu_run.sh [BUDGET_SECONDS] [SECTIONS]   # on the GPU machine
#
# SECTIONS: the letters of the sections to run, in that order (default
# ABMDPCE: correctness, the issue's targets, then the diagnostics); each
# section is cut to what is left of the budget (default 560 s), so a second
# call with what the first did not reach (e.g. `bash .ci/gpu_run.sh 300 PCE`)
# finishes the set:
#   A  correctness, two processes at once: the Triton kernel tests compiled
#      for this GPU (tests/test_ops/test_triton_impl.py) and the kit's
#      layer/network/memory/amp checks against float64;
#   B  the kit's timing table (ResNet-50 / CE-ResNet-50 / plain transcription);
#      if CE fails there, once more with CE_MMDET_IMPL=torch;
#   M  the tiny-COCO detectors side by side in one process
#      (benchmark_detector.py: CE Mask R-CNN / RetinaNet against mmdet's,
#      one batch of 2 at 1067x800, --amp, alternating, paired ratios);
#   P  the Triton passes over the feature map against a copy of the same
#      bytes (benchmark_triton_passes.py), at 2x800x1216 with a sweep of
#      the launch configurations' neighbours, at 32x224x224 without;
#   C  the kit's profile of two CE-ResNet-50 training steps;
#   D  tiny-COCO detectors, CE next to BN, train --amp (median step time
#      without data time, iterations 11-30), then a test pass of one;
#   E  benchmark_backbone.py --device cuda --impls torch triton (op counts),
#      at 2x800x1216 and at 2x64x64 (host-bound: what launches cost).
# Logs and JSON go to $OUT (default /tmp/out).
set -u
budget=${1:-560}
sections=${2:-ABMDPCE}
top=$(pwd); kit=$top/.gpu-check
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site "$kit"/whl/*.whl || exit 1
cp "$kit"/mmcv_ext_stub.py /tmp/site/mmcv/_ext.py
export PYTHONPATH=/tmp/site:$top
t0=$(date +%s)
left() {  # seconds for a step: min(cap, what is left of the budget)
  local l=$(( budget - ($(date +%s) - t0) )); [ "$l" -gt "$1" ] && l=$1
  [ "$l" -lt 5 ] && l=5; echo "$l"; }
stamp() { echo "== $1 at $(( $(date +%s) - t0 ))s"; }
quiet() { grep -v "Warning\|warnings.warn\|pkg_resources\|_bootstrap\|INFO\|^ *$"; }
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader

section_A() {
stamp "A correctness (Triton tests on the GPU | kit check)"
timeout "$(left 170)" python3 -m pytest -q -p no:cacheprovider -o timeout=90 \
  tests/test_ops/test_triton_impl.py > "$OUT/triton_tests.log" 2>&1 &
timeout "$(left 170)" python3 "$kit"/gpu_check.py layer network memory amp \
  > "$OUT/check.log" 2>&1
wait
grep -E "passed|failed|error" "$OUT/triton_tests.log" | tail -3
grep -E "^FAILED|^E  " "$OUT/triton_tests.log" | head -12 | cut -c1-240
quiet < "$OUT/check.log" | cut -c1-400
}

section_B() {
stamp "B timing"
timeout "$(left 200)" python3 "$kit"/gpu_check.py timing > "$OUT/timing.log" 2>&1
quiet < "$OUT/timing.log" | cut -c1-400
if grep -q timing_error "$OUT/timing.log"; then
  stamp "B' timing with CE_MMDET_IMPL=torch"
  CE_MMDET_IMPL=torch timeout "$(left 150)" python3 "$kit"/gpu_check.py timing \
    > "$OUT/timing_torch.log" 2>&1
  quiet < "$OUT/timing_torch.log" | cut -c1-400
fi
}

section_P() {
stamp "P passes"
timeout "$(left 80)" python3 tools/analysis_tools/benchmark_triton_passes.py \
  --shape 800 1216 --batch-size 2 --sweep --budget 45 \
  --json "$OUT/passes.json" > "$OUT/passes.log" 2>&1
cut -c1-160 < "$OUT/passes.log" | grep -v Warning
timeout "$(left 30)" python3 tools/analysis_tools/benchmark_triton_passes.py \
  --shape 224 224 --batch-size 32 --json "$OUT/passes_224.json" \
  > "$OUT/passes_224.log" 2>&1
cut -c1-160 < "$OUT/passes_224.log" | grep -v Warning
}

section_M() {
stamp "M detectors side by side"
for p in ce_mask_rcnn/mask-rcnn ce_retinanet/retinanet; do
  n=$(basename "$p")
  timeout "$(left 75)" python3 tools/analysis_tools/benchmark_detector.py \
    "configs/${p}_r50_fpn_1x_coco.py" "configs/${p}_r50-ce_fpn_1x_coco.py" \
    --device cuda --amp --scale 1333 800 --repeats 10 --warmup 3 \
    --json "$OUT/detector_$n.json" > "$OUT/detector_$n.log" 2>&1
  echo "$n rc=$?"; grep -v -i "warn" "$OUT/detector_$n.log" | tail -17 | cut -c1-200
done
}

section_C() {
stamp "C profile"
timeout "$(left 70)" python3 "$kit"/gpu_check.py profile > "$OUT/profile.log" 2>&1
quiet < "$OUT/profile.log" | head -42 | cut -c1-220
}

section_D() {
stamp "D detectors"
for cfg in configs/ce_mask_rcnn/mask-rcnn_r50-ce_fpn_1x_coco.py \
           configs/ce_mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py \
           configs/ce_retinanet/retinanet_r50-ce_fpn_1x_coco.py \
           configs/ce_retinanet/retinanet_r50_fpn_1x_coco.py; do
  n=$(basename "$cfg" .py)
  python3 tools/misc/make_tiny_config.py "$cfg" /tmp/$n.py --scale 1216 800 \
    --max-iters 30 > /dev/null 2>&1
  timeout "$(left 90)" python3 tools/train.py /tmp/$n.py --work-dir /tmp/$n --amp \
    --cfg-options train_dataloader.num_workers=4 \
    train_dataloader.persistent_workers=True > "$OUT/$n.train.log" 2>&1
  rc=$?
  med=$(python3 - "$OUT/$n.train.log" <<'PY'
import re, statistics, sys
t = [float(m.group(2)) - float(m.group(3)) for m in re.finditer(
    r'Iter\(train\) \[ *(\d+)/\d+\].*? time: ([0-9.]+)  data_time: ([0-9.]+)',
    open(sys.argv[1]).read()) if int(m.group(1)) > 10]
print(f'{statistics.median(t):.4f}' if t else 'n/a')
PY
)
  echo "$n train rc=$rc median s/iter without data time (iters 11-30, --amp): $med"
  [ "$rc" = 0 ] || tail -4 "$OUT/$n.train.log" | cut -c1-300
done
n=mask-rcnn_r50-ce_fpn_1x_coco
if [ -f /tmp/$n/last_checkpoint ]; then
  timeout "$(left 80)" python3 tools/test.py /tmp/$n.py "$(cat /tmp/$n/last_checkpoint)" \
    --work-dir /tmp/$n > "$OUT/$n.test.log" 2>&1
  echo "$n test rc=$?"; grep -E "mAP_copypaste|Error" "$OUT/$n.test.log" | tail -2 | cut -c1-200
fi
}

section_E() {
stamp "E benchmark_backbone"
timeout "$(left 120)" python3 tools/analysis_tools/benchmark_backbone.py --device cuda \
  --shape 800 1216 --batch-size 2 --repeats 10 --warmup 3 --no-rss \
  --impls torch triton --json "$OUT/benchmark_backbone.json" > "$OUT/bench.log" 2>&1
tail -14 "$OUT/bench.log" | cut -c1-220
# the host-bound regime: a tiny input, where the GPU waits for the launches
timeout "$(left 60)" python3 tools/analysis_tools/benchmark_backbone.py --device cuda \
  --shape 64 64 --batch-size 2 --repeats 20 --warmup 5 --no-rss \
  --impls torch triton --json "$OUT/benchmark_backbone_64.json" > "$OUT/bench64.log" 2>&1
grep -E "train step|inference \(" "$OUT/bench64.log" | cut -c1-220
}

for letter in $(echo "$sections" | grep -o .); do
  if declare -F "section_$letter" > /dev/null; then
    "section_$letter"
  else
    echo "== no section $letter (sections: A B M P C D E)"
  fi
done
stamp done
