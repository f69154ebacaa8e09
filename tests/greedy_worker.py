"""A rank function for `run_ranks`: greedy token ids of several checkpoints, built one after another.

Used by the resharding and conversion tests to compare checkpoints that should hold the same model.
"""

from typing import List, Sequence, Tuple

PROMPTS = ["The quick brown fox", "Once upon a time there was", "Model parallel"]


def greedy_ids(ckpt_dirs: Sequence[str], tokenizer_path: str, max_gen_len: int = 12) -> List[List[List[int]]]:
    """For each checkpoint: greedy continuations (temperature 0, gloo on CPU) of PROMPTS, as token ids."""
    from llama_mp.generation import Llama

    out = []
    for ckpt_dir in ckpt_dirs:
        llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=len(PROMPTS),
                            backend="gloo", device="cpu", dtype="float32")
        prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
        ids, _ = llama.generate(prompts, max_gen_len=max_gen_len, temperature=0)
        out.append(ids)
    return out


def prompt_ids(tokenizer_path: str) -> List[List[int]]:
    from llama_mp.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    return [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
