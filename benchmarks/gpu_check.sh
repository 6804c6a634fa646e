#!/usr/bin/env bash
# The CUDA path end to end, in one script that writes one JSON file (about 4 minutes on an
# H200; nothing is downloaded, no dataset is read but scikit-learn's bundled digits):
#
#   bash benchmarks/gpu_check.sh                       # --device cuda, writes gpu_check.json
#   bash benchmarks/gpu_check.sh --device cpu --out /tmp/check.json   # a dry check on CPU
#   bash benchmarks/gpu_check.sh --compile   # also 7: compiled steps (3-4 minutes more)
#
# 1. the environment (nvidia-smi, python -m ldfa_cli.lock);
# 2. training: a tiny ViT with normative LDFA r=8 on digits under bf16 autocast and
#    torch.compile, with its two optimizers (AdamW for W, AdamW for P, Q), one epoch;
# 3. ldfa flops of the tiny ViT (fmnist_vit_r16) and of ViT-S/16 at 224 (r=32);
# 4. ldfa bench (CUDA events and each variant's kernel time on a GPU) of both, ViT-S/16 at
#    r in {16, 32, 64} in fp32 and under bf16 autocast, and ldfa bench --memory (the
#    allocator's peak beside the split by kind);
# 5. ldfa bench of docs/performance.md's models at r = 8 and 32: the MLP 3x512 at batch 256
#    and the tiny ViT at batch 128, under ldfa and ldfa_local;
# 6. benchmarks/normative_update.py: eq. 9's update layer by layer against batched over
#    layers of one shape, for ViT-S/16 (r = 16) and the tiny ViT; benchmarks/minimal_step.py:
#    the MLP's ldfa step beside the same step in the fewest eager ops (r = 8);
# 7. with --compile: ldfa bench train.compile=true of the tiny ViT (r = 8) and of ViT-S/16
#    under bf16 (r = 16), where a launch-bound eager step should gain most, and of ViT-S/16
#    with train.compile=reduce-overhead (CUDA graphs), of the model and (train.compile_scope=
#    step) of the whole forward and backward with eq. 9.
# On CPU (--device cpu) the same steps run at batch 2 and a step or two, to check that the
# script and every command work; its timings mean nothing.
set -euo pipefail

device=cuda
out=gpu_check.json
compiled=false
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --compile) compiled=true; shift ;;
        *) echo "gpu_check.sh: unknown argument '$1' (use --device cuda|cpu, --out FILE," \
               "--compile)" >&2; exit 2 ;;
    esac
done
if [[ "$device" == cuda ]]; then
    vit_batch=128; vits_batch=64; mlp_batch=256; steps=20; warmup=5
else
    vit_batch=8; vits_batch=2; mlp_batch=8; steps=2; warmup=1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tiny_vit='model={name: vit, patch_size: 4, embed_dim: 64, depth: 4, num_heads: 4, mlp_ratio: 2.0}'
vit_s=('model={name: timm, architecture: vit_small_patch16_224}' data.resize=224)
started=$(date +%s)

step() {  # step NAME COMMAND...: run it, keep its stdout as $work/NAME.json, say how long
    local name=$1; shift
    local t0=$(date +%s)
    echo "== $name: $*" >&2
    "$@" > "$work/$name.json"
    echo "   $(( $(date +%s) - t0 )) s" >&2
}

(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi") > "$work/gpu.txt"
python -m ldfa_cli.lock > "$work/env.json" || true  # a mismatch is recorded, not fatal

step train ldfa train quickstart "$tiny_vit" feedback.rule=ldfa feedback.rank=8 \
    'feedback.optimizer={name: adamw, lr: 0.015, weight_decay: 0.0}' \
    train.precision=bf16 train.compile=true train.epochs=1 train.log_every=10 \
    --device "$device" --out "$work/run" --json
step flops_tiny_vit ldfa flops fmnist_vit_r16 --device "$device" --batch-size "$vit_batch" --json
step flops_vit_s16 ldfa flops vit_cifar10_r24 "${vit_s[@]}" feedback.rank=32 \
    --device "$device" --batch-size "$vits_batch" --json
step bench_tiny_vit ldfa bench fmnist_vit_r16 --ranks 8,16,32 --device "$device" \
    --batch-size "$vit_batch" --steps "$steps" --warmup "$warmup" --json
step bench_vit_s16 ldfa bench vit_cifar10_r24 "${vit_s[@]}" --ranks 16,32,64 --device "$device" \
    --batch-size "$vits_batch" --steps "$steps" --warmup "$warmup" --json
step bench_vit_s16_bf16 ldfa bench vit_cifar10_r24 "${vit_s[@]}" train.precision=bf16 \
    --ranks 16,32,64 --device "$device" --batch-size "$vits_batch" --steps "$steps" \
    --warmup "$warmup" --json
step bench_mlp_ldfa ldfa bench fmnist_mlp_ldfa_r10 --ranks 8,32 --device "$device" \
    --batch-size "$mlp_batch" --steps "$steps" --warmup "$warmup" --json
step bench_mlp_local ldfa bench fmnist_mlp_local_r10 --ranks 8,32 --device "$device" \
    --batch-size "$mlp_batch" --steps "$steps" --warmup "$warmup" --json
step bench_tiny_vit_local ldfa bench fmnist_vit_r16 feedback.rule=ldfa_local 'feedback.options={}' \
    --ranks 8,32 --device "$device" --batch-size "$vit_batch" --steps "$steps" \
    --warmup "$warmup" --json
step update_vit_s16 python benchmarks/normative_update.py vit_cifar10_r24 "${vit_s[@]}" \
    feedback.rank=16 --device "$device" --json
step update_tiny_vit python benchmarks/normative_update.py fmnist_vit_r16 --device "$device" --json
step minimal_mlp python benchmarks/minimal_step.py --device "$device" --batch-size "$mlp_batch" \
    --rounds $(( steps * 3 )) --ablate --json
if [[ "$compiled" == true ]]; then
    step compiled_tiny_vit ldfa bench fmnist_vit_r16 train.compile=true --ranks 8 \
        --device "$device" --batch-size "$vit_batch" --steps "$steps" --warmup "$warmup" --json
    step compiled_vit_s16_bf16 ldfa bench vit_cifar10_r24 "${vit_s[@]}" train.precision=bf16 \
        train.compile=true --ranks 16 --device "$device" --batch-size "$vits_batch" \
        --steps "$steps" --warmup "$warmup" --json
    step graphs_vit_s16_bf16 ldfa bench vit_cifar10_r24 "${vit_s[@]}" train.precision=bf16 \
        train.compile=reduce-overhead --ranks 16 --device "$device" --batch-size "$vits_batch" \
        --steps "$steps" --warmup "$warmup" --json
    step graphs_step_vit_s16_bf16 ldfa bench vit_cifar10_r24 "${vit_s[@]}" train.precision=bf16 \
        train.compile=reduce-overhead train.compile_scope=step --ranks 16 --device "$device" \
        --batch-size "$vits_batch" --steps "$steps" --warmup "$warmup" --json
fi
step memory_vit_s16 ldfa bench vit_cifar10_r24 "${vit_s[@]}" --memory --ranks 16,32,64 \
    --device "$device" --batch-size "$vits_batch" --json

python - "$work" "$out" "$device" "$started" "$compiled" <<'EOF'
import json, os, sys, tempfile, time
from pathlib import Path

work, out, device, started = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
compiled = sys.argv[5] == "true"
result = {"device": device, "gpu": (work / "gpu.txt").read_text().strip(),
          "env": json.loads((work / "env.json").read_text() or "{}")}
BENCHES = ["bench_tiny_vit", "bench_vit_s16", "bench_vit_s16_bf16", "bench_mlp_ldfa",
           "bench_mlp_local", "bench_tiny_vit_local",
           *(["compiled_tiny_vit", "compiled_vit_s16_bf16", "graphs_vit_s16_bf16",
               "graphs_step_vit_s16_bf16"] if compiled else [])]
UPDATES = ["update_vit_s16", "update_tiny_vit"]
for name in ["train", "flops_tiny_vit", "flops_vit_s16", *BENCHES, *UPDATES, "minimal_mlp",
             "memory_vit_s16"]:
    result[name] = json.loads((work / f"{name}.json").read_text())
result["wall_s"] = round(time.time() - started, 1)
out.parent.mkdir(parents=True, exist_ok=True)
with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
    json.dump(result, f, indent=2)
os.replace(f.name, out)  # atomic: a half-written check never replaces a finished one
for name in BENCHES:
    for row in result[name]["rows"]:
        print(f"{name:20s} {row['variant']:15s} {row['median_ms']:9.2f} ms  time/BP "
              f"{row['time_ratio']:.2f}  FLOPs/BP {row['flop_ratio']:.2f}  gap {row['gap']:+.2f}"
              + (f"  kernel/BP {row['kernel_ratio']:.2f}" if "kernel_ratio" in row else "")
              + (f"  dispatches {row['dispatches']:.0f}" if row.get("dispatches") else ""),
              file=sys.stderr)
for name in UPDATES:
    u = result[name]
    print(f"{name:20s} eq. 9 per layer {u['per_layer_ms']:.3f} ms, batched {u['batched_ms']:.3f} ms "
          f"({u['speedup']:.2f}x, runs {u['runs_of_one_shape']})", file=sys.stderr)
for label, ratio in result["minimal_mlp"]["time_ratio"].items():
    print(f"{'minimal_mlp':20s} {label:42s} time/BP {ratio:.2f}", file=sys.stderr)
for row in result["memory_vit_s16"]["rows"]:
    peak = row["allocator_peak"] if row["allocator_peak"] is not None else row["peak"]
    print(f"{'memory_vit_s16':20s} {row['variant']:15s} peak {peak / 2**20:9.1f} MiB", file=sys.stderr)
print(f"wrote {out} ({result['wall_s']} s)", file=sys.stderr)
EOF
