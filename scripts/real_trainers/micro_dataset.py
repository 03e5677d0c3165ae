"""The images, captions and dataset TOML every family's micro build trains on (musubi-tuner's dataset
config format: one image directory, one cache directory, no buckets)."""
from __future__ import annotations

import json
import os

CAPTIONS = {"red_cube": "a red cube on a table", "blue_ball": "a blue ball in the grass"}
RESOLUTION = 128  # pixels; the VAEs' stride 8 gives a 16x16 latent


def write(work: str, dataset_config: str) -> str:
    """Random RESOLUTION^2 images with CAPTIONS under work/images, the TOML at ``dataset_config``;
    returns the cache directory it names."""
    import numpy as np
    from PIL import Image

    images, cache = os.path.join(work, "images"), os.path.join(work, "cache")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, caption in CAPTIONS.items():
        png = os.path.join(images, name + ".png")
        if not os.path.exists(png):
            Image.fromarray(rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)).save(png)
        with open(os.path.join(images, name + ".txt"), "w") as f:
            f.write(caption)
    with open(dataset_config, "w") as f:
        f.write(f"""[general]
resolution = [{RESOLUTION}, {RESOLUTION}]
caption_extension = ".txt"
batch_size = 1
enable_bucket = false

[[datasets]]
image_directory = {json.dumps(images)}
cache_directory = {json.dumps(cache)}
num_repeats = 1
""")
    return cache
