#!/usr/bin/env bash
# The GPU checks of ../shared/gpu-checks.md, in one script that finishes in under 10 minutes on one
# H200-class GPU and writes every figure to one file (FIGURES, default benchmarks/gpu_checks.out.jsonl;
# $OUT/gpu_checks.jsonl when OUT is set). docs/gpu.md says what each figure is and how to read it.
#
#   bash benchmarks/gpu_checks.sh [all|slice|sft|generate|attention|rl|megatron|stages]
#   SMALL=1 PY=.venv/bin/python bash benchmarks/gpu_checks.sh    # dry run on a CPU: tiny shapes, same code
#
# It runs with the machine's python3 (torch with CUDA must already be there) and never installs torch.
# Packages the machine lacks (trl, datasets, omegaconf, rouge-score, megatron-core 0.19, liger-kernel, ...)
# come as Python 3.12 wheels in .whl/ (docs/gpu.md has the pip command); they are installed into
# /tmp/site and put on PYTHONPATH. In priority order, each with its own time limit; a check that would
# start after BUDGET_S (default 560) seconds is recorded as skipped, so the whole run stays under 10 min:
#   1 matmul    measured bf16 peak (8192^3 matmul), the MFU denominator beside the datasheet's 989 TFLOP/s
#   2 slice     a Llama-3.3-70B-shaped slice (hidden 8192, 64/8 heads, FFN 28672, vocab 128,256, 2 layers),
#               seq 4096, packed, bf16: our HF engine today (sdpa, dense mask), with document-aware
#               attention + Liger, and megatron-core 0.19's GPTModel (local spec) on the same packs
#   3 sft       the ~1.2B Llama, seq 4096, packed: sdpa / flex_attention / + Liger / + torch.compile
#   4 generate  eval generation (eval.engines.HFEngine): today's path (dynamic cache, batch 8) against a
#               static KV cache with compiled decoding (batch 32); same prompts, greedy, tokens/s
#   4b attention tests/test_attention_paths.py on the GPU: a packed row's loss and gradients equal its
#               documents run alone on eager, sdpa and flex_attention (whose backward a CPU cannot run)
#   5 rl        where vllm is importable: 2 RLOO steps with rl.vllm=colocate (the weight push into vLLM that a
#               CPU cannot run; finite reward/KL, weights moved); elsewhere a probe saying why not (docs/vllm.md)
#   6 megatron  megatron-core trains our tiny Llama shape on the bundled sample (a few steps)
#   7 stages    the HF engine on CUDA in bf16: data, sft, rm, rl (RLOO), dpo, eval, a few steps each
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
which="${1:-all}"
PY="${PY:-python3}"
SMALL="${SMALL:-0}"
BUDGET_S="${BUDGET_S:-560}"
FIGURES="${FIGURES:-${OUT:+$OUT/gpu_checks.jsonl}}"
FIGURES="${FIGURES:-$ROOT/benchmarks/gpu_checks.out.jsonl}"
LOG="${FIGURES%.jsonl}.log"
: > "$FIGURES"; : > "$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
T0=$(date +%s)
small=(); [[ "$SMALL" == 1 ]] && small=(--small)

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: could not install .whl/*.whl" >&2; exit 2; }
  export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

record() { echo "$1" | tee -a "$FIGURES"; }
record "$("$PY" - <<'EOF'
import json, datetime, importlib.metadata as m, torch
versions = {}
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "megatron-core", "liger-kernel", "triton", "vllm"):
    try:
        versions[name] = m.version(name)
    except m.PackageNotFoundError:
        versions[name] = None
print(json.dumps({"check": "machine", "date": datetime.date.today().isoformat(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "cuda": torch.version.cuda, "versions": versions}))
EOF
)"
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

# run NAME TIMEOUT CMD...: one check; its JSON lines go to FIGURES, everything to LOG.
run() {
  local name="$1" limit="$2"; shift 2
  local start end rc
  if (( $(date +%s) - T0 > BUDGET_S )); then
    record "$(printf '{"check": "%s", "status": "skipped", "reason": "time budget of %ss spent"}' "$name" "$BUDGET_S")"
    return
  fi
  start=$(date +%s%N)
  echo "== $name: $*" >> "$LOG"
  timeout "$limit" "$@" > >(tee -a "$LOG" | grep '^{"' >> "$FIGURES") 2>> "$LOG"
  rc=$?
  end=$(date +%s%N)
  record "$(printf '{"check": "%s", "status": "%s", "exit": %d, "wall_s": %s}' \
    "$name" "$([[ $rc == 0 ]] && echo pass || echo FAIL)" "$rc" "$(awk -v ns=$((end - start)) 'BEGIN { printf "%.1f", ns / 1e9 }')")"
}
# needs_cuda NAME WHY: record a check that only a GPU can run (the CPU dry run passes over it)
needs_cuda() { record "$(printf '{"check": "%s", "status": "skipped", "reason": "%s"}' "$1" "$2")"; }
want() { [[ "$which" == all || "$which" == "$1" ]]; }
bench=("$PY" benchmarks/gpu_bench.py)

want slice || want sft && run matmul 60 "${bench[@]}" matmul "${small[@]}"
if want slice; then
  slice=(--shape slice --rows 96 --steps 12 "${small[@]}")
  run slice_hf_sdpa 150 "${bench[@]}" sft "${slice[@]}" --attention sdpa
  if [[ "$CUDA" == 1 ]]; then
    run slice_hf_flex_liger 150 "${bench[@]}" sft "${slice[@]}" --attention flex_attention --liger
  else
    needs_cuda slice_hf_flex_liger "FlexAttention backward and Liger's Triton kernels need CUDA"
  fi
  run slice_megatron_core 150 "${bench[@]}" megatron "${slice[@]}"
fi
if want sft; then
  one=(--shape 1b --rows 160 --steps 30 "${small[@]}")
  run sft_sdpa 120 "${bench[@]}" sft "${one[@]}" --attention sdpa
  if [[ "$CUDA" == 1 ]]; then
    run sft_flex 120 "${bench[@]}" sft "${one[@]}" --attention flex_attention
    run sft_flex_liger 120 "${bench[@]}" sft "${one[@]}" --attention flex_attention --liger
    run sft_flex_liger_compile 180 "${bench[@]}" sft "${one[@]}" --attention flex_attention --liger --compile
  else
    needs_cuda sft_flex "FlexAttention has no backward on CPU"
    run sft_sdpa_compile 300 "${bench[@]}" sft "${one[@]}" --attention sdpa --compile
  fi
fi
if want generate; then
  run generate_dynamic 150 "${bench[@]}" generate --cache dynamic --batch-size 8 "${small[@]}"
  run generate_static 180 "${bench[@]}" generate --cache static --batch-size 32 "${small[@]}"
fi
if want attention; then  # the same loss and gradients on every attention path, flex_attention's backward included
  if "$PY" -c "import pytest" 2>/dev/null; then
    run attention_paths 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_paths.py
  else
    record '{"check": "attention_paths", "status": "skipped", "reason": "pytest is not importable here (put its wheel, and pluggy'"'"'s and iniconfig'"'"'s, in .whl/)"}'
  fi
fi
want rl && run rl_vllm 150 "${bench[@]}" rl_vllm "${small[@]}"
want megatron && run megatron_core 120 "${bench[@]}" megatron "${small[@]}"

if want stages; then
  RUN=/tmp/gpu-run; rm -rf "$RUN"
  dtype=(model.dtype=bfloat16 train.bf16=true); [[ "$CUDA" == 1 ]] || dtype=()
  common=(run_dir="$RUN" model=tiny "${dtype[@]}")
  run data 60 "$PY" -m launcher data run_dir="$RUN" model=tiny prep.source=data_prep/sample
  run sft 120 "$PY" -m launcher sft "${common[@]}" train.max_steps=8 train.save_steps=4 train.packing=true
  run rm 120 "$PY" -m launcher rm "${common[@]}" train.max_steps=8 train.save_steps=4 train.eval_steps=4
  run rl 120 "$PY" -m launcher rl "${common[@]}" train.max_steps=4 train.save_steps=2 rl.max_new_tokens=32
  run dpo 120 "$PY" -m launcher dpo "${common[@]}" train.max_steps=4 train.save_steps=2
  run eval 120 "$PY" -m launcher eval run_dir="$RUN" model=tiny "${dtype[@]:0:1}" \
    eval.max_new_tokens=32 eval.bootstrap_samples=200
  for stage in sft rm rl dpo; do
    [[ -f "$RUN/$stage/summary.json" ]] && record "$("$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({'check': 'summary', **{k: d.get(k) for k in ('stage','metric','value','steps','wall_s')}}))" "$RUN/$stage/summary.json")"
  done
fi

("$PY" - "$FIGURES" <<'EOF'
import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        rows.append(json.loads(line))
    except ValueError:  # a library's own log line that happens to start with "{"
        pass
peak = next((r["tflops"] for r in rows if r.get("check") == "matmul" and "tflops" in r), None)
sft = [r for r in rows if r.get("check") == "sft" and "tokens_per_s" in r]
for r in sft:
    line = {"check": "sft_mfu", "shape": r["shape"], "engine": r["engine"], "attention": r["attention"],
            "liger": r["liger"], "compile": r["compile"], "tokens_per_s": r["tokens_per_s"],
            "mfu_datasheet": r["mfu_datasheet"], "loss": r["loss"]}
    if peak:
        line["measured_peak_tflops"] = round(peak, 1)
        line["mfu_measured_peak"] = round(r["tflops"] / peak, 4)
    print(json.dumps(line))
for shape in sorted({r["shape"] for r in sft}):
    hf = [r for r in sft if r["shape"] == shape and r["engine"] == "hf"]
    mc = [r for r in sft if r["shape"] == shape and r["engine"] == "megatron_core"]
    if hf:
        best = max(hf, key=lambda r: r["tokens_per_s"])
        today = next((r for r in hf if r["attention"] == "sdpa" and not r["liger"] and not r["compile"]), None)
        out = {"check": "sft_best", "shape": shape, "hf_best": {k: best[k] for k in ("attention", "liger", "compile")},
               "hf_best_mfu_datasheet": best["mfu_datasheet"], "goal_mfu_datasheet": 0.40,
               "goal_mfu_met": best["mfu_datasheet"] >= 0.40 if shape == "slice" else None}
        if today:
            out["hf_best_vs_today"] = round(best["tokens_per_s"] / today["tokens_per_s"], 3)
        if mc:
            out["hf_vs_megatron_core"] = round(best["tokens_per_s"] / mc[0]["tokens_per_s"], 3)
            out["goal_ratio"], out["goal_ratio_met"] = 0.9, out["hf_vs_megatron_core"] >= 0.9
            if today:
                out["hf_today_vs_megatron_core"] = round(today["tokens_per_s"] / mc[0]["tokens_per_s"], 3)
        print(json.dumps(out))
generate = {r["cache"]: r for r in rows if r.get("check") == "generate" and "cache" in r}
if len(generate) == 2:
    print(json.dumps({"check": "generate_ratio", "static_vs_dynamic_tokens_per_s":
                      round(generate["static"]["tokens_per_s"] / generate["dynamic"]["tokens_per_s"], 2),
                      "same_greedy_texts": generate["static"]["texts_sha256"] == generate["dynamic"]["texts_sha256"]}))
failed = [r["check"] for r in rows if r.get("status") == "FAIL"]
skipped = [r["check"] for r in rows if r.get("status") == "skipped"]
print(json.dumps({"check": "done", "failed": failed, "skipped": skipped}))
EOF
) | tee -a "$FIGURES"
