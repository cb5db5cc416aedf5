#!/usr/bin/env bash
# The GPU checks of ../shared/gpu-checks.md, in one script that finishes in about 10 minutes on one
# H200-class GPU and writes every figure to one file (FIGURES, default benchmarks/gpu_checks.out.jsonl;
# $OUT/gpu_checks.jsonl when OUT is set).
#
#   bash benchmarks/gpu_checks.sh [all|stages|sft|generate|megatron]
#
# It runs with the machine's python3 (torch with CUDA must already be there) and never installs torch.
# Packages the machine lacks (trl, datasets, omegaconf, rouge-score, megatron-core 0.19, ...) come as
# Python 3.12 wheels in .whl/ (download them with the pip command in README's "Verified on a GPU");
# they are installed into /tmp/site and put on PYTHONPATH.
#   1 stages    the HF engine on CUDA in bf16: data, sft, rm, rl (RLOO), dpo, eval on the tiny model and
#               the bundled sample, a few steps each: pass/fail and wall time per stage
#   2 sft       SFT throughput of a ~1.2B random Llama at seq 4096, bf16, sdpa, packed vs unpacked; MFU
#               against the datasheet's 989 TFLOP/s and a measured 8192^3 bf16 matmul
#   3 generate  eval generation (eval.engines.HFEngine): batched vs one at a time
#   4 megatron  megatron-core 0.19 GPTModel (local spec, no Transformer Engine), a few steps on our data
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
which="${1:-all}"
FIGURES="${FIGURES:-${OUT:+$OUT/gpu_checks.jsonl}}"
FIGURES="${FIGURES:-$ROOT/benchmarks/gpu_checks.out.jsonl}"
LOG="${FIGURES%.jsonl}.log"
: > "$FIGURES"; : > "$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: could not install .whl/*.whl" >&2; exit 2; }
  export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

record() { echo "$1" | tee -a "$FIGURES"; }
record "$(python3 - <<'EOF'
import json, datetime, importlib.metadata as m, torch
versions = {}
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "megatron-core"):
    try:
        versions[name] = m.version(name)
    except m.PackageNotFoundError:
        versions[name] = None
print(json.dumps({"check": "machine", "date": datetime.date.today().isoformat(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "cuda": torch.version.cuda, "versions": versions}))
EOF
)"

# run NAME TIMEOUT CMD...: one check; its JSON lines go to FIGURES, everything to LOG.
run() {
  local name="$1" limit="$2"; shift 2
  local start end rc
  start=$(date +%s%N)
  echo "== $name: $*" >> "$LOG"
  timeout "$limit" "$@" > >(tee -a "$LOG" | grep '^{"' >> "$FIGURES") 2>> "$LOG"
  rc=$?
  end=$(date +%s%N)
  record "$(printf '{"check": "%s", "status": "%s", "exit": %d, "wall_s": %s}' \
    "$name" "$([[ $rc == 0 ]] && echo pass || echo FAIL)" "$rc" "$(awk -v ns=$((end - start)) 'BEGIN { printf "%.1f", ns / 1e9 }')")"
}

if [[ "$which" == all || "$which" == stages ]]; then
  RUN=/tmp/gpu-run; rm -rf "$RUN"
  common=(run_dir="$RUN" model=tiny model.dtype=bfloat16 train.bf16=true)
  run data 120 python3 -m recipes data run_dir="$RUN" model=tiny prep.source=data_prep/sample
  run sft 180 python3 -m recipes sft "${common[@]}" train.max_steps=8 train.save_steps=4
  run rm 180 python3 -m recipes rm "${common[@]}" train.max_steps=8 train.save_steps=4 train.eval_steps=4
  run rl 180 python3 -m recipes rl "${common[@]}" train.max_steps=4 train.save_steps=2 rl.max_new_tokens=32
  run dpo 180 python3 -m recipes dpo "${common[@]}" train.max_steps=4 train.save_steps=2
  run eval 180 python3 -m recipes eval run_dir="$RUN" model=tiny model.dtype=bfloat16 \
    eval.max_new_tokens=32 eval.bootstrap_samples=200
  for stage in sft rm rl dpo eval; do
    [[ -f "$RUN/$stage/summary.json" ]] && record "$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({'check': 'summary', **{k: d.get(k) for k in ('stage','metric','value','steps','wall_s')}}))" "$RUN/$stage/summary.json")"
  done
fi
if [[ "$which" == all || "$which" == sft ]]; then
  run matmul 60 python3 benchmarks/gpu_bench.py matmul
  run sft_packed 180 python3 benchmarks/gpu_bench.py sft --packing on
  run sft_unpacked 180 python3 benchmarks/gpu_bench.py sft --packing off
fi
[[ "$which" == all || "$which" == generate ]] && run generate 240 python3 benchmarks/gpu_bench.py generate
[[ "$which" == all || "$which" == megatron ]] && run megatron_core 120 python3 benchmarks/gpu_bench.py megatron

(python3 - "$FIGURES" <<'EOF'
import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        rows.append(json.loads(line))
    except ValueError:  # a library's own log line that happens to start with "{"
        pass
peak = next((r["tflops"] for r in rows if r.get("check") == "matmul" and "tflops" in r), None)
sft = {r["packing"]: r for r in rows if r.get("check") == "sft" and "packing" in r}
for mode, r in sft.items():
    line = {"check": "sft_mfu", "packing": mode, "tokens_per_s": r["tokens_per_s"], "mfu_datasheet": r["mfu_datasheet"]}
    if peak:
        line["measured_peak_tflops"] = round(peak, 1)
        line["mfu_measured_peak"] = round(r["tflops"] / peak, 4)
    print(json.dumps(line))
if len(sft) == 2:
    print(json.dumps({"check": "sft_packing_ratio", "packed_vs_unpacked_tokens_per_s":
                      round(sft["on"]["tokens_per_s"] / sft["off"]["tokens_per_s"], 3)}))
failed = [r["check"] for r in rows if r.get("status") == "FAIL"]
print(json.dumps({"check": "done", "failed": failed}))
EOF
) | tee -a "$FIGURES"
