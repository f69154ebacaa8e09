"""Hugging Face's Llama 4 (text) as Meta's Llama 4 layout, both ways, for `llama-mp convert` (hf.py asks here
for a family whose `Family.hf_format` names this module).

Hugging Face folders come two ways: `Llama4ForCausalLM` (model_type "llama4_text": the config is the text
model's, tensors `model.layers.N...`, `lm_head.weight`), which `convert --to hf` writes, and
`Llama4ForConditionalGeneration` (model_type "llama4", Meta's repositories on the Hub: the text model's
config under "text_config", its tensors under `language_model.`, beside a vision encoder this text-only
reader leaves alone).

How the tensors differ from Meta's (checkpoints/llama4.py), per layer:

* attention: q_proj, k_proj, v_proj are Meta's fused `wqkv` [q; k; v] cut in three; rows keep their order
  (transformers' Llama 4 rotates interleaved pairs, as Meta does, unlike its Llama);
* routed experts: `experts.gate_up_proj` [E, dim, 2F] is [w_in, w_swiglu] of each expert side by side
  (Meta's `moe_w_in_eD_F` and `moe_w_swiglu_eD_F` are [E*dim, F] each); `experts.down_proj` [E, F, dim]
  is `moe_w_out_eF_D` [E*F, dim]; the router `router.weight` [E, dim] is `router_DE` transposed;
* dense layers: gate_proj and up_proj are the halves of Meta's `mlp.fc1_weight` [w1; w3].

params.json cannot state every config.json: MoE layers must be every k-th layer and NoPE layers every
k-th layer (Meta's `interleave_moe_layer_step`, `nope_layer_interval`), rope must be plain or Meta's
Llama 4 scaling; the widths F and the dense FFN's are found as params fields (`ffn_fields`). A config
outside that is refused by name.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import LlamaMPError
from .hf import Join, common_config, same
from .llama4 import LLAMA4_ROPE_HIGH_FREQ_FACTOR, LLAMA4_ROPE_SCALE, LLAMA4_ROPE_THETA, Llama4Args, expert_hidden_dim
from .params import ModelArgs, ffn_field_choices, parse_params

# Where Llama4ForConditionalGeneration keeps the text model's tensors; Llama4ForCausalLM has none.
NAME_PREFIXES = ("", "language_model.")
TEXT_MODEL_TYPE = "llama4_text"

# transformers' Llama4TextConfig defaults, which apply to what a config.json leaves out (as transformers
# reads the file); the shape fields have none here, so a config without them is refused.
_DEFAULTS = {"num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "moe_layers": None,
             "no_rope_layers": None, "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "use_qk_norm": True,
             "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1, "rms_norm_eps": 1e-5,
             "hidden_act": "silu", "attention_bias": False, "layer_types": None}
_SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                 "intermediate_size_mlp")
# Meta's Llama 4 scaled rope as transformers names it (rope_type "llama3"): only the factor and the
# high-frequency factor are params.json fields; these are fixed in Meta's code (runtime/model.py).
_ROPE_FIXED = {"low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
# Meta's own choice (Scout, Maverick), tried before any other that gives the same widths.
_META_FFN = {"multiple_of": 2048, "ffn_dim_multiplier": 1.2, "ffn_exp": 4.0, "auto_scale_F": True}


def text_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The text model's config: `text_config` of a Llama4ForConditionalGeneration config, else the config."""
    inner = config.get("text_config")
    return inner if config.get("model_type") == "llama4" and isinstance(inner, dict) else config


def args_from_config(config: Dict[str, Any], where: str) -> ModelArgs:
    """Meta params for a transformers Llama 4 (text) config, refusing, all in one message, what Meta's
    params.json cannot state."""
    c = {**_DEFAULTS, **text_config(config)}
    missing = [name for name in _SHAPE_FIELDS if not isinstance(c.get(name), int) or isinstance(c.get(name), bool)]
    if missing:
        raise LlamaMPError(f"{where} has no integer {', '.join(missing)}; it is not a Llama 4 config.json.")
    problems: List[str] = []
    dim, n_layers, n_heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, dim // n_heads):
        problems.append(f"head_dim {c['head_dim']!r} (Meta's layout needs hidden_size / num_attention_heads = "
                        f"{dim // n_heads})")
    if c["hidden_act"] != "silu":
        problems.append(f"hidden_act {c['hidden_act']!r} (Llama 4's is silu)")
    if c["attention_bias"]:
        problems.append("attention_bias true (Meta's layout has no biases)")
    if config.get("quantization_config") or c.get("quantization_config"):
        problems.append("quantization_config (quantized weights, such as Maverick's FP8 experts; convert the "
                        "bfloat16 download)")
    # Values pass as they are: parse_params checks each one's type and range, naming the field.
    raw: Dict[str, Any] = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads,
                           "n_kv_heads": c.get("num_key_value_heads") or n_heads, "vocab_size": c["vocab_size"],
                           "norm_eps": c["rms_norm_eps"]}
    raw.update(_rope_fields(c, problems))
    moe_step = _every_kth("moe_layers", _moe_layers(c), n_layers, problems)
    nope = _no_rope_layers(c, n_layers, problems)
    nope_interval = _every_kth("no_rope_layers", nope, n_layers, problems) if nope is not None else None
    chunk = c["attention_chunk_size"]
    if c["layer_types"] is not None and nope is not None:
        expected = ["full_attention" if i in nope or chunk is None else "chunked_attention" for i in range(n_layers)]
        if list(c["layer_types"]) != expected:
            problems.append(f"layer_types {c['layer_types']!r:.80} (Llama 4's are chunked attention on the RoPE "
                            "layers and full attention on the NoPE ones)")
    if problems:
        raise LlamaMPError(f"{where} describes a Llama 4 that Meta's params.json cannot state: "
                           + "; ".join(problems) + ". llama_mp runs Llama 4 as Meta's checkpoints define it, so this "
                           "model cannot be converted.")
    if nope_interval:
        raw["nope_layer_interval"] = nope_interval
    if chunk is not None:
        raw["attention_chunk_size"] = chunk
    raw["use_qk_norm"] = bool(c["use_qk_norm"])
    if c["attn_temperature_tuning"]:  # transformers tests it for truth (older configs wrote 4)
        raw.update(attn_temperature_tuning=True, floor_scale=c["floor_scale"], attn_scale=c["attn_scale"])
    if moe_step:
        raw["moe_args"] = {"num_experts": c["num_local_experts"], "top_k": c["num_experts_per_tok"],
                           "interleave_moe_layer_step": moe_step, "capacity_factor": 1.0}
    raw.update(ffn_fields(raw, c["intermediate_size_mlp"], c["intermediate_size"],
                          dense=moe_step != 1, where=where))
    return parse_params(raw, where=where)


def _rope_fields(c: Dict[str, Any], problems: List[str]) -> Dict[str, Any]:
    rope = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}
    out = {"rope_theta": rope.get("rope_theta") or c.get("rope_theta") or LLAMA4_ROPE_THETA}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return out
    if kind != "llama3":
        problems.append(f"rope scaling {kind!r} (Llama 4 uses plain rope or Meta's scaling, rope_type 'llama3')")
        return out
    different = [f"{name} {rope.get(name)!r} (Meta's: {value:g})" for name, value in _ROPE_FIXED.items()
                 if rope.get(name, value) != value]
    factor, high = rope.get("factor"), rope.get("high_freq_factor", LLAMA4_ROPE_HIGH_FREQ_FACTOR)
    for name, value in (("factor", factor), ("high_freq_factor", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            different.append(f"{name} {value!r} (a positive number)")
    if different:
        problems.append("rope scaling 'llama3' with " + ", ".join(different))
        return out
    out["use_scaled_rope"] = True
    if float(factor) != LLAMA4_ROPE_SCALE:
        out["rope_scaling_factor"] = float(factor)
    if float(high) != LLAMA4_ROPE_HIGH_FREQ_FACTOR:
        out["rope_high_freq_factor"] = float(high)
    return out


def _moe_layers(c: Dict[str, Any]) -> List[int]:
    """The MoE layers' indices, as transformers derives them when the config lists none."""
    if c["moe_layers"] is not None:
        return list(c["moe_layers"])
    step = c["interleave_moe_layer_step"]
    return list(range(step - 1, c["num_hidden_layers"], step))


def _no_rope_layers(c: Dict[str, Any], n_layers: int, problems: List[str]) -> Optional[List[int]]:
    """The NoPE layers' indices from `no_rope_layers` (1: the layer uses rope), or transformers' default
    of every `no_rope_layer_interval`-th layer when the list is empty or absent."""
    flags = c["no_rope_layers"] or [int((i + 1) % c["no_rope_layer_interval"] != 0) for i in range(n_layers)]
    if len(flags) != n_layers:
        problems.append(f"no_rope_layers has {len(flags)} entries for {n_layers} layers")
        return None
    return [i for i, uses_rope in enumerate(flags) if not uses_rope]


def _every_kth(name: str, layers: List[int], n_layers: int, problems: List[str]) -> Optional[int]:
    """k where `layers` is every k-th layer (layers k-1, 2k-1, ...), None for no layer, or a problem."""
    if not layers:
        return None
    k = layers[0] + 1
    if layers != list(range(k - 1, n_layers, k)):
        problems.append(f"{name} {layers!r:.80} (params.json can state only every k-th layer)")
        return None
    return k


def ffn_fields(raw: Dict[str, Any], dense_width: int, expert_width: int, dense: bool, where: str) -> Dict[str, Any]:
    """`multiple_of`, `ffn_dim_multiplier`, `ffn_exp` (and moe_args' `auto_scale_F`, set in `raw`) with which
    Meta's formulas give the dense layers' width and the experts' F (`ModelArgs.ffn_hidden_dim`,
    `expert_hidden_dim`): Meta's own values where they fit, else the dense width's usual fields
    (`ffn_field_choices`) with the shortest `ffn_exp` that gives F. The dense width need not fit a model
    without dense layers (Scout), nor F one without experts."""
    dim, moe = raw["dim"], raw.get("moe_args")

    def fits(fields: Dict[str, Any]) -> bool:
        l4 = Llama4Args(num_experts=1 if moe else None, ffn_exp=fields.get("ffn_exp"),
                        auto_scale_F=fields.get("auto_scale_F", True))
        args = ModelArgs(dim=dim, n_layers=1, n_heads=1, multiple_of=fields["multiple_of"],
                         ffn_dim_multiplier=fields["ffn_dim_multiplier"], llama4=l4)
        return ((not dense or args.ffn_hidden_dim == dense_width)
                and (not moe or expert_hidden_dim(args) == expert_width))

    def with_experts(base: Dict[str, Any]):
        base = {"ffn_dim_multiplier": 1.0, **base}
        if not moe:
            yield base
            return
        for auto in (True, False):
            # F ~ 2/3 * ffn_exp * dim * multiplier (halved by auto_scale_F), rounded up to multiple_of
            guess = 3 * expert_width * (2 if auto else 1) / (2 * dim * base["ffn_dim_multiplier"])
            near = int(guess * dim)
            exact = [(t + 0.5) / dim for t in range(near - 8, near + 9)]  # int(exp * dim) == t
            for exp in [round(guess, digits) for digits in range(7)] + exact:
                if exp > 0:
                    yield {**base, "ffn_exp": exp, "auto_scale_F": auto}

    bases = list(ffn_field_choices(dim, dense_width))
    if not dense:  # any rounding F's width allows
        bases += [{"multiple_of": 1 << p} for p in range(expert_width.bit_length(), -1, -1)]
    for fields in [_META_FFN] + [f for base in bases for f in with_experts(base)]:
        if fits(fields):
            if moe:
                moe["auto_scale_F"] = fields["auto_scale_F"]
            return {k: v for k, v in fields.items() if k != "auto_scale_F"}
    raise LlamaMPError(f"{where}: no params.json fields give both the dense layers' width {dense_width} "
                       f"(intermediate_size_mlp) and the experts' {expert_width} (intermediate_size) for hidden_size "
                       f"{dim} by Meta's formulas, so this Llama 4 cannot be converted to Meta's layout.")


# ----------------------------------------------------------------------------------------------
# Tensors


def joins(args: ModelArgs) -> List[Join]:
    """How each Meta tensor is made of Hugging Face ones and back (hf.Join), whole tensors, Meta's order."""
    l4 = args.llama4
    q, kv, dim = args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.dim
    out = [Join(("tok_embeddings.weight",), ("model.embed_tokens.weight",), same, same)]
    for i in range(args.n_layers):
        m, p = f"layers.{i}.", f"model.layers.{i}."
        ff, hff = m + "feed_forward.", p + "feed_forward."
        out += [Join((m + "attention.wqkv.weight",), tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"),
                     lambda w: tuple(w.split([q, kv, kv])), lambda wq, wk, wv: (torch.cat([wq, wk, wv]),)),
                Join((m + "attention.wo.weight",), (p + "self_attn.o_proj.weight",), same, same),
                Join((m + "attention.wqkv.layer_norm_weight",), (p + "input_layernorm.weight",), same, same)]
        if l4.is_moe_layer(i):
            e, f = l4.num_experts, expert_hidden_dim(args)
            out += [Join((ff + "norm.weight",), (p + "post_attention_layernorm.weight",), same, same),
                    Join((ff + "router_DE",), (hff + "router.weight",), lambda w: (w.t(),), lambda w: (w.t(),)),
                    Join((ff + "experts.moe_w_in_eD_F", ff + "experts.moe_w_swiglu_eD_F"),
                         (hff + "experts.gate_up_proj",),
                         lambda w_in, w_sw: (torch.cat([w_in.view(e, dim, f), w_sw.view(e, dim, f)], dim=-1),),
                         lambda gate_up: tuple(half.reshape(e * dim, f) for half in gate_up.split([f, f], dim=-1))),
                    Join((ff + "experts.moe_w_out_eF_D",), (hff + "experts.down_proj",),
                         lambda w: (w.view(e, f, dim),), lambda w: (w.reshape(e * f, dim),))]
            out += [Join((ff + f"{meta}.weight",), (hff + f"shared_expert.{hf}_proj.weight",), same, same)
                    for meta, hf in (("w_in_shared_FD", "gate"), ("w_swiglu_FD", "up"), ("w_out_shared_DF", "down"))]
        else:
            out += [Join((ff + "mlp.layer_norm_weight",), (p + "post_attention_layernorm.weight",), same, same),
                    Join((ff + "mlp.fc1_weight",), (hff + "gate_proj.weight", hff + "up_proj.weight"),
                         lambda w: tuple(w.chunk(2)), lambda w1, w3: (torch.cat([w1, w3]),)),
                    Join((ff + "mlp.fc2_weight",), (hff + "down_proj.weight",), same, same)]
    return out + [Join(("norm.weight",), ("model.norm.weight",), same, same),
                  Join(("output.weight",), ("lm_head.weight",), same, same)]


# ----------------------------------------------------------------------------------------------
# config.json


def hf_config(args: ModelArgs, dtype: torch.dtype, max_position_embeddings: Optional[int],
              tie_word_embeddings: bool, special_ids: Tuple[int, List[int]]) -> Dict[str, Any]:
    """config.json of `Llama4ForCausalLM` (model_type "llama4_text"), rope given both ways (transformers 4.x
    and 5), every layer list stated."""
    l4 = args.llama4
    if l4.floor_scale != int(l4.floor_scale):
        raise LlamaMPError(f"This Llama 4's floor_scale {l4.floor_scale:g} is not a whole number, which transformers' "
                           "Llama4TextConfig requires (an int); it cannot be written as a Hugging Face folder.")
    rope: Dict[str, Any] = {"rope_type": "default"}
    if args.use_scaled_rope:
        rope = {"rope_type": "llama3", "factor": args.rope_scale, "high_freq_factor": args.rope_high_freq_factor,
                **_ROPE_FIXED}
    moe_layers = [i for i in range(args.n_layers) if l4.is_moe_layer(i)]
    config = {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": TEXT_MODEL_TYPE,
        **common_config(args, dtype, tie_word_embeddings, special_ids),
        "intermediate_size": expert_hidden_dim(args) if l4.num_experts is not None else args.ffn_hidden_dim,
        "intermediate_size_mlp": args.ffn_hidden_dim,
        "rope_parameters": {**rope, "rope_theta": args.rope_theta},
        "num_local_experts": l4.num_experts or 1,
        "num_experts_per_tok": l4.top_k,
        "interleave_moe_layer_step": l4.interleave_moe_layer_step,
        "moe_layers": moe_layers,
        "no_rope_layers": [int(not l4.is_nope_layer(i)) for i in range(args.n_layers)],
        "attention_chunk_size": l4.attention_chunk_size,
        "use_qk_norm": l4.use_qk_norm,
        "attn_temperature_tuning": l4.attn_temperature_tuning,
        "floor_scale": int(l4.floor_scale),
        "attn_scale": l4.attn_scale,
        "max_position_embeddings": max_position_embeddings or args.max_context or 4096 * 32,
        "pad_token_id": None,
    }
    if args.use_scaled_rope:
        config["rope_scaling"] = rope
    return config
