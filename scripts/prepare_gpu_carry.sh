#!/usr/bin/env bash
# What scripts/gpu_check.sh needs on a bare CUDA machine (torch, transformers, accelerate, triton; no
# diffusers, toml, lycoris-lora, no network), gathered here into .gpu_carry/ (git-ignored, never
# committed): the wheels, and sd-scripts' networks/lora.py and lora_flux.py with stand-ins for the two
# `library` modules they import at load time (setup_logging, and a class used in an isinstance test
# that is False for diffusers' U-Net either way).
#   SD_SCRIPTS=/path/to/sd-scripts scripts/prepare_gpu_carry.sh     (default: kohya-run's checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
SD_SCRIPTS="${SD_SCRIPTS:-$HOME/.cache/lycoris_kohya_kohya/sd-scripts}"
rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/sd_scripts/networks" "$CARRY/sd_scripts/library"
# --no-deps: lycoris-lora and diffusers would otherwise pull a CUDA torch; their other dependencies
# (numpy, safetensors, tqdm, huggingface_hub, regex, requests, Pillow) come with transformers
pip download -q --no-deps -d "$CARRY/wheels" "diffusers>=0.30,<0.36" toml lycoris-lora==4.1.3 einops \
    importlib-metadata zipp
for f in lora.py lora_flux.py; do
    cp "$SD_SCRIPTS/networks/$f" "$CARRY/sd_scripts/networks/$f"
done
touch "$CARRY/sd_scripts/networks/__init__.py" "$CARRY/sd_scripts/library/__init__.py"
cat > "$CARRY/sd_scripts/library/utils.py" <<'PY'
def setup_logging(*args, **kwargs):  # stand-in: the benchmark configures no logging
    pass
PY
cat > "$CARRY/sd_scripts/library/sdxl_original_unet.py" <<'PY'
class SdxlUNet2DConditionModel:  # stand-in: only an isinstance test, False for diffusers' U-Net
    pass
PY
(cd "$SD_SCRIPTS" && git rev-parse HEAD 2>/dev/null || echo unknown) > "$CARRY/sd_scripts/COMMIT"
du -sh "$CARRY"
ls "$CARRY/wheels"
