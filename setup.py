"""fastpo: fast, memory-lean preference optimization (DPO and its family).

`kernels/` is installed as the subpackage `fastpo.kernels`; the top-level import name `kernels`
belongs to another PyPI package and is never claimed.
"""

from setuptools import setup

setup(
    name="fastpo",
    version="0.1.0",
    description="Fused Triton log-prob kernels, preference losses, prefix-shared packing and an FSDP2 trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the bundled demo (model config, tokenizer, data and the script that generates the data) is a package of
    # its own, so that setuptools ships its files without treating an undeclared folder of modules as one
    packages=["fastpo", "fastpo.losses", "fastpo.kernels", "fastpo.assets", "fastpo.assets.demo"],
    package_dir={"fastpo.kernels": "kernels"},
    package_data={"fastpo.assets.demo": ["*.json", "*.jsonl"]},
    install_requires=[
        "torch>=2.9",
        "triton>=3.4",
        "transformers>=5.0",
        "datasets>=3.0",
        "peft>=0.13",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=5",
            "liger-kernel>=0.8.5",
            "trl>=1.16",
            "cut-cross-entropy>=25.1.1",
            "tensorboard",
            "matplotlib",
        ],
        "flash": ["flash-attn>=2.6"],
    },
)
