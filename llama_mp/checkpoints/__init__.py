"""Checkpoints on disk: params.json (params.py), how tensors are split over shards (layout.py), Meta's
folders (meta.py), Hugging Face (hf.py) and llama2.c (llama2c.py) files, all-or-nothing output folders
(staging.py), and the tools built on them: reshard, verify, convert, synth."""
