import glob

from setuptools import find_packages, setup

setup(
    name="llama_mp",
    version="0.1.0",
    description="Model-parallel LLaMA inference over Meta checkpoints, launched with torchrun",
    packages=find_packages(include=["llama_mp", "llama_mp.*"]),
    package_data={"llama_mp": ["kernels/csrc/*.c"]},  # compiled on first use (llama_mp/kernels/cpu.py)
    python_requires=">=3.9",
    install_requires=["torch>=2.5", "fairscale", "sentencepiece", "tiktoken", "fire", "tqdm", "safetensors", "numpy"],
    # prometheus_client: the Prometheus project's own client, for the server's GET /metrics
    extras_require={"test": ["pytest", "hypothesis", "transformers", "safetensors", "openai", "httpx", "fastapi",
                             "uvicorn[standard]", "prometheus_client", "llguidance", "jsonschema",
                             # tests/test_lm_eval.py drives the server with lm-eval (its `api` extra: the HTTP client)
                             "lm-eval[api]==0.4.13"],
                    "server": ["fastapi", "uvicorn[standard]", "prometheus_client", "llguidance"]},
    data_files=[("share/llama_mp/configs", glob.glob("configs/*.json"))],
    entry_points={"console_scripts": ["llama-mp=llama_mp.cli:main"]},
)
