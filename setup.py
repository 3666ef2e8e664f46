from setuptools import find_packages, setup

setup(
    name="megajoy",
    version="0.1.0",
    description="Megatron-style 3D-parallel training for JoyAI-LLM-Flash-class MoE models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megajoy", "megajoy.*"]),
    install_requires=[
        # Install torch first (`pip install torch==2.13.0` on CPU): a bare `torch` requirement
        # resolved on its own pulls a multi-GB CUDA build.
        "torch>=2.6",
        "numpy",
        "megatron-core>=0.16.1",
        "safetensors",
        "tokenizers",
        "tqdm",
        "pyyaml",
        "tensorboard",
    ],
    extras_require={
        "hf": ["transformers>=5.0"],
        "gguf": ["gguf>=0.17"],
        "gpu": ["nvidia-ml-py", "triton"],  # the CUDA torch wheels bring a matching Triton already
        "plot": ["matplotlib"],
        "te": ["transformer-engine[pytorch]"],
        "test": ["pytest", "transformers>=5.0", "gguf>=0.17", "matplotlib", "compressed-tensors", "trl==1.16.0",
                 # Triton's interpreter runs the GPU kernels on CPU in the tests (the version torch 2.11's
                 # CUDA wheels pin)
                 "triton==3.6.0",
                 # TorchTitan's DeepSeek-V3, a training-step baseline (benchmarks/torchtitan_baseline.py)
                 "torchtitan==0.2.2"],
    },
    entry_points={"console_scripts": ["megajoy=megajoy.cli:main"]},
)
