"""Model hyper-parameters: Meta's `params.json`, parsed strictly, plus the shapes they imply."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

from ..checks import JsonProblem, read_json_file
from ..errors import LlamaMPError
from ..quant.scheme import Scheme, scheme_from_json
from .. import families
from .llama4 import Llama4Args


@dataclass(frozen=True)
class ModelArgs:
    """The fields of a LLaMA 1 / Llama 2 / Code Llama / Llama 3.x `params.json`.

    `vocab_size == -1` means "take it from the checkpoint" (Meta's LLaMA and Llama 2 files say -1);
    `n_kv_heads is None` means plain multi-head attention (every head has its own keys and values).
    `use_scaled_rope` (Llama 3.1 and later) stretches the rotary frequencies to a longer context by
    `rope_scaling_factor`, which Meta's files leave out: 32 for Llama 3.2 1B and 3B, 8 otherwise.
    `quantization` (our own field, absent from Meta's files) is the scheme a quantized checkpoint's
    layer weights are stored in (`llama-mp quantize`); the shapes it implies are layout.py's.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    rope_scaling_factor: Optional[float] = None
    quantization: Optional[Scheme] = None
    llama4: Optional[Llama4Args] = None  # Llama 4's own fields (checkpoints/llama4.py); None for Llama 1/2/3

    @property
    def scheme(self) -> Optional[Scheme]:
        """How the layer weights are stored: None for float weights, else the quantization scheme."""
        return self.quantization

    def with_scheme(self, scheme: Optional[Scheme]) -> "ModelArgs":
        """These params for weights stored by `scheme` (None: float weights)."""
        return dataclasses.replace(self, quantization=scheme)

    @property
    def family(self) -> str:
        """The name of the model family (families/): llama (LLaMA 1, Llama 2, Code Llama), llama3 (Llama
        3.x) or llama4 (Llama 4): what layout, tokenizer and chat format go with it."""
        return families.family_of(self).name

    @property
    def max_context(self) -> Optional[int]:
        """The longest sequence the model was made for, where Meta states one (Llama 3.x); else None."""
        return families.family_of(self).max_context(self)

    @property
    def rope_scale(self) -> float:
        """How much scaled rope stretches the low frequencies (only with `use_scaled_rope`)."""
        if self.rope_scaling_factor is not None:
            return self.rope_scaling_factor
        return families.family_of(self).rope_scale(self)

    @property
    def rope_high_freq_factor(self) -> float:
        """Scaled rope's high-frequency factor: Meta's 4 for Llama 3.1 and later, Llama 4's own (default 1)."""
        return families.family_of(self).rope_high_freq_factor(self)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, scaled, then rounded up to a multiple of `multiple_of`."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def with_vocab(self, vocab_size: int) -> "ModelArgs":
        return dataclasses.replace(self, vocab_size=vocab_size)

    def to_json_dict(self) -> Dict[str, Any]:
        """The dict Meta writes: optional fields left out when they hold their defaults."""
        out = dataclasses.asdict(self)
        if out["n_kv_heads"] is None:
            del out["n_kv_heads"]
        if out["ffn_dim_multiplier"] is None:
            del out["ffn_dim_multiplier"]
        if out["rope_theta"] == self._theta_left_out():
            del out["rope_theta"]
        if not out["use_scaled_rope"]:
            del out["use_scaled_rope"]
        if out["rope_scaling_factor"] is None:
            del out["rope_scaling_factor"]
        if self.quantization is None:
            del out["quantization"]
        else:
            out["quantization"] = self.quantization.to_json()
        for own in families.own_params():  # a family's own fields, as its params.json writes them
            if out.pop(own.attribute) is not None:
                out.update(getattr(self, own.attribute).to_json_fields())
        return out

    def _theta_left_out(self) -> float:
        """The rope_theta a params.json of this model's family means when it leaves the field out (Llama 4's
        is 500000), so a theta written only when it differs reads back as itself."""
        own = families.family_of(self).own_params
        return (own.with_defaults({}, {}) if own else {}).get("rope_theta", 10000.0)

    def parameters_text(self) -> str:
        """The parameter count as a person reads it: "4.2M parameters", "6.74B parameters"."""
        n = self.parameter_count()
        return f"{n / 1e9:.2f}B parameters" if n >= 1e9 else f"{n / 1e6:.1f}M parameters"

    def parameter_count(self) -> int:
        """Number of weights (embedding, layers, final norm, output), for sizing and bandwidth."""
        if self.vocab_size <= 0:
            raise ValueError("parameter_count needs a known vocab_size")
        if families.family_of(self).layout is not None:
            from .layout import full_shapes
            return sum(math.prod(shape) for shape in full_shapes(self.with_scheme(None)).values())  # weights, not bytes
        d, h = self.dim, self.ffn_hidden_dim
        kv = self.kv_heads * self.head_dim
        per_layer = d * d * 2 + 2 * d * kv + 3 * d * h + 2 * d
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d


def ffn_fields_for(dim: int, hidden: int) -> Dict[str, Any]:
    """`multiple_of` (and `ffn_dim_multiplier` if needed) that make `ModelArgs.ffn_hidden_dim == hidden`.

    Other formats (Hugging Face, llama2.c) store the FFN width itself; params.json can only derive it.
    Prefer Meta's style: `multiple_of` 256 (LLaMA 7B-65B, Llama 2 7B/13B, Code Llama) or else the largest
    power of two that rounds 2/3 * 4 * dim up to `hidden`; widths no rounding reaches (Llama 2 70B) get
    the shortest decimal `ffn_dim_multiplier` that works (1.3 for 70B, as Meta wrote it).
    """
    for fields in ffn_field_choices(dim, hidden):
        return fields
    raise LlamaMPError(f"No params.json can describe an FFN width of {hidden} for dim {dim}.")


def ffn_field_choices(dim: int, hidden: int) -> Iterator[Dict[str, Any]]:
    """Every choice `ffn_fields_for` considers that gives `hidden`, best first (a family whose params
    derive another width from the same fields, as Llama 4's experts, takes the first that fits both)."""
    def width(**fields) -> int:
        return ModelArgs(dim=dim, n_layers=1, n_heads=1, **fields).ffn_hidden_dim

    powers = [256] + [1 << p for p in range(hidden.bit_length(), -1, -1) if 1 << p != 256]
    for m in powers:
        if width(multiple_of=m) == hidden:
            yield {"multiple_of": m}
    ratio = hidden / int(2 * (4 * dim) / 3)
    for multiplier in [round(ratio, digits) for digits in range(1, 7)] + [ratio]:
        for m in powers:
            if multiplier > 0 and width(multiple_of=m, ffn_dim_multiplier=multiplier) == hidden:
                yield {"multiple_of": m, "ffn_dim_multiplier": multiplier}


_OWN_ATTRIBUTES = {own.attribute for own in families.own_params()}
_FIELDS = {f.name: f for f in dataclasses.fields(ModelArgs) if f.name not in _OWN_ATTRIBUTES}
_REQUIRED = [name for name, f in _FIELDS.items()
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
_INTS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"}
_FLOATS = {"ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling_factor"}
_BOOLS = {"use_scaled_rope"}
# No tensor dimension of a model that fits anywhere reaches 2**31; a bigger value is a typo or an attack,
# and would otherwise end in an allocation traceback (or an overflow) far from params.json.
LARGEST_SIZE = 2 ** 31 - 1
# Per float field: the open range of sensible values and why. Python's json reads NaN and Infinity, which
# pass every comparison-based check (NaN <= 0 is False) and make the model emit <unk> forever.
_FLOAT_RANGES = {
    "norm_eps": (0.0, 1.0, "it is the epsilon of RMSNorm, about 1e-5 or 1e-6; 1 or more would drown the "
                           "activations"),
    "rope_theta": (0.0, math.inf, "it is the base of the rotary frequencies, 10000 or 1000000"),
    "ffn_dim_multiplier": (0.0, math.inf, "it scales the FFN width, e.g. 1.3"),
    "rope_scaling_factor": (0.0, math.inf, "it stretches the rotary frequencies of scaled rope, 8 or 32"),
}


def parse_params(raw: Dict[str, Any], where: str = "params.json") -> ModelArgs:
    """Validate a params dict and build `ModelArgs`, naming every bad field in one message."""
    if not isinstance(raw, dict):
        raise LlamaMPError(f"{where} must hold a JSON object such as {{\"dim\": 4096, ...}}, "
                           f"but it holds a {type(raw).__name__}.")
    problems = []
    own = families.own_params_of(raw)
    family_fields = set(own.fields) if own else set()
    unknown = sorted(set(raw) - set(_FIELDS) - family_fields)
    if unknown:
        known = sorted(set(_FIELDS).union(*(o.fields for o in families.own_params())))
        problems.append(f"unknown field(s) {unknown} (llama_mp knows {known})")
    missing = [name for name in _REQUIRED if name not in raw]
    if missing:
        problems.append(f"missing field(s) {missing}")
    values: Dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _FIELDS:
            continue
        if value is None and _FIELDS[name].default is None:
            values[name] = None
            continue
        if name == "quantization":
            try:
                values[name] = scheme_from_json(value, where)
            except LlamaMPError as e:
                problems.append(str(e).rstrip("."))
            continue
        problem = _field_problem(name, value)
        if problem:
            problems.append(problem)
        else:
            values[name] = float(value) if name in _FLOATS else value
    if not problems:
        problems.extend(_consistency_problems(values))
    if own and not problems:
        values = own.with_defaults(values, raw)
        values[own.attribute], more = own.parse(raw, values)
        problems.extend(more)
    if problems:
        raise LlamaMPError(f"{where} is not a valid LLaMA params file: " + "; ".join(problems)
                           + ". Compare it with the params.json that came with the checkpoint "
                             "(see configs/ for the official values).")
    return ModelArgs(**values)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_problem(name: str, value: Any) -> Optional[str]:
    """What is wrong with one field's value on its own (type, finiteness, range), or None.

    Each field is judged alone, so one message names every bad field, not just the first."""
    if name in _BOOLS:
        return None if isinstance(value, bool) else f"{name} must be true or false, got {_shown(value)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if name in _INTS else "a number"
        return f"{name} must be {kind}, got {_shown(value)} (a {type(value).__name__})"
    if name in _INTS:
        if not isinstance(value, int):
            return f"{name} must be an integer, got {_shown(value)}"
        if name == "vocab_size":
            ok = value == -1 or 0 < value <= LARGEST_SIZE
            return None if ok else (f"vocab_size must be positive or -1 (from the checkpoint), got "
                                    f"{_shown(value)}")
        if value <= 0:
            return f"{name} must be positive, got {value}"
        if value > LARGEST_SIZE:
            return f"{name} {_shown(value)} is impossibly large (more than {LARGEST_SIZE})"
        return None
    low, high, why = _FLOAT_RANGES[name]
    try:
        number = float(value)
    except OverflowError:  # an integer with hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        return f"{name} must be a finite number, got {_shown(value)} ({why})"
    if not low < number < high:
        bound = f"positive and below {high:g}" if math.isfinite(high) else "positive"
        return f"{name} must be {bound}, got {_shown(value)} ({why})"
    return None


def _consistency_problems(v: Dict[str, Any]) -> list:
    """What is wrong with the fields together (each one is valid on its own)."""
    problems = []
    if v["dim"] % v["n_heads"]:
        problems.append(f"dim {v['dim']} is not divisible by n_heads {v['n_heads']}")
    elif (v["dim"] // v["n_heads"]) % 2:
        problems.append(f"head size dim/n_heads = {v['dim'] // v['n_heads']} must be even for rotary embeddings")
    kv = v.get("n_kv_heads")
    if kv is not None and v["n_heads"] % kv:
        problems.append(f"n_kv_heads {kv} must be positive and divide n_heads {v['n_heads']}")
    fields = {k: v[k] for k in ("dim", "multiple_of", "ffn_dim_multiplier") if v.get(k) is not None}
    try:
        hidden = ModelArgs(n_layers=1, n_heads=1, **fields).ffn_hidden_dim
    except OverflowError:  # a multiplier near float's maximum makes the width infinite
        hidden = math.inf
    if not 0 < hidden <= LARGEST_SIZE:
        problems.append(f"dim, multiple_of and ffn_dim_multiplier give an FFN width of {hidden}, which no model "
                        f"can have (it must be from 1 to {LARGEST_SIZE})")
    return problems


def load_params(ckpt_dir: str) -> ModelArgs:
    """Read and validate `<ckpt_dir>/params.json`."""
    path = os.path.join(ckpt_dir, "params.json")
    if not os.path.isfile(path):
        raise LlamaMPError(f"{path} does not exist. A Meta checkpoint directory holds params.json, "
                           "consolidated.00.pth, ... and checklist.chk; check --ckpt_dir.")
    try:
        raw = read_json_file(path)
    except JsonProblem as e:
        raise LlamaMPError(f"{path} {e.reason}. Restore it from the original download.") from None
    except OSError as e:
        raise LlamaMPError(f"{path} cannot be read ({e.strerror or e}).") from None
    return parse_params(raw, where=path)


def save_params(args: ModelArgs, ckpt_dir: str) -> None:
    with open(os.path.join(ckpt_dir, "params.json"), "w") as f:
        json.dump(args.to_json_dict(), f)


# ----------------------------------------------------------------------------------------------
# Presets: configs/<name>.json holds Meta's params.json for each published model, its shard count and
# the real vocabulary size (Meta's files say -1).


def _configs_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "..", "..", "configs"),
                      os.path.join(sys.prefix, "share", "llama_mp", "configs")):
        if os.path.isdir(candidate):
            return os.path.normpath(candidate)
    raise LlamaMPError("Cannot find the model presets (configs/*.json); reinstall llama_mp.")


def preset_names() -> list:
    return sorted(name[:-5] for name in os.listdir(_configs_dir()) if name.endswith(".json"))


def load_preset(name: str) -> Tuple[ModelArgs, int]:
    """(params with the real vocab size, Meta's shard count) of a published model, e.g. 'llama-2-13b'."""
    path = os.path.join(_configs_dir(), f"{name}.json")
    if not os.path.isfile(path):
        raise LlamaMPError(f"Unknown model preset {name!r}; known presets: {', '.join(preset_names())}.")
    with open(path) as f:
        preset = json.load(f)
    args = parse_params(preset["params"], where=path)
    return args.with_vocab(preset["vocab_size"]), preset["shards"]
