"""Tiny Llama 4 checkpoints and transformers' Llama4ForCausalLM on the same weights, for tests/test_llama4.py
(module-level, so spawned ranks can import the workers)."""

import contextlib

import numpy as np
import torch

from llama_mp.checkpoints.llama4 import expert_hidden_dim
from llama_mp.checkpoints.params import parse_params

# 8 heads sharing 4 kv heads (1, 2 or 4 ranks). 4 layers: 0 RoPE + dense, 1 RoPE + MoE, 2 NoPE + dense,
# 3 RoPE + MoE; chunks of 8 positions; qk norm; temperature tuning from position 3 on (floor_scale 4); top-2
# of 32 experts (F = 48), dense FFN 176. In float32 on a CPU every MoE call groups its pairs by expert
# (rows of D = 64 and F/N = 48, 24 or 12 values: 256, 192, 96 or 48 bytes, multiples of 16 on 1, 2 and 4
# ranks); without grouping, decoding 3 rows gathers 6 chosen experts and a prompt runs every expert.
TINY_LLAMA4 = {
    "dim": 64, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 16, "ffn_dim_multiplier": 1.0,
    "ffn_exp": 2.0, "norm_eps": 1e-5, "rope_theta": 500000.0,
    "moe_args": {"num_experts": 32, "top_k": 2, "interleave_moe_layer_step": 2, "capacity_factor": 1.0,
                 "auto_scale_F": True},
    "nope_layer_interval": 3, "attention_chunk_size": 8, "use_qk_norm": True,
    "attn_temperature_tuning": True, "floor_scale": 4.0, "attn_scale": 0.5,
}


@contextlib.contextmanager
def one_thread():
    """Tiny shapes run ~10x faster on one thread than on a shared machine's contended cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def moe_paths():
    """Counts the routed experts' calls by path while it is open, in this process: {"grouped": pairs grouped
    by expert (torch._grouped_mm), "gathered": gathered experts, "every": every expert on every token}.
    (The MoE's methods are wrapped, not torch._grouped_mm: dynamo records torch's functions when it first
    compiles, and would take a wrapper for torch's own.)"""
    from llama_mp.runtime.llama4 import MoE

    counts = {"grouped": 0, "gathered": 0, "every": 0}
    grouped, experts = MoE._grouped, MoE._experts

    def counted_grouped(self, *args):
        counts["grouped"] += 1
        return grouped(self, *args)

    def counted_experts(self, routed_in, which):
        counts["every" if which is None else "gathered"] += 1
        return experts(self, routed_in, which)

    MoE._grouped, MoE._experts = counted_grouped, counted_experts
    try:
        yield counts
    finally:
        MoE._grouped, MoE._experts = grouped, experts


def with_moe_paths(fn, *args):
    """(fn(*args), the MoE paths it took on this rank), for run_ranks."""
    with moe_paths() as counts:
        out = fn(*args)
    return out, counts


def only_grouped(counts):
    return counts["grouped"] > 0 and counts["gathered"] == counts["every"] == 0


def tiny_args(vocab_size, **changes):
    return parse_params({**TINY_LLAMA4, "vocab_size": vocab_size, **changes}, where="test params")


def hf_rope(args):
    """transformers' rope parameters of the model: plain, or Meta's Llama 4 scaling (Scout: factor 16,
    high- and low-frequency factors 1, over an original context of 8192)."""
    if not args.use_scaled_rope:
        return {"rope_type": "default", "rope_theta": args.rope_theta}
    return {"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": args.rope_scale, "low_freq_factor": 1.0,
            "high_freq_factor": args.rope_high_freq_factor, "original_max_position_embeddings": 8192}


def hf_model(args, state):
    """transformers' Llama4ForCausalLM (float32, text) holding the whole-model state dict `state` (Meta's names)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    l4 = args.llama4
    f, h, hd = expert_hidden_dim(args), args.ffn_hidden_dim, args.head_dim
    moe_layers = [i for i in range(args.n_layers) if l4.is_moe_layer(i)]
    config = Llama4TextConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=f, intermediate_size_mlp=h,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        head_dim=hd, rms_norm_eps=args.norm_eps, num_experts_per_tok=l4.top_k, num_local_experts=l4.num_experts,
        moe_layers=moe_layers, interleave_moe_layer_step=l4.interleave_moe_layer_step, use_qk_norm=l4.use_qk_norm,
        no_rope_layers=[int(not l4.is_nope_layer(i)) for i in range(args.n_layers)],
        attention_chunk_size=l4.attention_chunk_size, attn_temperature_tuning=l4.attn_temperature_tuning,
        floor_scale=int(l4.floor_scale), attn_scale=l4.attn_scale, max_position_embeddings=256,
        rope_parameters=hf_rope(args), tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None)
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    q, kv = args.n_heads * hd, args.kv_heads * hd
    e = l4.num_experts
    for i in range(args.n_layers):
        m, p = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = state[m + "attention.wqkv.weight"].split([q, kv, kv])
        hf.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": state[m + "attention.wo.weight"],
                   p + "input_layernorm.weight": state[m + "attention.wqkv.layer_norm_weight"]})
        ff = m + "feed_forward."
        if l4.is_moe_layer(i):
            w_in = state[ff + "experts.moe_w_in_eD_F"].view(e, args.dim, f)
            w_sw = state[ff + "experts.moe_w_swiglu_eD_F"].view(e, args.dim, f)
            hf.update({p + "post_attention_layernorm.weight": state[ff + "norm.weight"],
                       p + "feed_forward.router.weight": state[ff + "router_DE"].t(),
                       p + "feed_forward.experts.gate_up_proj": torch.cat([w_in, w_sw], dim=-1),
                       p + "feed_forward.experts.down_proj": state[ff + "experts.moe_w_out_eF_D"].view(e, f, args.dim),
                       p + "feed_forward.shared_expert.gate_proj.weight": state[ff + "w_in_shared_FD.weight"],
                       p + "feed_forward.shared_expert.up_proj.weight": state[ff + "w_swiglu_FD.weight"],
                       p + "feed_forward.shared_expert.down_proj.weight": state[ff + "w_out_shared_DF.weight"]})
        else:
            w1, w3 = state[ff + "mlp.fc1_weight"].chunk(2)
            hf.update({p + "post_attention_layernorm.weight": state[ff + "mlp.layer_norm_weight"],
                       p + "feed_forward.gate_proj.weight": w1, p + "feed_forward.up_proj.weight": w3,
                       p + "feed_forward.down_proj.weight": state[ff + "mlp.fc2_weight"]})
    model = Llama4ForCausalLM(config)
    model.load_state_dict({k: v.contiguous() for k, v in hf.items()}, strict=True)
    return model.float().eval()


def hf_logits_and_greedy(model, prompt, steps):
    """All-position logits of `prompt` [len, vocab] and `steps` greedy ids, each from a whole forward pass
    (no cache: the mask alone decides what a position sees)."""
    with torch.no_grad(), one_thread():
        logits = model(torch.tensor([prompt])).logits[0]
        ids = list(prompt)
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return logits.numpy(), ids[len(prompt):]


def logits_and_greedy(cases, tokenizer_path, prompts, steps, max_seq_len=64):
    """For each (checkpoint dir, decoder[, --quantize mode]) in `cases`: rank 0's all-position logits of
    prompts[0] (None on the other ranks), greedy ids of all prompts and seeded samples of them."""
    from workers import build

    out = []
    with one_thread():
        for ckpt_dir, decoder, *quantize in cases:
            llama = build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=len(prompts),
                          decoder=decoder, quantize=quantize[0] if quantize else None)
            with torch.inference_mode():
                logits = llama.model(torch.tensor([prompts[0]]), 0, all_positions=True)
            ids, _ = llama.generate(prompts, steps, temperature=0.0)
            sampled, _ = llama.generate(prompts, steps, temperature=0.8, top_p=0.95)  # seed 1 (build's)
            out.append((None if logits is None else logits[0].numpy(), ids, sampled))
    return out


def greedy_in_slots(ckpt_dir, tokenizer_path, prompts, slots, steps, decoder, max_batch_size=3, max_seq_len=64):
    """Greedy ids of each prompt as the server's batch loop decodes them: prompt i prefilled into cache row
    slots[i] on its own, then every row one token per call at its own position (scattered rows)."""
    from workers import build

    with one_thread(), torch.inference_mode():
        llama = build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size, decoder=decoder)
        model, ids = llama.model, []
        for prompt, slot in zip(prompts, slots):
            ids.append([int(model.greedy_next(model.hidden_in_slot(torch.tensor([prompt]), slot))[0])])
        for _ in range(steps - 1):
            tokens = torch.tensor([[row[-1]] for row in ids])
            positions = torch.tensor([len(p) + len(row) - 1 for p, row in zip(prompts, ids)])
            chosen = model.greedy_next(model.hidden_rows(tokens, torch.tensor(slots), positions))
            for row, t in zip(ids, chosen.tolist()):
                row.append(t)
    return ids


def until_stop(ids, stops):
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def check_against_reference(results, reference, stops):
    """`logits_and_greedy`'s results against (reference logits of prompts[0], reference greedy ids): logits
    within 1e-4 (float32), the same ids up to the first stop."""
    ref_logits, ref_ids = reference
    for logits, ids, _ in results:
        if logits is not None:
            np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)
        assert ids == [until_stop(r, stops) for r in ref_ids]
