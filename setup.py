import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("lycoris_kohya/_version.py", encoding="utf-8").read()).group(1)

setup(
    name="lycoris_kohya",
    version=VERSION,
    description="LoCon, LoHa, LoKr and DoRA for kohya-ss/sd-scripts (--network_module=lycoris_kohya)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lycoris_kohya", "lycoris_kohya.*"]),
    # the preset files usable by name (preset=style-no-cross-attn) ship inside the package
    package_data={"lycoris_kohya": ["preset_files/*.toml"]},
    python_requires=">=3.10",
    # what the package imports, loose on purpose: it is installed into users' kohya environments, where
    # installing it must change nothing (toml reads preset files; numpy is what safetensors.torch.save
    # writes through, it does not require it itself; tqdm, matplotlib are used when present)
    install_requires=["torch>=2.1", "safetensors", "numpy", "toml"],
    extras_require={
        # the diffusers pipeline API (lycoris_kohya.pipeline) works on the user's diffusers pipelines
        "pipeline": ["diffusers", "transformers"],
        "plot": ["matplotlib"],
        # scripts/ (tiny checkpoints, smoke trains, benchmarks) and the tests
        "test": ["pytest", "pytest-xdist", "peft", "matplotlib", "diffusers", "transformers", "accelerate", "tqdm"],
    },
    entry_points={"console_scripts": ["lycoris-kohya=lycoris_kohya.tools.cli:main"]},
    license="Apache-2.0",
)
