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


PROMPTS = ["The quick brown fox", "Once upon a time there was", "Model parallel"]


def prompt_ids(tokenizer_path):
    from llama_mp.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    return [tok.encode(p, bos=True, eos=False) for p in PROMPTS]


def greedy_ids(ckpt_dirs, tokenizer_path, max_gen_len=12):
    """For each checkpoint: greedy continuations of PROMPTS (checkpoints that should hold one model)."""
    out = []
    for ckpt_dir in ckpt_dirs:
        llama = build(ckpt_dir, tokenizer_path, max_batch_size=len(PROMPTS))
        prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
        ids, _ = llama.generate(prompts, max_gen_len=max_gen_len, temperature=0)
        out.append(ids)
    return out


def sampled(ckpt_dir, tokenizer_path, prompts, steps, seed):
    llama = build(ckpt_dir, tokenizer_path, seed=seed)
    ids, _ = llama.generate(prompts, steps, temperature=0.8, top_p=0.95)
    return ids


def collective_results(rounds):
    """Sums and argmaxes over the ranks, and whether the shared-memory exchange carried them."""
    from llama_mp import collectives, distributed

    env = distributed.setup("gloo", "cpu")
    sums = [collectives.all_sum(torch.full((1, 1, 8), float(env.rank + 1) * (i + 1))) for i in range(rounds)]
    logits = torch.zeros(2, 4)
    logits[0, 1] = 5.0  # row 0: every rank ties on its second id -> the lowest global id wins
    logits[1, env.rank] = float(env.rank)  # row 1: the last rank holds the maximum
    argmax = collectives.global_argmax(logits, vocab_offset=4 * env.rank)
    big = collectives.all_sum(torch.ones(1 << 17))  # over the exchange's slot size: gloo's path
    gathered = [collectives.gather_last_dim_to_main(torch.full((2, n), float(env.rank))) for n in (3, 1 << 16)]
    gathered = [None if g is None else (tuple(g.shape), g[0].tolist()[:1] + g[1].tolist()[-1:]) for g in gathered]
    tokens = [collectives.broadcast_from_main_(torch.full((3,), env.rank + 10 * i)).tolist() for i in range(3)]
    tokens.append(collectives.broadcast_from_main_(torch.full((1 << 16,), env.rank + 7))[-2:].tolist())  # gloo's path
    return (collectives._exchange is not None, [s.flatten().tolist() for s in sums], argmax.tolist(), float(big[0]),
            gathered, tokens)
