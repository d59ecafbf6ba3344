#!/usr/bin/env bash
# The commands that produce the published numbers in benchmarks/results/ (see benchmarks/README.md).
#
#   bash benchmarks/run_published.sh                    # all CPU tables (what is committed)
#   bash benchmarks/run_published.sh resnet18 bandlimit # some of them: resnet18, unet3d, bandlimit
#   DEVICE=cuda bash benchmarks/run_published.sh        # the full matrix on a GPU (files end in _cuda)
#   STEPS=5 WARMUP=2 TIMING=interleaved JOBS=1 bash benchmarks/run_published.sh   # steadier timings
#
# Each method runs in a fresh process. On CPU the band-limited rows are measured in separate, smaller
# tables: at the publication sizes a band-limited ResNet-18 (batch 128) or 3-D UNet (2 x 64^3) keeps many
# GB of spectra for backward and takes many minutes per step on a CPU (see the notes in the tables).
set -euo pipefail
cd "$(dirname "$0")/.."

MEMCOMP=${MEMCOMP:-memcomp}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-benchmarks/results}
THREADS=${THREADS:-1}     # one intra-op thread per worker: steady on a shared 2-core machine
STEPS=${STEPS:-1}         # the committed CPU tables: 1 warm-up + 1 measured step (ResNet-18 b128 is slow on 2 cores)
WARMUP=${WARMUP:-1}
TIMING=${TIMING:-isolated}
JOBS=${JOBS:-2}
COMMON=(--device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" --timing "$TIMING" --threads "$THREADS"
        --jobs "$JOBS" --timeout 3000 --out "$OUT" --no-progress)
MAIN=baseline,bf16,checkpoint,quant:8,quant:4,quant:2,blpa:4,wavelet:4,wavelet:10,dct:4,dct:10,threshold:4,threshold:10,csg
BAND=baseline,bf16,checkpoint,quant:4,bandlimit:50,bandlimit:85

if [ "$DEVICE" = cuda ]; then  # a GPU holds the band-limited spectra: one table per network with every method
    "$MEMCOMP" bench --network resnet18_cifar --batch-size 128 --input-size 32 --methods all "${COMMON[@]}" \
        --name bench_resnet18_cifar_cuda
    "$MEMCOMP" bench --network unet3d --batch-size 2 --input-size 64 --methods all "${COMMON[@]}" \
        --name bench_unet3d_cuda
    exit 0
fi

resnet18() {  # CIFAR-style ResNet-18, 3x32x32: batch 32 (every method) and batch 128 (the publication size)
    "$MEMCOMP" bench --network resnet18_cifar --batch-size 32 --input-size 32 --methods "$MAIN" "${COMMON[@]}" \
        --name bench_resnet18_cifar_b32_cpu \
        --note "The same matrix at batch 128 (the publication size) is in bench_resnet18_cifar_cpu.md, where this shared machine finished only part of it before the deadline; band-limit rows are in bench_resnet18_cifar_bandlimit_cpu.md."
    "$MEMCOMP" bench --network resnet18_cifar --batch-size 128 --input-size 32 --methods "$MAIN" "${COMMON[@]}" \
        --name bench_resnet18_cifar_cpu \
        --note "bandlimit:50 and bandlimit:85 are measured in bench_resnet18_cifar_bandlimit_cpu.md (batch 4, 16x16): on this CPU a band-limited step takes tens of seconds already there, and the spectra it keeps for backward grow with batch and image size (see that table), so batch 128 at 32x32 does not fit this shared 2-core, 24 GiB machine."
}

unet3d() {  # MONAI 3-D UNet (16-32-64-128, two residual units), 2x1x64^3, cross-entropy on random labels
    "$MEMCOMP" bench --network unet3d --batch-size 2 --input-size 64 --methods "$MAIN" "${COMMON[@]}" \
        --name bench_unet3d_cpu \
        --note "bandlimit:50 and bandlimit:85 are measured in bench_unet3d_bandlimit_cpu.md (1x1x16^3): at 2x1x64^3 the 3-D FFT grids (256^3 per channel at the first level) would not fit this 24 GiB machine."
}

bandlimit() {  # the band-limited rows, with the baseline and the alternatives at the same (CPU-sized) input
    "$MEMCOMP" bench --network resnet18_cifar --batch-size 4 --input-size 16 --methods "$BAND" "${COMMON[@]}" \
        --name bench_resnet18_cifar_bandlimit_cpu
    "$MEMCOMP" bench --network unet3d --batch-size 1 --input-size 16 --methods "$BAND" "${COMMON[@]}" \
        --name bench_unet3d_bandlimit_cpu
}

parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(resnet18 unet3d bandlimit)
for part in "${parts[@]}"; do
    case $part in
        resnet18) resnet18 ;;
        unet3d) unet3d ;;
        bandlimit) bandlimit ;;
        *) echo "unknown part $part; use resnet18, unet3d and/or bandlimit" >&2; exit 2 ;;
    esac
done
