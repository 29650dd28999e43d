"""Install compt; the Triton kernels folder is installed as ``compt.kernels``.

A PyPI package is called ``kernels`` (transformers probes for it), so the
top-level ``kernels/`` folder must never become an import name of its own.
"""
from setuptools import setup

setup(
    name="compt",
    version="0.1.0",
    description="Chain-of-Models Pre-Training (CoM-PT) on DeepSpeed",
    python_requires=">=3.10",
    packages=["compt", "compt.clip", "compt.commands", "compt.data", "compt.kernels", "compt.llama", "compt.text"],
    package_dir={"compt": "compt", "compt.kernels": "kernels"},
    package_data={"compt": ["chains/*.yaml"]},
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision",
        "deepspeed>=0.16",
        "open_clip_torch>=3.0",
        "safetensors>=0.4",
        "pydantic>=2",
        "pyyaml",
        "scikit-learn",
        "webdataset",
        "braceexpand",  # compt.data expands shard patterns itself
        "datasets",
        "tqdm",
        "rich",
        "matplotlib",
        "pillow",
        "transformers>=4.45",
        "tokenizers>=0.19",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["compt=compt.cli:main"]},
)
