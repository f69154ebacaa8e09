"""torchrun entry point: the OpenAI-compatible server (see README "Server" and `llama-mp serve --help`).

    torchrun --nproc_per_node N launch/serve.py --ckpt_dir DIR --tokenizer_path tokenizer.model [--port 8000]

Rank 0 answers HTTP on --host:--port; every rank computes. Also runs as one plain process:
python launch/serve.py ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llama_mp.server.command import serve  # noqa: E402
from llama_mp.cli.runner import run  # noqa: E402

if __name__ == "__main__":
    run(serve)
