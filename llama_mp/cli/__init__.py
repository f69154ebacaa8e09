"""Command lines: the one runner every entry point goes through (runner.py), the torchrun entry points
for text and chat completion (completion.py), and the `llama-mp` command (commands.py)."""

from .commands import main

__all__ = ["main"]
