"""Functions that run inside spawned ranks (see multiproc.run_ranks); module-level so spawn can import them."""

import torch

from llama_mp import Llama

GLOO = dict(backend="gloo", device="cpu")


def build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, dtype="float32", seed=1):
    return Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed, dtype=dtype, **GLOO)


def logits_and_greedy(cases, tokenizer_path, prompts, steps):
    """For each checkpoint dir in `cases`: all-position logits of prompts[0] (rank 0) and greedy ids."""
    out = []
    for ckpt_dir in cases:
        llama = build(ckpt_dir, tokenizer_path)
        with torch.inference_mode():
            logits = llama.model(torch.tensor([prompts[0]]), 0, all_positions=True)  # None off rank 0
        ids, _ = llama.generate(prompts, steps, temperature=0.0)
        out.append((None if logits is None else logits[0].numpy(), ids))
    return out


def sampled(ckpt_dir, tokenizer_path, prompts, steps, seed):
    llama = build(ckpt_dir, tokenizer_path, seed=seed)
    ids, _ = llama.generate(prompts, steps, temperature=0.8, top_p=0.95)
    return ids
