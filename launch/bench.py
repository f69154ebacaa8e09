"""torchrun entry point: benchmark the decode path on N ranks (see `llama-mp bench --help`).

    torchrun --nproc_per_node 2 launch/bench.py --dim 288 --n_layers 6 --n_heads 6 --backend gloo
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from llama_mp.tools.bench import bench  # noqa: E402
from llama_mp.cli.runner import run  # noqa: E402

if __name__ == "__main__":
    run(bench)
