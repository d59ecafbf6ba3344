#!/usr/bin/env bash
# The commands that produce the published numbers in benchmarks/results/ (see benchmarks/README.md).
#
#   bash benchmarks/run_published.sh                 # every CPU table (what is committed)
#   bash benchmarks/run_published.sh resnet18        # some of them: resnet18, resnet50, unet3d
#   DEVICE=cuda bash benchmarks/run_published.sh     # the same matrix on a GPU (files end in _cuda)
#
# Each method runs in a fresh process, one at a time (JOBS=1) with every core (THREADS), and times its steps
# interleaved with the baseline's in the same process; still, run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."

MEMCOMP=${MEMCOMP:-memcomp}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-benchmarks/results}
THREADS=${THREADS:-$(nproc)}
STEPS=${STEPS:-2}         # measured steps per method (median), after WARMUP steps
WARMUP=${WARMUP:-1}
TIMING=${TIMING:-interleaved}  # each worker alternates baseline and method steps: time ratios side by side
JOBS=${JOBS:-1}
COMMON=(--device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" --timing "$TIMING" --threads "$THREADS"
        --jobs "$JOBS" --timeout 3000 --out "$OUT" --no-progress)
METHODS=baseline,bf16,checkpoint,floor:2,floor:4,quant:8,quant:4,quant:2,blpa:4,wavelet:4,wavelet:10,dct:4,dct:10,threshold:4,threshold:10,bandlimit:50,bandlimit:85,csg

resnet18() {  # CIFAR-style ResNet-18, batches 32 and 64, 3x32x32; band-limit on the paper's power-of-two FFT grid
    "$MEMCOMP" bench --network resnet18_cifar --batch-size 32 --peak-batch 64 --input-size 32 --methods "$METHODS" \
        "${COMMON[@]}" --band-fft-size power2 --name "bench_resnet18_cifar_${DEVICE}"
}

resnet50() {  # torchvision ResNet-50, batches 4 and 8, 3x224x224: the step peak per sample at ImageNet size
    "$MEMCOMP" bench --network resnet50 --batch-size 4 --peak-batch 8 --input-size 224 --num-classes 1000 \
        --methods baseline,checkpoint,floor:2,floor:4,quant:2,quant:4,blpa:4 "${COMMON[@]}" --name "bench_resnet50_${DEVICE}"
}

unet3d() {  # MONAI 3-D UNet (16-32-64-128, two residual units), 1x64^3 volumes at batches 4 and 8, cross-entropy on random labels
    "$MEMCOMP" bench --network unet3d --batch-size 4 --peak-batch 8 --input-size 64 --methods "$METHODS" "${COMMON[@]}" \
        --band-fft-size minimal --name "bench_unet3d_${DEVICE}" \
        --note "bandlimit uses fft_size=minimal (the padded input size, 66^3 at the first level): the paper's power-of-two grid is 256^3 per channel there (the paper's length 66 + 64 - 1 = 129, rounded up), about 1 GiB of kept spectrum per first-level layer at compress_rate 50."
}

parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(resnet18 resnet50 unet3d)
for part in "${parts[@]}"; do
    case $part in
        resnet18) resnet18 ;;
        resnet50) resnet50 ;;
        unet3d) unet3d ;;
        *) echo "unknown part $part; use resnet18, resnet50 and/or unet3d" >&2; exit 2 ;;
    esac
done
