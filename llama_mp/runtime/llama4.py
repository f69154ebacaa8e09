"""Llama 4's model pieces, used by model.py's one pass (`Transformer.step`) for a model whose params say
Llama 4 (`ModelArgs.llama4`; its checkpoint layout is checkpoints/llama4.py's).

* Layers: every `nope_layer_interval`-th layer has no rotary embedding (NoPE) and full causal attention;
  the others rotate q and k, attend within blocks of `attention_chunk_size` positions (chunked causal
  attention, at decode too, as transformers does) and, with `use_qk_norm`, normalise q and k after
  rope (RMSNorm without a weight). With `attn_temperature_tuning`, NoPE layers scale q by
  1 + attn_scale * log(1 + floor((position + 1) / floor_scale)) (`query_scale`).
* Feed-forward: MoE layers (every `interleave_moe_layer_step`-th) route each token to the top_k experts
  of the router's logits, scale the expert's *input* by the sigmoid of its logit (no renormalisation),
  run SwiGLU experts and add the shared expert; each rank holds F/N of every expert (Meta's shards), so
  the ranks' partial outputs meet in one sum per layer, as in a dense FFN. Other layers are a dense
  SwiGLU FFN stored as Meta's `mlp.fc1_weight` ([w1; w3] of each shard) and `mlp.fc2_weight`.

Routing needs no host read. Where `grouped_mm_runs` says torch's grouped GEMM runs (float experts; on a
CPU eagerly in float32, bfloat16 or float16; on GPUs of compute capability 9.x or 10.x, H100, H200,
B200, in bfloat16; traced by torch.compile in bfloat16 only), every call, a decode step or a prompt chunk, sorts its (token, choice)
pairs by expert and multiplies each chosen expert's slice once by all of its pairs
(`torch._grouped_mm`); an expert no pair chose is a group of 0 rows, which reads nothing. Elsewhere a call
with at most E / 3 pairs (decoding a few rows) gathers the chosen experts' slices (a copy per pair) and
multiplies by them, and a longer one runs every expert on every token with the unchosen ones' inputs
scaled by 0 (exactly Meta's reference), which costs E / top_k times the routed FLOPs. No path has
data-dependent shapes.

Quantized (`--quantize`, or a quantized folder): attention, the dense layers and the shared expert are the
decoder's quantized projections, like any family's; the routed experts keep their integers and scales in
the stored layout (quant/experts.py) and each call multiplies by the dequantised matrices of the experts
it reads (the chosen ones when it gathers, else all), `DEQUANTIZED_VALUES` float values of one matrix at
a time at most: correct everywhere, fast nowhere, like the portable dense path; they are never grouped.
The router stays float.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.llama4 import Llama4Args
from ..checkpoints.params import ModelArgs
from ..distributed.collectives import Collectives
from ..quant import experts as quantized_experts
from ..quant.scheme import Scheme
from .model import FeedForward, LayerKind, StepInputs, Weight, swiglu

if TYPE_CHECKING:
    from .decode import Decoder

# The most values of one routed matrix dequantised at once (whole experts, one at least): 64 MiB in float32.
DEQUANTIZED_VALUES = 1 << 24
_EXPERT_NAMES = ("moe_w_in_eD_F", "moe_w_swiglu_eD_F", "moe_w_out_eF_D")


def dequantized_bytes(args: ModelArgs, ranks: int, dtype_size: int) -> int:
    """Working memory of a quantized MoE call on one of `ranks` ranks (for footprint.py): one block of
    dequantised experts (`DEQUANTIZED_VALUES` per matrix, or one whole expert's slice if larger), for each
    of the three matrices, in float32 on the way and in the activation dtype; 0 without routed experts."""
    from ..checkpoints.llama4 import expert_hidden_dim

    if args.llama4.num_experts is None:
        return 0
    per_expert = args.dim * expert_hidden_dim(args) // ranks
    return 3 * max(DEQUANTIZED_VALUES, per_expert) * (4 + dtype_size)


def grouped_mm_runs(dtype: torch.dtype, device: torch.device, row_sizes, groups: int, traced: bool) -> bool:
    """Whether `torch._grouped_mm` multiplies rows [pairs, K] sorted into `groups` groups by stacks
    [groups, K, N] on `device` in `dtype` with no host read, for products whose K and N are `row_sizes`,
    eagerly or (`traced`) inside a torch.compile trace. What PyTorch accepts (torch 2.13's CPU build, tried;
    for CUDA its source, aten/src/ATen/native: GroupedMMUtils.h, cuda/GroupedBlas.cpp `_grouped_mm_cuda`,
    cuda/GroupMM.cu, as stored at pytorch/pytorch 00d4eaf; not run on a GPU here):
    - every matrix's row stride a multiple of 16 bytes (`check_valid_strides_and_return_transposed`, on
      the CPU too); the matrices here are row-major, the stacks Meta's layout viewed as [E, K, N];
    - CPU: float32, bfloat16 or float16, a loop of one mm per group over offsets already in host memory;
    - CUDA: bfloat16 on compute capability 9.x or 10.x (`_scaled_mm_allowed_device(sm90_only, sm100_only)`)
      takes the CUTLASS kernel, which reads the offsets on the device, for fewer than 1024 groups; any
      other dtype or GPU takes `_grouped_mm_fallback`, which copies the offsets to the host (a sync per
      call), so not here. Data pointers must be 16-byte aligned there: the stacks are whole parameters and
      the rows fresh tensors, which the caching allocator aligns. ROCm's kernel depends on its build: not used;
    - traced: the meta registration (torch/_meta_registrations.py, `_meta_grouped_mm_common`) accepts
      bfloat16 only, so a compiled float32 step keeps the other paths."""
    if any(n * dtype.itemsize % 16 for n in row_sizes):
        return False
    if traced and dtype != torch.bfloat16:
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda" and torch.version.hip is None:
        return (dtype == torch.bfloat16 and groups < 1024
                and torch.cuda.get_device_capability(device)[0] in (9, 10))
    return False


def layer_kind(args: ModelArgs, index: int) -> LayerKind:
    l4 = args.llama4
    nope = l4.is_nope_layer(index)
    return LayerKind(rope=not nope, chunked=not nope and l4.attention_chunk_size is not None,
                     qk_norm=l4.use_qk_norm and not nope, temperature=nope and l4.attn_temperature_tuning)


def query_scale(l4: Llama4Args, positions: torch.Tensor) -> Optional[torch.Tensor]:
    """[rows or 1, seq, 1, 1] float32 factors for the queries of NoPE layers at `positions` (temperature
    tuning), or None without it. Made on the positions' device, once per step."""
    if not l4.attn_temperature_tuning:
        return None
    scale = torch.log1p(torch.floor((positions.float() + 1.0) / l4.floor_scale)) * l4.attn_scale + 1.0
    return scale[:, :, None, None]


def feed_forward(args: ModelArgs, shapes, prefix: str, comm: Collectives, index: int) -> nn.Module:
    return MoE(args, shapes, prefix, comm) if args.llama4.is_moe_layer(index) else DenseMLP(shapes, prefix, comm)


class DenseMLP(FeedForward):
    """A dense layer of Llama 4: Meta's `mlp.fc1_weight` holds this rank's [w1; w3], which is the fused
    gate-and-up projection as it is; `mlp.fc2_weight` is w2. The math is FeedForward's."""

    def __init__(self, shapes, prefix: str, comm: Collectives):
        nn.Module.__init__(self)
        self.mlp = nn.Module()
        self.mlp.fc1 = Weight(shapes[prefix + "mlp.fc1.weight"])
        self.mlp.fc2 = Weight(shapes[prefix + "mlp.fc2.weight"])
        self.comm = comm
        self.gate_up = self.down = None

    def materialize(self, decoder: "Decoder", dtype: torch.dtype, device: torch.device,
                    scheme: Optional[Scheme] = None) -> None:
        self.gate_up = decoder.projection([self.mlp.fc1], dtype, device, scheme)
        self.down = decoder.projection([self.mlp.fc2], dtype, device, scheme)


class MoE(nn.Module):
    """A mixture-of-experts layer of this rank: the router (replicated), its F/N slice of every routed
    expert, in Meta's stored layout (`experts.moe_w_in_eD_F` [E*dim, F/N], `moe_w_swiglu_eD_F` likewise,
    `moe_w_out_eF_D` [E*F/N, dim]; quantized: integers and `scales` as quant/experts.py stores them), and
    of the shared expert."""

    routes_rows = True  # a row that carries no sequence must not add experts to a step (forward)

    def __init__(self, args: ModelArgs, shapes, prefix: str, comm: Collectives):
        super().__init__()
        self.num_experts, self.top_k, self.comm = args.llama4.num_experts, args.llama4.top_k, comm
        self.router_DE = Weight(shapes[prefix + "router_DE.weight"])
        self.experts = nn.Module()
        for name in _EXPERT_NAMES:
            setattr(self.experts, name, Weight(shapes[prefix + f"experts.{name}.weight"]))
        self.w_in_shared_FD, self.w_swiglu_FD, self.w_out_shared_DF = (
            Weight(shapes[prefix + f"{name}.weight"]) for name in ("w_in_shared_FD", "w_swiglu_FD", "w_out_shared_DF"))
        self.shared_gate_up = self.shared_down = None
        self.scheme: Optional[Scheme] = None  # how the routed experts are stored (None: in the model dtype)
        self.values_per_expert = 0
        # Whether a call groups its pairs by expert (torch._grouped_mm), eagerly and inside a compiled step
        # (indexed by torch.compiler.is_compiling()), and whether this model's decode steps are compiled.
        self.grouped = (False, False)
        self.steps_traced = False

    def materialize(self, decoder: "Decoder", dtype: torch.dtype, device: torch.device,
                    scheme: Optional[Scheme] = None) -> None:
        self.shared_gate_up = decoder.projection([self.w_in_shared_FD, self.w_swiglu_FD], dtype, device, scheme)
        self.shared_down = decoder.projection([self.w_out_shared_DF], dtype, device, scheme)
        self.router_DE.weight = nn.Parameter(torch.empty(self.router_DE.weight.shape, dtype=dtype, device=device),
                                             requires_grad=False)
        self.scheme = scheme
        dim, e = self.router_DE.weight.shape[0], self.num_experts
        row_sizes = (dim, self.experts.moe_w_out_eF_D.weight.shape[0] // e)  # D and F/N
        self.grouped = tuple(scheme is None and grouped_mm_runs(dtype, device, row_sizes, e, traced)
                             for traced in (False, True))
        self.steps_traced = decoder.traces_steps
        for name in _EXPERT_NAMES:
            holder = getattr(self.experts, name)
            rows, cols = holder.weight.shape
            self.values_per_expert = rows * cols // self.num_experts  # of this rank's slice of one matrix
            if scheme is None:
                holder.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device), requires_grad=False)
                continue
            holder.weight = nn.Parameter(torch.empty(quantized_experts.weight_shape(scheme, rows, cols),
                                                     dtype=scheme.weight_dtype, device=device), requires_grad=False)
            holder.scales = nn.Parameter(torch.empty(quantized_experts.scale_shape(scheme, self.num_experts, rows, cols),
                                                     dtype=scheme.scale_dtype, device=device), requires_grad=False)

    def gathers(self, pairs: int) -> bool:
        """Whether a call with `pairs` (token, choice) pairs reads only the chosen experts: gathering copies
        each chosen slice and reads it again, cheaper than reading every expert's slice while 3 * pairs <= E."""
        return 3 * pairs <= self.num_experts

    def unread_bytes(self, rows: int) -> int:
        """Bytes of routed-expert weights that a decode step of `rows` rows leaves unread, at least (the
        step's path decides): grouped, it reads each chosen expert once, at most min(E, rows * top_k) of
        them; gathering, one slice per (row, choice) pair, rows * top_k; otherwise every expert."""
        pairs, e = rows * self.top_k, self.num_experts
        if self.grouped[self.steps_traced]:
            read = min(e, pairs)
        else:
            read = pairs if self.gathers(pairs) else e
        size = sum(t.numel() * t.element_size() for name in _EXPERT_NAMES
                   for t in getattr(self.experts, name).parameters())  # weights, and scales if quantized
        return size * (e - read) // e

    def forward(self, x: torch.Tensor, at: Optional[StepInputs] = None) -> torch.Tensor:
        shape, dim, e = x.shape, x.shape[-1], self.num_experts
        tokens = x.reshape(-1, dim)                                                   # [a, D]
        scores, chosen = torch.topk(tokens @ self.router_DE.weight, self.top_k, dim=-1)  # [a, k]
        gates = torch.sigmoid(scores.float()).to(x.dtype)
        if at is not None and at.live is not None:
            chosen, gates = self._idle_rows_follow_a_live_one(chosen, gates, at.live, shape[1])
        out = swiglu(self.shared_gate_up, self.shared_down, tokens)
        if self.grouped[torch.compiler.is_compiling()]:  # each chosen expert read once, by all its pairs
            out = out + self._grouped(tokens, chosen, gates)
        elif self.gathers(chosen.numel()):  # few tokens (decoding): only the chosen experts' slices are read
            routed_in = (tokens[:, None, :] * gates[..., None]).reshape(-1, 1, dim)   # [a*k, 1, D]
            out = out + self._experts(routed_in, chosen.reshape(-1)).view(tokens.shape[0], -1, dim).sum(dim=1)
        else:  # every expert on every token, the unchosen ones' inputs scaled by 0
            weights = torch.zeros(tokens.shape[0], e, dtype=x.dtype, device=x.device).scatter_(1, chosen, gates)
            routed_in = weights.t()[:, :, None] * tokens[None]                          # [E, a, D]
            out = out + self._experts(routed_in, None).sum(dim=0)
        return self.comm.all_sum(out.view(shape))

    @staticmethod
    def _idle_rows_follow_a_live_one(chosen: torch.Tensor, gates: torch.Tensor, live: torch.Tensor, seq: int):
        """(chosen, gates) with the tokens of rows that carry no sequence (`live` [rows] False: they only fill
        a static step's shapes) sent to a live token's experts with gate 0: they add rows to groups that
        are read anyway, never an expert of their own, and their outputs (which nothing reads) are 0."""
        live_tokens = live[:, None].expand(-1, seq).reshape(-1, 1)                    # [a, 1]
        first_live = torch.argmax(live_tokens[:, 0].to(torch.int32)).reshape(1)      # a tensor index: no host read
        lead = chosen.index_select(0, first_live)                                     # [1, k]: a live token's
        return torch.where(live_tokens, chosen, lead), torch.where(live_tokens, gates, torch.zeros_like(gates))

    def _grouped(self, tokens: torch.Tensor, chosen: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """[a, D]: each token's routed experts, summed. The a*k (token, choice) pairs are sorted by expert
        on the device and each expert's group of rows is multiplied by its slice (torch._grouped_mm;
        `offs` holds where each group ends, so an expert no pair chose is an empty group)."""
        e, k = self.num_experts, self.top_k
        expert_of_pair = chosen.reshape(-1)                                           # [a*k]
        order = torch.argsort(expert_of_pair, stable=True)
        counts = torch.zeros(e, dtype=torch.int32, device=tokens.device).scatter_add_(
            0, expert_of_pair, torch.ones_like(expert_of_pair, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        routed_in = tokens[order // k] * gates.reshape(-1, 1)[order]                 # [a*k, D], by expert
        w_in, w_swiglu, w_out = (self._matrices(getattr(self.experts, name), slice(None), tokens.dtype)
                                 for name in _EXPERT_NAMES)                           # views, no copy
        hidden = (F.silu(torch._grouped_mm(routed_in, w_in, offs))
                  * torch._grouped_mm(routed_in, w_swiglu, offs))
        routed_out = torch._grouped_mm(hidden, w_out, offs)                           # [a*k, D], by expert
        by_pair = torch.empty_like(routed_out).index_copy_(0, order, routed_out)      # back in (token, choice) order
        return by_pair.view(-1, k, routed_out.shape[-1]).sum(dim=1)

    def _experts(self, routed_in: torch.Tensor, which: Optional[torch.Tensor]) -> torch.Tensor:
        """[n, rows, D]: SwiGLU expert which[i] (None: expert i) of this rank's slices on routed_in[i].
        Float experts are read in place (gathered: copied); quantized ones are dequantised a block of
        whole experts at a time, in the activation dtype, and dropped."""
        n = routed_in.shape[0]
        block = n if self.scheme is None else max(1, DEQUANTIZED_VALUES // self.values_per_expert)
        parts = []
        for start in range(0, n, block):
            pick = slice(start, start + block) if which is None else which[start:start + block]
            w_in, w_swiglu, w_out = (self._matrices(getattr(self.experts, name), pick, routed_in.dtype)
                                     for name in _EXPERT_NAMES)      # [b, D, F/N] x 2, [b, F/N, D]
            x = routed_in[start:start + block]
            parts.append(torch.bmm(F.silu(torch.bmm(x, w_in)) * torch.bmm(x, w_swiglu), w_out))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _matrices(self, stack: nn.Module, pick, dtype: torch.dtype) -> torch.Tensor:
        """The experts `pick` (a slice or indices) of one stack as float [b, in, out]."""
        experts = stack.weight.view(self.num_experts, -1, stack.weight.shape[1])[pick]
        if self.scheme is None:
            return experts
        scales = stack.scales.view(self.num_experts, -1, stack.scales.shape[1])[pick]
        return quantized_experts.dequantize(experts, scales, self.scheme, dtype)
