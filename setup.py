from setuptools import find_packages, setup

setup(
    name="lycoris_kohya",
    version="0.1.0",
    description="LoCon, LoHa, LoKr and DoRA for kohya-ss/sd-scripts (--network_module=lycoris_kohya)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lycoris_kohya", "lycoris_kohya.*"]),
    # the preset files usable by name (preset=style-no-cross-attn) ship inside the package
    package_data={"lycoris_kohya": ["preset_files/*.toml"]},
    python_requires=">=3.10",
    # loose on purpose: the plugin runs inside users' kohya environments
    install_requires=["torch>=2.1", "safetensors", "diffusers", "transformers", "accelerate", "toml", "tqdm"],
    extras_require={"test": ["pytest", "peft", "matplotlib"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["lycoris-kohya=lycoris_kohya.tools.cli:main"]},
    license="Apache-2.0",
)
