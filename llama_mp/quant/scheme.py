"""The quantization schemes: how a weight matrix [out, in] becomes small integers and scales, bit for bit.

Both are symmetric (no zero point) and weight-only: activations stay in the model dtype and every
product accumulates in float32 (or the dtype's own accumulator on a GPU).

* int8: one float32 scale per output row, `scale = max|row| / 127`, `q = round(w / scale)` in
  [-127, 127], stored int8 [out, in]. The scale covers the *whole* row, so a row-parallel matrix split
  over ranks uses the same scales on every rank (loading takes the row maxima of all ranks' slices).
* int4: one bfloat16 scale per `group_size` consecutive inputs of a row, `q` in [-8, 7]. The scale of
  each group is the one, among plain round-to-nearest's `max|group| / 7` and a few smaller and
  full-range candidates, that gives the least squared error on that group: never worse than plain
  round-to-nearest with the same groups. Stored as `q + 8` in 4 bits, two per byte, uint8
  [out, in / 2]: within each block of 32 inputs, byte j holds input j in its low nibble and input
  j + 16 in its high nibble (one 16-byte load unpacks to 32 values in order with a mask and a shift).
  Scales are [out, in / group_size].

A quantized tensor is the pair (q, scales); `dequantize` gives back `q * scale` exactly as the
kernels compute it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import LlamaMPError

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP_SIZE = 32
BLOCK = 32  # int4 packing block: 32 inputs in 16 bytes

# Candidate int4 scales, as fractions of max|group| / 7 (1.0 is plain round-to-nearest), and the same
# against -8 on the side of the largest magnitude (8/7 of the range, uses the 16th level).
_INT4_SHRINK = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.8)


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: `mode` "int8" or "int4", `group_size` the inputs per int4 scale (0 for int8)."""

    mode: str
    group_size: int = 0

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.int8 if self.mode == "int8" else torch.uint8

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.mode == "int8" else torch.bfloat16

    def weight_shape(self, out_features: int, in_features: int) -> Tuple[int, int]:
        return (out_features, in_features) if self.mode == "int8" else (out_features, in_features // 2)

    def scale_shape(self, out_features: int, in_features: int) -> Tuple[int, ...]:
        return (out_features,) if self.mode == "int8" else (out_features, in_features // self.group_size)

    def bits_per_weight(self) -> float:
        """Storage per weight, scales included."""
        return 8.0 if self.mode == "int8" else 4 + 16 / self.group_size  # int8: one scale per row, negligible

    def divides(self, in_features: int) -> bool:
        """Whether a row of `in_features` inputs (or a rank's slice of one) is whole groups."""
        return self.mode == "int8" or in_features % self.group_size == 0

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"mode": self.mode}
        if self.mode == "int4":
            out["group_size"] = self.group_size
        return out

    def describe(self) -> str:
        return "int8 per output channel" if self.mode == "int8" else f"int4 in groups of {self.group_size}"


def parse_scheme(mode: Any, group_size: Any = None, where: str = "--quantize",
                 group_where: str = "--group_size") -> Scheme:
    """The scheme for a mode name and optional int4 group size, or one clear error naming `where` (the
    mode's option or field) or `group_where` (the group size's)."""
    if mode not in MODES:
        raise LlamaMPError(f"{where} {mode!r} is not a quantization mode; use one of {', '.join(MODES)} "
                           "(int8: half the bytes of bfloat16, int4: a quarter).")
    if mode == "int8":
        if group_size not in (None, 0):
            raise LlamaMPError(f"{where} int8 has one scale per output channel; {group_where} {group_size!r} "
                               "applies to int4 only. Leave it out.")
        return Scheme("int8")
    if group_size is None:
        group_size = DEFAULT_INT4_GROUP_SIZE
    if isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
        raise LlamaMPError(f"{group_where} {group_size!r} is not supported for int4; use one of "
                           f"{', '.join(map(str, INT4_GROUP_SIZES))} (smaller groups: more accurate, larger "
                           "files).")
    return Scheme("int4", int(group_size))


def scheme_from_json(value: Any, where: str) -> Scheme:
    """The scheme a quantized checkpoint's params.json records under "quantization"."""
    if not isinstance(value, dict) or set(value) - {"mode", "group_size"}:
        raise LlamaMPError(f"{where}: \"quantization\" must be an object like {{\"mode\": \"int4\", "
                           f"\"group_size\": 32}}, got {value!r}. The file is damaged; quantize again.")
    return parse_scheme(value.get("mode"), value.get("group_size"), where=f"{where}: quantization mode",
                        group_where=f"{where}: quantization group_size")


def scales_problem(scales: torch.Tensor) -> Optional[str]:
    """What makes stored scales unusable (NaN, infinite or negative values: a damaged file), or None.
    Zero is fine: a row or group of zeros."""
    values = scales.float()
    bad = ~torch.isfinite(values) | (values < 0)
    if not bool(bad.any()):
        return None
    first = values[bad][0].item()
    return f"holds {int(bad.sum())} scale(s) that are NaN, infinite or negative (e.g. {first})"


def quantize(weight: torch.Tensor, scheme: Scheme,
             row_max: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of a float matrix [out, in] (any float dtype, any device).

    `row_max` (int8 only): max |w| of each whole row, when `weight` is one rank's slice of the inputs
    of a row-parallel matrix; by default the rows of `weight` itself."""
    if weight.dim() != 2:
        raise ValueError(f"quantize takes a matrix, got shape {tuple(weight.shape)}")
    w = weight.float()
    if scheme.mode == "int8":
        if row_max is None:
            row_max = w.abs().amax(dim=1)
        scale = row_max.float() / 127
        q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127)
        return q.to(torch.int8), scale
    out_features, in_features = w.shape
    if in_features % scheme.group_size:
        raise ValueError(f"{in_features} inputs are not whole groups of {scheme.group_size}")
    groups = w.view(out_features, in_features // scheme.group_size, scheme.group_size)
    q, scale = _int4_groups(groups)
    return pack_int4(q.view(out_features, in_features)), scale


def _int4_groups(groups: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer values [-8, 7] and bfloat16 scales [out, n_groups] for float32 groups [out, n_groups, g],
    each group's scale the candidate with the least squared error (ties: the earliest, plain RTN)."""
    amax = groups.abs().amax(dim=-1)
    # the signed value of largest magnitude: mapping it to -8 uses all 16 levels
    extreme = torch.gather(groups, -1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    candidates = [amax * f / 7 for f in _INT4_SHRINK] + [-extreme / 8]
    best_q = best_scale = best_err = None
    for scale in candidates:
        scale = scale.to(torch.bfloat16).float()  # judge the scale that will be stored
        q = torch.round(groups / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-8, 7)
        err = ((q * scale[..., None] - groups) ** 2).sum(dim=-1)
        if best_err is None:
            best_q, best_scale, best_err = q, scale, err
        else:
            better = err < best_err
            best_q = torch.where(better[..., None], q, best_q)
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.minimum(err, best_err)
    return best_q.to(torch.int8), best_scale.to(torch.bfloat16)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], [out, in] (in a multiple of 32) -> uint8 [out, in / 2] in the block layout."""
    out_features, in_features = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(out_features, in_features // BLOCK, 2, BLOCK // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(out_features, in_features // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 values in [-8, 7], [..., out, in] (leading dims: a stack of matrices)."""
    *lead, half = packed.shape
    blocks = packed.reshape(*lead, half // (BLOCK // 2), BLOCK // 2)
    low, high = blocks & 0x0F, blocks >> 4
    return (torch.cat([low, high], dim=-1).to(torch.int8) - 8).view(*lead, half * 2)


def dequantize(q: torch.Tensor, scales: torch.Tensor, scheme: Scheme,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix [out, in] a quantized one stands for: each value times its float32 scale. Leading
    dims are a stack of such matrices (q [..., out, in or in / 2], scales [..., out] or [..., out, in / g])."""
    if scheme.mode == "int8":
        return (q.float() * scales.float()[..., None]).to(dtype)
    values = unpack_int4(q).float()
    *lead, in_features = values.shape
    grouped = values.view(*lead, -1, scheme.group_size) * scales.float()[..., None]
    return grouped.view(*lead, in_features).to(dtype)
