#!/usr/bin/env bash
# The device check, one call: the accelerator tests, then the benchmark in the regimes users train in
# (SD1.5 at 512 px = latent 64, SDXL at 1024 px = latent 128, FLUX.1's blocks at 4096 image + 512 text
# tokens), ours beside sd-scripts' networks.lora(_flux) and lycoris-lora 4.1.3, peak memory beside
# each; one table printed last (also written to $OUT/table.md).
#
#   scripts/prepare_gpu_carry.sh                       # here, once: wheels + sd-scripts' LoRA into .gpu_carry/
#   scripts/gpu_check.sh                               # on the CUDA machine (carry .gpu_carry along)
#   scripts/gpu_check.sh --device cpu --quick          # the same steps on the CPU, small shapes: a dry run
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "usage: $0 [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
    esac
done
CARRY=.gpu_carry
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
START=$SECONDS
log() { echo "[gpu_check $((SECONDS - START))s] $*"; }

# 1. what the machine lacks, from the carried wheels (never from a network)
for pair in diffusers:diffusers toml:toml lycoris:lycoris-lora einops:einops; do
    mod="${pair%%:*}" pkg="${pair#*:}"
    if ! python -c "import $mod" 2>/dev/null; then
        if [ -d "$CARRY/wheels" ]; then
            pip install -q --no-index --no-deps --find-links "$CARRY/wheels" "$pkg" importlib-metadata zipp \
                || log "could not install $pkg from $CARRY/wheels"
        else
            log "$mod missing and no $CARRY/wheels (run scripts/prepare_gpu_carry.sh here first)"
        fi
    fi
done
export PYTHONPATH="$PWD${CARRY:+:$PWD/$CARRY/sd_scripts}${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device:",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for m in ("diffusers", "lycoris", "networks.lora", "networks.lora_flux"):
    try:
        __import__(m)
        print(m, "ok")
    except Exception as e:
        print(m, "MISSING:", type(e).__name__, e)
PY

# 2. the accelerator tests (the DoRA device test and the cuda-marked set)
log "tests on $DEVICE"
LYCORIS_TEST_DEVICE="$DEVICE" timeout 300 python -m pytest -q -p no:cacheprovider -m "cuda or not cuda" \
    tests/test_device.py "tests/test_dora.py::test_network_created_on_cpu_follows_a_unet_on_the_gpu" 2>&1 | tail -5 \
    | tee "$OUT/tests.txt"

# 3. the benchmark, each regime into its own file; rows: every algorithm, with and without DoRA
ROWS=locon,loha,lokr,locon_dora,loha_dora,lokr_dora
if [ "$QUICK" = 1 ]; then
    REGIMES=("toy:8" "flux-small:256")
    STEPS=(--steps 2 --warmup 1)
else
    REGIMES=("sd15:64" "sdxl:128" "flux:4096")
    STEPS=(--steps 4 --warmup 2)
fi
for regime in "${REGIMES[@]}"; do
    shape="${regime%%:*}" latent="${regime#*:}"
    log "bench $shape $latent"
    timeout 900 python scripts/bench.py --device "$DEVICE" --shape "$shape" --latent "$latent" --only "$ROWS" \
        "${STEPS[@]}" > "$OUT/bench_$shape.md" 2>&1 || log "bench $shape exited $?"
    tail -3 "$OUT/bench_$shape.md"
done

# 4. one table, last
{
    echo "## gpu_check $(date -u +%Y-%m-%d) on $DEVICE: $(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")')"
    echo
    echo "tests: $(tail -1 "$OUT/tests.txt")"
    for regime in "${REGIMES[@]}"; do
        shape="${regime%%:*}"
        echo
        grep -E "^# |^## " "$OUT/bench_$shape.md" | head -2
        echo
        grep -E "^\|" "$OUT/bench_$shape.md"
    done
} > "$OUT/table.md"
log "done"
cat "$OUT/table.md"
