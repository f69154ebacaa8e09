"""Functions that run inside spawned ranks (see multiproc.run_ranks); module-level so spawn can import them."""

import torch

from llama_mp import Llama

GLOO = dict(backend="gloo", device="cpu")


def build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, dtype="float32", seed=1, decoder="auto",
          quantize=None):
    return Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed, dtype=dtype,
                       decoder=decoder_of(decoder), quantize=quantize, **GLOO)


def decoder_of(spec):
    """A --decoder name, or "gpu:NAME": decoder NAME as a GPU gets it (float matrices [out, in] for
    F.linear, not the CPU's [in, out]), run here on the CPU."""
    if spec.startswith("gpu:"):
        from llama_mp.runtime.decode import choose_decoder

        return choose_decoder(spec[len("gpu:"):], torch.device("cuda"), torch.float32)
    return spec


def prefill_and_step_logits(ckpt_dir, tokenizer_path, prompt, decoders, dtype, steps=3):
    """For each decoder: rank 0's float32 logits [len, vocab] of `prompt` in `dtype` (None on the other
    ranks), those of its last `steps` positions from one decode step each, the others from a prefill."""
    out = []
    for decoder in decoders:
        model = build(ckpt_dir, tokenizer_path, dtype=dtype, decoder=decoder).model
        start = len(prompt) - steps
        with torch.inference_mode():
            parts = [model.logits(model.hidden(torch.tensor([prompt[:start]]), 0, all_positions=True))]
            parts += [model.logits(model.hidden(torch.tensor([[prompt[pos]]]), pos)) for pos in range(start, len(prompt))]
        out.append(None if parts[0] is None else torch.cat(parts, dim=1)[0].numpy())
    return out


def logits_and_greedy(cases, tokenizer_path, prompts, steps, decoder="auto"):
    """For each checkpoint dir in `cases`: all-position logits of prompts[0] (rank 0) and greedy ids."""
    out = []
    for ckpt_dir in cases:
        llama = build(ckpt_dir, tokenizer_path, decoder=decoder)
        with torch.inference_mode():
            logits = llama.model(torch.tensor([prompts[0]]), 0, all_positions=True)  # None off rank 0
        ids, _ = llama.generate(prompts, steps, temperature=0.0)
        out.append((None if logits is None else logits[0].numpy(), ids))
    return out


def logits_and_greedy_with_each(cases, tokenizer_path, prompts, steps, decoders):
    """`logits_and_greedy` with each decoder in turn: one job instead of one per decoder."""
    return [logits_and_greedy(cases, tokenizer_path, prompts, steps, decoder) for decoder in decoders]


PROMPTS = ["The quick brown fox", "Once upon a time there was", "Model parallel"]


def prompt_ids(tokenizer_path):
    from llama_mp.runtime.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    return [tok.encode(p, bos=True, eos=False) for p in PROMPTS]


def greedy_ids(ckpt_dirs, tokenizer_path, max_gen_len=12, decoder="auto"):
    """For each checkpoint: greedy continuations of PROMPTS (checkpoints that should hold one model)."""
    out = []
    for ckpt_dir in ckpt_dirs:
        llama = build(ckpt_dir, tokenizer_path, max_batch_size=len(PROMPTS), decoder=decoder)
        prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
        ids, _ = llama.generate(prompts, max_gen_len=max_gen_len, temperature=0)
        out.append(ids)
    return out


def sampled(ckpt_dir, tokenizer_path, prompts, steps, seed, decoder="auto"):
    llama = build(ckpt_dir, tokenizer_path, seed=seed, decoder=decoder)
    ids, _ = llama.generate(prompts, steps, temperature=0.8, top_p=0.95)
    return ids


def greedy_after_the_callers_own_setup(ckpt_dir, tokenizer_path):
    """What Meta's scripts do: start torch.distributed and fairscale's model-parallel group, then build."""
    from fairscale.nn.model_parallel import initialize as mpu

    torch.distributed.init_process_group("gloo")
    mpu.initialize_model_parallel(torch.distributed.get_world_size())
    return greedy_ids([ckpt_dir], tokenizer_path)


def collective_results(rounds):
    """Sums and argmaxes over the ranks, and whether the shared-memory exchange carried them."""
    from llama_mp import distributed

    group = distributed.setup("gloo", "cpu")
    comm, rank = group.collectives, group.rank
    sums = [comm.all_sum(torch.full((1, 1, 8), float(rank + 1) * (i + 1))) for i in range(rounds)]
    logits = torch.zeros(2, 4)
    logits[0, 1] = 5.0  # row 0: every rank ties on its second id -> the lowest global id wins
    logits[1, rank] = float(rank)  # row 1: the last rank holds the maximum
    argmax = comm.global_argmax(logits, vocab_offset=4 * rank)
    big = comm.all_sum(torch.ones(1 << 17))  # over the exchange's slot size: gloo's path
    gathered = [comm.gather_last_dim_to_main(torch.full((2, n), float(rank))) for n in (3, 1 << 16)]
    gathered = [None if g is None else (tuple(g.shape), g[0].tolist()[:1] + g[1].tolist()[-1:]) for g in gathered]
    tokens = [comm.broadcast_from_main_(torch.full((3,), rank + 10 * i)).tolist() for i in range(3)]
    tokens.append(comm.broadcast_from_main_(torch.full((1 << 16,), rank + 7))[-2:].tolist())  # gloo's path
    return (comm.exchange is not None, [s.flatten().tolist() for s in sums], argmax.tolist(), float(big[0]),
            gathered, tokens)


def served_by_rank_0(ckpt_dir, tokenizer_path):
    """Rank 0 takes requests (two, then a bad one); the other ranks wait in the engine's serve loop and
    run whatever it sends, until it stops them."""
    from llama_mp.errors import LlamaMPError

    llama = build(ckpt_dir, tokenizer_path, max_batch_size=len(PROMPTS))
    if not llama.group.is_main:
        llama.engine.serve()
        return "served"
    answers = [llama.text_completion(PROMPTS, max_gen_len=6, temperature=0),
               llama.chat_completion([[{"role": "user", "content": PROMPTS[0]}]], max_gen_len=3, temperature=0)]
    try:
        llama.text_completion(PROMPTS * 2, max_gen_len=6)  # more prompts than max_batch_size
    except LlamaMPError as e:
        answers.append(str(e).split(" but ")[0])
    llama.engine.stop()
    return answers


def generated_ids_and_text(ckpt_dir, tokenizer_path, steps=24):
    """Greedy and sampled ids of PROMPTS, and the greedy texts (which decoding every id needs)."""
    llama = build(ckpt_dir, tokenizer_path, max_batch_size=len(PROMPTS))
    greedy = llama.text_completion(PROMPTS, max_gen_len=steps, temperature=0)
    sampled_ids, _ = llama.generate(prompt_ids(tokenizer_path), steps, temperature=1.0, top_p=1.0)
    return [g["token_ids"] for g in greedy] + sampled_ids, [g["generation"] for g in greedy]


def perplexity_report(ckpt_dir, tokenizer_path, text_path, window, stride, max_seq_len=64, per_token=None,
                      compare=None, **build_options):
    """`tools.perplexity.perplexity` on every rank: the report (rank 0) or None."""
    from llama_mp.tools.perplexity import perplexity

    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, 1, dtype="float32", **GLOO, **build_options)
    return perplexity(llama, text_path, window, stride, per_token, compare)
