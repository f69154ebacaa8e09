"""torchrun entry point: chat in the terminal with a Meta LLaMA chat checkpoint (see README).

    torchrun --nproc_per_node N launch/chat.py --ckpt_dir DIR --tokenizer_path tokenizer.model [--system TEXT]

Rank 0 reads messages from stdin and streams answers to stdout. Also runs as one plain process:
python launch/chat.py ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llama_mp.cli.chat import chat  # noqa: E402
from llama_mp.cli.runner import run  # noqa: E402

if __name__ == "__main__":
    run(chat)
