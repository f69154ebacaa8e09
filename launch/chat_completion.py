"""torchrun entry point: chat completion over a Meta LLaMA checkpoint (see README).

    torchrun --nproc_per_node N launch/chat_completion.py --ckpt_dir DIR --tokenizer_path tokenizer.model ...

Also runs as one plain process: python launch/chat_completion.py ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llama_mp.cli.completion import chat_completion  # noqa: E402
from llama_mp.cli.runner import run  # noqa: E402

if __name__ == "__main__":
    run(chat_completion)
