"""An independent LLaMA forward pass for checking the production model.

Plain torch on the whole (unsplit) state dict: no fairscale, no KV cache, no SDPA, rotary embeddings
with complex numbers instead of cos/sin tables, attention written out by hand. Deliberately shares no
code with llama_mp, so a mistake in the production path cannot hide in both; `reference_llama4_logits` is
Llama 4's (Meta's shipped tensor names: fused wqkv, stacked experts). Also an independent writer
of llama2.c's checkpoint format (`write_llama2c`), for the importer's tests.
"""

import math
import struct

import torch


def _rms(x, weight, eps):
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def _rotate(x, positions, theta, scale=None, many_turns=4.0):
    # x: [seq, heads, head_dim]; consecutive pairs are the real and imaginary parts.
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    if scale is not None:
        # Llama 3.1: a frequency that turns fewer than once in 8192 positions is slowed by `scale`, one that
        # turns more than `many_turns` (4) times is kept, and in between the two are mixed linearly in the
        # turn count (Llama 4's 1: nothing in between).
        turns = 8192 * inv_freq / (2 * math.pi)
        kept = ((turns - 1) / (many_turns - 1)).clamp(0, 1) if many_turns > 1 else (turns > 1).double()
        inv_freq = inv_freq * (kept + (1 - kept) / scale)
    angle = positions[:, None].double() * inv_freq[None, :]
    turn = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)  # [seq, half]
    as_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], half, 2))
    return torch.view_as_real(as_complex * turn[:, None, :]).reshape(x.shape)


def reference_logits(state, args, tokens):
    """Logits [seq, vocab] for one sequence of token ids (a list), float32, from the whole state dict."""
    sd = {k: v.float() for k, v in state.items()}
    n_kv = args.n_kv_heads or args.n_heads
    hd = args.dim // args.n_heads
    ids = torch.tensor(tokens)
    seq = len(tokens)
    pos = torch.arange(seq)
    x = sd["tok_embeddings.weight"][ids]
    future = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        h = _rms(x, sd[p + "attention_norm.weight"], args.norm_eps)
        q = (h @ sd[p + "attention.wq.weight"].T).view(seq, args.n_heads, hd)
        k = (h @ sd[p + "attention.wk.weight"].T).view(seq, n_kv, hd)
        v = (h @ sd[p + "attention.wv.weight"].T).view(seq, n_kv, hd)
        scale = args.rope_scale if args.use_scaled_rope else None
        q, k = _rotate(q, pos, args.rope_theta, scale), _rotate(k, pos, args.rope_theta, scale)
        group = args.n_heads // n_kv
        heads = []
        for head in range(args.n_heads):
            kv = head // group
            scores = q[:, head] @ k[:, kv].T / math.sqrt(hd) + future
            heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
        x = x + torch.cat(heads, dim=-1) @ sd[p + "attention.wo.weight"].T
        h = _rms(x, sd[p + "ffn_norm.weight"], args.norm_eps)
        gate = h @ sd[p + "feed_forward.w1.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return _rms(x, sd["norm.weight"], args.norm_eps) @ sd["output.weight"].T


def reference_llama4_logits(state, args, tokens):
    """Llama 4's logits [seq, vocab] for one sequence, from the whole state dict in Meta's shipped names: the
    issue's math written out (MoE: top-k of the router's logits, sigmoid of each scaling the expert's input,
    plus the shared expert; NoPE every nope_layer_interval-th layer with full attention and temperature
    tuning; RoPE layers attend within their chunk, qk-normed after the rotation)."""
    sd = {k: v.float() for k, v in state.items()}
    l4 = args.llama4
    n_kv, hd, dim = args.n_kv_heads or args.n_heads, args.dim // args.n_heads, args.dim
    seq = len(tokens)
    pos = torch.arange(seq)
    x = sd["tok_embeddings.weight"][torch.tensor(tokens)]
    causal = pos[None, :] <= pos[:, None]
    same_chunk = (pos[None, :] // l4.attention_chunk_size == pos[:, None] // l4.attention_chunk_size
                  if l4.attention_chunk_size else torch.ones(seq, seq, dtype=torch.bool))

    def weightless_rms(t):
        return t * torch.rsqrt((t * t).mean(dim=-1, keepdim=True) + args.norm_eps)

    def swiglu(h, w_gate, w_up, w_down):  # h @ w: w as [in, out]
        gate = h @ w_gate
        return (gate * torch.sigmoid(gate) * (h @ w_up)) @ w_down

    for i in range(args.n_layers):
        p = f"layers.{i}."
        nope = l4.nope_layer_interval is not None and (i + 1) % l4.nope_layer_interval == 0
        h = _rms(x, sd[p + "attention.wqkv.layer_norm_weight"], args.norm_eps)
        q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split([args.n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
        q, k, v = q.reshape(seq, args.n_heads, hd), k.reshape(seq, n_kv, hd), v.reshape(seq, n_kv, hd)
        if nope:
            mask = causal
            if l4.attn_temperature_tuning:
                q = q * (1 + l4.attn_scale * torch.log(1 + torch.floor((pos.float() + 1) / l4.floor_scale)))[:, None, None]
        else:
            mask = causal & same_chunk
            scale = args.rope_scale if args.use_scaled_rope else None
            q = _rotate(q, pos, args.rope_theta, scale, args.rope_high_freq_factor)
            k = _rotate(k, pos, args.rope_theta, scale, args.rope_high_freq_factor)
            if l4.use_qk_norm:
                q, k = weightless_rms(q), weightless_rms(k)
        heads = []
        for head in range(args.n_heads):
            kv = head // (args.n_heads // n_kv)
            scores = (q[:, head] @ k[:, kv].T / math.sqrt(hd)).masked_fill(~mask, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
        x = x + torch.cat(heads, dim=-1) @ sd[p + "attention.wo.weight"].T
        f = p + "feed_forward."
        if l4.num_experts is not None and (i + 1) % l4.interleave_moe_layer_step == 0:
            h = _rms(x, sd[f + "norm.weight"], args.norm_eps)
            e = l4.num_experts
            w_in = sd[f + "experts.moe_w_in_eD_F"].view(e, dim, -1)
            w_sw = sd[f + "experts.moe_w_swiglu_eD_F"].view(e, dim, -1)
            w_out = sd[f + "experts.moe_w_out_eF_D"].view(e, -1, dim)
            out = swiglu(h, sd[f + "w_in_shared_FD.weight"].T, sd[f + "w_swiglu_FD.weight"].T,
                         sd[f + "w_out_shared_DF.weight"].T)
            logits = h @ sd[f + "router_DE"]
            for t in range(seq):
                scores, chosen = logits[t].topk(l4.top_k)
                for score, expert in zip(scores, chosen.tolist()):
                    routed = h[t] * torch.sigmoid(score)
                    out[t] += swiglu(routed, w_in[expert], w_sw[expert], w_out[expert])
            x = x + out
        else:
            h = _rms(x, sd[f + "mlp.layer_norm_weight"], args.norm_eps)
            w1, w3 = sd[f + "mlp.fc1_weight"].chunk(2)
            x = x + swiglu(h, w1.T, w3.T, sd[f + "mlp.fc2_weight"].T)
    return _rms(x, sd["norm.weight"], args.norm_eps) @ sd["output.weight"].T


def reference_greedy(state, args, prompt, steps):
    """Greedy continuation by recomputing the whole sequence each step (no cache)."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(reference_logits(state, args, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def write_llama2c(path, state, n_heads, n_kv_heads, seq_len=32, shared=False):
    """A llama2.c version 0 file, following its format: 7 int32, then float32 arrays in a fixed order."""
    dim, vocab = state["tok_embeddings.weight"].shape[1], state["tok_embeddings.weight"].shape[0]
    hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    head = dim // n_heads
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head, 2, dtype=torch.float64) / head)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    arrays = [state["tok_embeddings.weight"]]
    for name in ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        arrays += [state[f"layers.{i}.{name}.weight"] for i in range(n_layers)]
    arrays += [state["norm.weight"], torch.cos(angles), torch.sin(angles)]
    if not shared:
        arrays.append(state["output.weight"])
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, n_layers, n_heads, n_kv_heads,
                            vocab if shared else -vocab, seq_len))
        for a in arrays:
            f.write(a.to(torch.float32).numpy().astype("<f4").tobytes())
