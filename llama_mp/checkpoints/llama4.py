"""Llama 4 (Scout 17B-16E, Maverick 17B-128E, text): everything in which its checkpoints differ from
Llama 1/2/3, in one place. params.py asks here for the fields, layout.py (as families/llama4.py's
Family.layout) and meta.py for the layout once they know the family (`ModelArgs.llama4` is set).

* params.json: Meta's Llama 4 fields (`moe_args`, `nope_layer_interval`, `attention_chunk_size`,
  `use_qk_norm`, `use_scaled_rope` with Meta's Llama 4 defaults, `attn_temperature_tuning` /
  `floor_scale` / `attn_scale`, `ffn_exp`; `vision_args`, whose weights are skipped) parsed strictly
  into `Llama4Args` (`parse_fields`), with Meta's defaults for what a file leaves out.
* The layout of Meta's shards (fairscale splits, `consolidated.NN.pth`), per layer:
  `attention.wqkv.weight` fused [q; k; v] *of each shard* (the whole tensor is [q; k; v] of the whole
  model, each of the three split on its own: `segments`), `attention.wo.weight` (row-parallel),
  `attention.wqkv.layer_norm_weight`; MoE layers `feed_forward.norm.weight`, `feed_forward.router_DE`
  [dim, E] (replicated), the routed experts `feed_forward.experts.moe_w_in_eD_F` / `moe_w_swiglu_eD_F`
  [E*dim, F] (split along F) and `moe_w_out_eF_D` [E*F, dim] (split along F *inside every expert*), the
  shared expert `feed_forward.w_in_shared_FD.weight` / `w_swiglu_FD.weight` [F, dim] and
  `w_out_shared_DF.weight` [dim, F]; dense layers (Maverick's every other layer)
  `feed_forward.mlp.fc1_weight` ([w1; w3] of each shard), `feed_forward.mlp.fc2_weight` and
  `feed_forward.mlp.layer_norm_weight`; the embedding and output split by vocabulary rows.
  The shards also hold non-tensor `_extra_state` entries (io.BytesIO) and gate statistics that inference
  never reads: meta.load_shard drops the first, `IGNORED_LAYER_NAMES` the second (and layout.py the
  vision encoder's weights). Meta's unfused names (its model's parameter names: `experts.w1`, `wq`...)
  are read as the shipped ones (`fused_names`).
* Quantized (`args.scheme`): the same tensors with every linear layer as integers, the routed experts
  included (stacks of [in, out] matrices quantized expert by expert, quant/experts.py), each followed
  by its scales (`QUANTIZED_LINEARS`, `SCALES_NAMES`); router, norms and embedding stay float.
* The model's own names for the tensors whose checkpoint names are not `<module>.weight`
  (`MODEL_NAMES`): the runtime (runtime/llama4.py) holds the norms as attention_norm / ffn_norm, like
  every other family, and the experts and mlp matrices as `<name>.weight`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

LLAMA4_VOCAB = 202048          # 200000 BPE tokens + 2048 special tokens
LLAMA4_ROPE_THETA = 500000.0   # Meta's default in models/llama4/args.py
# Meta's scaled rope for Llama 4 (only Scout uses it): not in params.json, fixed in Meta's code.
LLAMA4_ROPE_SCALE = 16.0
LLAMA4_ROPE_HIGH_FREQ_FACTOR = 1.0

# The params.json fields only Llama 4 has (Meta's models/llama4/args.py), and those of moe_args.
FIELDS = ("moe_args", "nope_layer_interval", "attention_chunk_size", "use_qk_norm", "attn_temperature_tuning",
          "floor_scale", "attn_scale", "ffn_exp", "rope_high_freq_factor", "vision_args", "head_dim",
          "quantization_args", "lora_args")
MOE_FIELDS = ("num_experts", "top_k", "interleave_moe_layer_step", "capacity_factor", "auto_scale_F")


@dataclass(frozen=True)
class Llama4Args:
    """The Llama 4 fields of a params.json. `num_experts` None: no MoE layer (a dense Llama 4)."""

    num_experts: Optional[int] = None
    top_k: int = 1
    interleave_moe_layer_step: int = 1
    capacity_factor: float = 1.0
    auto_scale_F: bool = True  # noqa: N815 - Meta's name
    ffn_exp: Optional[float] = None
    nope_layer_interval: Optional[int] = None
    attention_chunk_size: Optional[int] = None
    use_qk_norm: bool = False
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    rope_high_freq_factor: Optional[float] = None
    has_vision: bool = False  # vision_args were given (their weights are skipped: text only)

    def is_moe_layer(self, index: int) -> bool:
        return self.num_experts is not None and (index + 1) % self.interleave_moe_layer_step == 0

    def is_nope_layer(self, index: int) -> bool:
        """NoPE layers (every nope_layer_interval-th) have no rotary embedding and full causal attention."""
        return self.nope_layer_interval is not None and (index + 1) % self.nope_layer_interval == 0

    def to_json_fields(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.num_experts is not None:
            out["moe_args"] = {"num_experts": self.num_experts, "top_k": self.top_k,
                               "interleave_moe_layer_step": self.interleave_moe_layer_step,
                               "capacity_factor": self.capacity_factor, "auto_scale_F": self.auto_scale_F}
        for name in ("ffn_exp", "nope_layer_interval", "attention_chunk_size", "rope_high_freq_factor"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["use_qk_norm"] = self.use_qk_norm
        if self.attn_temperature_tuning:
            out.update(attn_temperature_tuning=True, floor_scale=self.floor_scale, attn_scale=self.attn_scale)
        return out


def is_llama4(raw: Dict[str, Any]) -> bool:
    """Whether a params.json dict is Llama 4's: it has a field only Llama 4 has, or its vocabulary."""
    return any(name in raw for name in FIELDS) or raw.get("vocab_size") == LLAMA4_VOCAB


def _positive_int(name: str, value: Any, problems: List[str]) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value > 2 ** 31 - 1:
        problems.append(f"{name} must be a positive integer, got {value!r:.60}")
        return None
    return value


def _positive_float(name: str, value: Any, problems: List[str]) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{name} must be a number, got {value!r:.60}")
        return None
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and number > 0):
        problems.append(f"{name} must be a positive finite number, got {value!r:.60}")
        return None
    return number


def _bool(name: str, value: Any, problems: List[str]) -> Optional[bool]:
    if not isinstance(value, bool):
        problems.append(f"{name} must be true or false, got {value!r:.60}")
        return None
    return value


def parse_fields(raw: Dict[str, Any], core: Dict[str, Any]) -> Tuple[Optional[Llama4Args], List[str]]:
    """(Llama4Args, problems) from the Llama 4 fields of params.json `raw`; `core` holds the fields every
    family has, already checked (dim, n_heads, ...), for the checks that need them."""
    problems: List[str] = []
    values: Dict[str, Any] = {}
    moe = raw.get("moe_args")
    if moe is not None:
        if not isinstance(moe, dict):
            problems.append(f"moe_args must be an object such as {{\"num_experts\": 16, \"top_k\": 1}}, "
                            f"got {moe!r:.60}")
        else:
            unknown = sorted(set(moe) - set(MOE_FIELDS))
            if unknown:
                problems.append(f"moe_args has unknown field(s) {unknown} (Llama 4's are {list(MOE_FIELDS)})")
            for name in ("num_experts", "top_k", "interleave_moe_layer_step"):
                if name in moe:
                    values[name] = _positive_int(f"moe_args.{name}", moe[name], problems)
            if "num_experts" not in moe:
                problems.append("moe_args has no num_experts")
            if "capacity_factor" in moe:
                values["capacity_factor"] = _positive_float("moe_args.capacity_factor", moe["capacity_factor"],
                                                            problems)
            if "auto_scale_F" in moe:
                values["auto_scale_F"] = _bool("moe_args.auto_scale_F", moe["auto_scale_F"], problems)
    for name in ("nope_layer_interval", "attention_chunk_size"):
        if raw.get(name) is not None:
            values[name] = _positive_int(name, raw[name], problems)
    for name in ("use_qk_norm", "attn_temperature_tuning"):
        if name in raw:
            values[name] = _bool(name, raw[name], problems)
    for name in ("floor_scale", "attn_scale", "ffn_exp", "rope_high_freq_factor"):
        if raw.get(name) is not None:
            values[name] = _positive_float(name, raw[name], problems)
    if raw.get("quantization_args") is not None:
        problems.append(f"quantization_args {raw['quantization_args']!r:.80} says the weights are quantized by Meta "
                        "(Maverick's FP8 experts with fp8_scales_*.pt, or int4), which llama_mp cannot read yet; "
                        "use the bfloat16 download of the same model")
    if raw.get("lora_args") is not None:
        problems.append("lora_args is set, and llama_mp runs no LoRA adapters; use a merged checkpoint")
    vision = raw.get("vision_args")
    if vision is not None and not isinstance(vision, dict):
        problems.append(f"vision_args must be an object, got {vision!r:.60}")
    values["has_vision"] = isinstance(vision, dict)
    if raw.get("head_dim") is not None and core.get("dim") and core.get("n_heads"):
        if raw["head_dim"] != core["dim"] // core["n_heads"]:
            problems.append(f"head_dim {raw['head_dim']!r:.20} is not dim / n_heads = {core['dim'] // core['n_heads']} "
                            "(llama_mp runs Llama 4 with head_dim = dim / n_heads, as Meta's text model does)")
    if problems:
        return None, problems
    args = Llama4Args(**{k: v for k, v in values.items() if v is not None})
    if args.num_experts is not None:
        if args.top_k > args.num_experts:
            problems.append(f"moe_args.top_k {args.top_k} is more than num_experts {args.num_experts}")
        if args.ffn_exp is None:
            problems.append("moe_args is given but ffn_exp is not (the experts' width is ffn_exp * dim, rounded as "
                            "Meta's code rounds it)")
        elif core.get("ffn_dim_multiplier") is None:
            problems.append("moe_args is given but ffn_dim_multiplier is not (Meta's MoE width needs it)")
    return args, problems


# ----------------------------------------------------------------------------------------------
# Shapes and layout


def expert_hidden_dim(args) -> int:
    """The width F of every routed expert and of the shared expert, as Meta's moe.py computes it:
    int(ffn_exp * dim), 2/3 of it, times ffn_dim_multiplier, divided by capacity_factor + 1 when
    auto_scale_F, rounded up to a multiple of multiple_of (Scout: 8192)."""
    l4 = args.llama4
    hidden = int(l4.ffn_exp * args.dim)
    hidden = int(2 * hidden / 3)
    hidden = int(args.ffn_dim_multiplier * hidden)
    if l4.auto_scale_F:
        hidden = int(hidden / (l4.capacity_factor + 1))
    return hidden + (-hidden % args.multiple_of)


# Split dimension of each tensor (None: replicated); keys inside a layer without "layers.N.".
SPLIT_DIMS = {
    "tok_embeddings.weight": 0,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wqkv.weight": 0,
    "attention.wo.weight": 1,
    "attention.wqkv.layer_norm_weight": None,
    "feed_forward.norm.weight": None,
    "feed_forward.router_DE": None,
    "feed_forward.experts.moe_w_in_eD_F": 1,
    "feed_forward.experts.moe_w_swiglu_eD_F": 1,
    "feed_forward.experts.moe_w_out_eF_D": 0,
    "feed_forward.w_in_shared_FD.weight": 0,
    "feed_forward.w_swiglu_FD.weight": 0,
    "feed_forward.w_out_shared_DF.weight": 1,
    "feed_forward.mlp.fc1_weight": 0,
    "feed_forward.mlp.fc2_weight": 1,
    "feed_forward.mlp.layer_norm_weight": None,
}
# Tensors of Meta's Llama 4 shards that inference does not read (router statistics of training).
IGNORED_LAYER_NAMES = frozenset({"feed_forward.global_gate_stats_3E", "feed_forward.running_gate_stats_3E",
                                 "feed_forward.expert_activation_DE"})
# The model's name (runtime/llama4.py) of each tensor whose checkpoint name differs.
MODEL_NAMES = {
    "attention.wqkv.layer_norm_weight": "attention_norm.weight",
    "feed_forward.norm.weight": "ffn_norm.weight",
    "feed_forward.mlp.layer_norm_weight": "ffn_norm.weight",
    "feed_forward.router_DE": "feed_forward.router_DE.weight",
    "feed_forward.experts.moe_w_in_eD_F": "feed_forward.experts.moe_w_in_eD_F.weight",
    "feed_forward.experts.moe_w_swiglu_eD_F": "feed_forward.experts.moe_w_swiglu_eD_F.weight",
    "feed_forward.experts.moe_w_out_eF_D": "feed_forward.experts.moe_w_out_eF_D.weight",
    "feed_forward.mlp.fc1_weight": "feed_forward.mlp.fc1.weight",
    "feed_forward.mlp.fc2_weight": "feed_forward.mlp.fc2.weight",
}


# Quantized (args.scheme): every linear layer of every transformer layer, the routed experts included, as
# layout.py says; the router, the norms and the embedding stay float. Beside each quantized weight its
# scales, under the model's name of the weight with `.scales` for `.weight` (`mlp.fc1.scales` for
# `mlp.fc1_weight`, `experts.moe_w_in_eD_F.scales`). The routed experts are stacks of [in, out] matrices,
# quantized expert by expert along each one's own inputs (quant/experts.py).
_EXPERTS = ("feed_forward.experts.moe_w_in_eD_F", "feed_forward.experts.moe_w_swiglu_eD_F",
            "feed_forward.experts.moe_w_out_eF_D")
QUANTIZED_LINEARS = ("attention.wqkv.weight", "attention.wo.weight", "feed_forward.mlp.fc1_weight",
                     "feed_forward.mlp.fc2_weight", "feed_forward.w_in_shared_FD.weight",
                     "feed_forward.w_swiglu_FD.weight", "feed_forward.w_out_shared_DF.weight") + _EXPERTS
SCALES_NAMES = {name: MODEL_NAMES.get(name, name)[:-len(".weight")] + ".scales" for name in QUANTIZED_LINEARS}


def stacked_experts(name: str, args) -> Optional[int]:
    """E for the routed experts' weights (stacks of E [in, out] matrices), None for any other tensor."""
    return args.llama4.num_experts if name in _EXPERTS else None


def quantized_inputs(args) -> List[Tuple[str, int]]:
    """(what, length) of the inputs of the quantized matrices, which int4 groups cut: dim (wqkv, wo, fc1, the
    experts' w_in and w_swiglu), the dense FFN width (fc2) and the experts' width F (w_out, shared and routed).
    The last three are split over ranks too, so each rank's slice of them must be whole groups (`splits`)."""
    rows = [("dim", args.dim)]
    if any(not args.llama4.is_moe_layer(i) for i in range(args.n_layers)):
        rows.append(("dense FFN width", args.ffn_hidden_dim))
    if args.llama4.num_experts is not None:
        rows.append(("experts' width F", expert_hidden_dim(args)))
    return rows


def segments(name: str, args) -> Optional[List[int]]:
    """For a tensor made of parts that are each split on their own along its split dim, the parts'
    sizes in the whole tensor (shard i holds part 0's i-th piece, then part 1's, ...); else None. The
    scales of a fused matrix split as its rows; a quantized expert stack's rows per expert are its
    stored ones (int4: half the inputs, or one scale row per group)."""
    from ..quant import experts as quantized_experts

    hd = args.head_dim
    weight = next((w for w, scales in SCALES_NAMES.items() if scales == name), name)
    if weight == "attention.wqkv.weight":
        return [args.n_heads * hd, args.kv_heads * hd, args.kv_heads * hd]
    if weight == "feed_forward.mlp.fc1_weight":
        return [args.ffn_hidden_dim] * 2
    if weight == "feed_forward.experts.moe_w_out_eF_D":
        rows = expert_hidden_dim(args)  # each expert's inputs: its rows of the float stack
        if args.scheme is not None and name != weight:
            rows = quantized_experts.scale_shape(args.scheme, 1, rows, 1)[0]
        elif args.scheme is not None:
            rows = quantized_experts.weight_shape(args.scheme, rows, 1)[0]
        return [rows] * args.llama4.num_experts
    return None


def full_shapes(args) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor of the whole (unsplit) Llama 4 text model as float weights, in Meta's key order
    (layout.full_shapes gives a quantized model's from them)."""
    d, hd, l4 = args.dim, args.head_dim, args.llama4
    shapes: Dict[str, Tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wqkv.weight"] = ((args.n_heads + 2 * args.kv_heads) * hd, d)
        shapes[p + "attention.wo.weight"] = (d, args.n_heads * hd)
        shapes[p + "attention.wqkv.layer_norm_weight"] = (d,)
        if l4.is_moe_layer(i):
            e, f = l4.num_experts, expert_hidden_dim(args)
            shapes.update({
                p + "feed_forward.norm.weight": (d,),
                p + "feed_forward.router_DE": (d, e),
                p + "feed_forward.experts.moe_w_in_eD_F": (e * d, f),
                p + "feed_forward.experts.moe_w_out_eF_D": (e * f, d),
                p + "feed_forward.experts.moe_w_swiglu_eD_F": (e * d, f),
                p + "feed_forward.w_in_shared_FD.weight": (f, d),
                p + "feed_forward.w_out_shared_DF.weight": (d, f),
                p + "feed_forward.w_swiglu_FD.weight": (f, d),
            })
        else:
            h = args.ffn_hidden_dim
            shapes.update({
                p + "feed_forward.mlp.fc1_weight": (2 * h, d),
                p + "feed_forward.mlp.fc2_weight": (d, h),
                p + "feed_forward.mlp.layer_norm_weight": (d,),
            })
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (args.vocab_size, d)
    return shapes


def shape_summary(shapes: Dict[str, Tuple[int, ...]], args) -> List[str]:
    """The plain cause of a shard's shape problems, where it is the experts: params.json's moe_args and
    the shards' routers (router_DE [dim, E]) disagree on how many experts there are, or whether any."""
    routers = {k: s for k, s in shapes.items() if k.endswith(".feed_forward.router_DE")}
    said = args.llama4.num_experts
    if not routers:
        return [f"params.json says moe_args.num_experts {said}, but the shard has no MoE layer (no router_DE)"] \
            if said is not None else []
    key, shape = next(iter(sorted(routers.items())))
    if said is None:
        return [f"params.json has no moe_args, but the shard has MoE layers ({key} is {list(shape)})"]
    if len(shape) == 2 and shape[1] != said:
        return [f"params.json says moe_args.num_experts {said}, but the shard's routers choose among {shape[1]} "
                f"experts ({key} is {list(shape)})"]
    return []


# Meta's unfused names (its model's own parameter names, which its load hooks accept too) and the shipped
# name each stands for; the fused ones are joined per shard, and the experts' [E, D, F] tensors viewed as
# [E * D, F] (a view: no copy).
_UNFUSED_EXPERTS = {"feed_forward.experts.w1": "feed_forward.experts.moe_w_in_eD_F",
                    "feed_forward.experts.w3": "feed_forward.experts.moe_w_swiglu_eD_F",
                    "feed_forward.experts.w2": "feed_forward.experts.moe_w_out_eF_D"}
_UNFUSED_RENAMED = {"attention_norm.weight": "attention.wqkv.layer_norm_weight",
                    "feed_forward.shared_expert.w1.weight": "feed_forward.w_in_shared_FD.weight",
                    "feed_forward.shared_expert.w3.weight": "feed_forward.w_swiglu_FD.weight",
                    "feed_forward.shared_expert.w2.weight": "feed_forward.w_out_shared_DF.weight",
                    "feed_forward.w2.weight": "feed_forward.mlp.fc2_weight"}
_UNFUSED_JOINED = {"attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
                   "feed_forward.mlp.fc1_weight": ("feed_forward.w1.weight", "feed_forward.w3.weight")}


def has_unfused_names(sd) -> bool:
    """Whether a shard uses Meta's unfused Llama 4 names: its MoE layers' experts as `experts.w1` [E, D, F]."""
    return any(isinstance(k, str) and k.endswith(".feed_forward.experts.w1") for k in sd)


def fused_names(sd):
    """A shard in Meta's unfused names as the shipped layout names it (wq, wk, wv joined into wqkv and w1, w3
    into mlp.fc1_weight, both per shard as Meta's checkpoints hold them; every other tensor a view)."""
    import re

    import torch

    out, by_layer = {}, {}
    for key, t in sd.items():
        m = re.match(r"^layers\.(\d+)\.(.+)$", key)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            out[key] = t
    for i, names in sorted(by_layer.items()):
        p, moe = f"layers.{i}.", "feed_forward.experts.w1" in names
        used = set()
        for fused, parts in _UNFUSED_JOINED.items():
            if all(part in names for part in parts):
                out[p + fused] = torch.cat([names[part] for part in parts])
                used.update(parts)
        for name, t in names.items():
            if name in used:
                continue
            if name in _UNFUSED_EXPERTS:
                out[p + _UNFUSED_EXPERTS[name]] = t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t
            elif name == "ffn_norm.weight":
                out[p + ("feed_forward.norm.weight" if moe else "feed_forward.mlp.layer_norm_weight")] = t
            else:
                out[p + _UNFUSED_RENAMED.get(name, name)] = t
    return out


def split_rules(args) -> List[Tuple[str, int]]:
    """(what, size) of everything a rank or shard count must divide."""
    rules = [("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("dim", args.dim)]
    if any(not args.llama4.is_moe_layer(i) for i in range(args.n_layers)):
        rules.append(("the dense FFN width", args.ffn_hidden_dim))
    if args.llama4.num_experts is not None:
        rules.append(("the experts' width F", expert_hidden_dim(args)))
    if args.vocab_size > 0:
        rules.append(("the vocabulary", args.vocab_size))
    return rules


def _group_size(args) -> int:
    return args.scheme.group_size if args.scheme is not None and args.scheme.mode == "int4" else 1


def splits(args, n: int) -> bool:
    """Whether `n` ranks or shards split this Llama 4 evenly: every query and kv head, the embedding,
    the vocabulary, the dense FFN and every expert's F (each holds F/n of every expert, as Meta's
    shards do). Unlike Llama 2/3, kv heads are never replicated over more ranks than there are. With
    int4 weights each slice of the split inputs (`quantized_inputs`) must also be whole groups."""
    group = _group_size(args)
    return (1 <= n <= args.n_heads and all(size % n == 0 for _, size in split_rules(args))
            and all(size % n == 0 and (size // n) % group == 0 for _, size in quantized_inputs(args)))


def split_message(args, count, subject: str, unit: str, valid: List[int], advice: str) -> str:
    rules = ", ".join(f"{what} {size}" for what, size in split_rules(args))
    plural = "es" if unit == "process" else "s"
    group = _group_size(args)
    groups = "" if group == 1 else (
        f"; with int4 weights in groups of {group}, each {unit}'s slice of the "
        + ", ".join(f"{what} {size}" for what, size in quantized_inputs(args)) + " must also be whole groups")
    return (f"{subject}, a Llama 4 model ({rules}), cannot be split over {count!r} {unit}{plural}: each of those "
            f"must divide evenly by the count (every {unit} holds its slice of every expert, as Meta's shards do)"
            f"{groups}. Valid {unit} counts: {valid}.{advice}")


def split_tensor(tensor, dim: int, segs: List[int], parts: int, part: int):
    """Piece `part` of `parts` of a segmented tensor (see `segments`): each segment's piece, joined."""
    import torch

    return torch.cat([s.chunk(parts, dim=dim)[part] for s in tensor.split(segs, dim=dim)], dim=dim)


def merge_tensors(shards, dim: int, segs: List[int]):
    """Inverse of `split_tensor` over all pieces in order."""
    import torch

    n = len(shards)
    per_shard = [s // n for s in segs]
    cut = [t.split(per_shard, dim=dim) for t in shards]
    return torch.cat([torch.cat([c[j] for c in cut], dim=dim) for j in range(len(segs))], dim=dim)


def describe(args) -> str:
    """One line for logs: "Llama 4 MoE (16 experts, top 1, every layer; NoPE every 4th; chunks of 8192)"."""
    l4 = args.llama4
    parts = []
    if l4.num_experts is not None:
        step = "every layer" if l4.interleave_moe_layer_step == 1 else f"every {l4.interleave_moe_layer_step}th layer"
        parts.append(f"{l4.num_experts} experts, top {l4.top_k}, {step}")
    if l4.nope_layer_interval:
        parts.append(f"NoPE every {l4.nope_layer_interval}th layer")
    if l4.attention_chunk_size:
        parts.append(f"chunks of {l4.attention_chunk_size}")
    return "Llama 4" + (f" ({'; '.join(parts)})" if parts else "")


def with_defaults(values: Dict[str, Any], raw: Dict[str, Any]) -> Dict[str, Any]:
    """Meta's Llama 4 defaults for the common fields a Llama 4 params.json may leave out."""
    out = dict(values)
    if "rope_theta" not in raw:
        out["rope_theta"] = LLAMA4_ROPE_THETA
    return out


def replace(l4: Llama4Args, **changes) -> Llama4Args:
    return dataclasses.replace(l4, **changes)
