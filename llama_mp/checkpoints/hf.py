"""Hugging Face Llama checkpoints (`LlamaForCausalLM`): read them as Meta tensors, write Meta as them.

A model's tensors are a list of `Join`s, each saying which Meta tensors are which Hugging Face ones, both
ways; the reader (`HFSource`) and the writer (`write_hf`) only follow them. This module holds Llama 1/2/3's
(one tensor each, renamed); a family with a model class of its own names its module in
`Family.hf_format` (Llama 4: checkpoints/hf_llama4.py, fused and stacked tensors).

Two differences from Meta's layout besides the names:

* Rotary embeddings. Meta rotates adjacent pairs of each head's features (2i, 2i+1); transformers
  rotates feature i with feature i + head_dim/2 ("rotate_half"). Meta's conversion script therefore
  reorders the output rows of wq and wk within each head. `to_hf_rows` applies that reordering and
  `from_hf_rows` undoes it; wk uses the number of *key/value* heads (GQA).
* HF stores the FFN width (`intermediate_size`) itself; params.json derives it from `multiple_of` and
  `ffn_dim_multiplier`, so `params.ffn_fields_for` finds values that reproduce it.
* Llama 3.1's scaled rope is `rope_parameters` (transformers 5) / `rope_scaling` (4.x) of type "llama3"
  in config.json, `use_scaled_rope` (+ `rope_scaling_factor` where Meta's rule would infer another
  factor) in params.json.

Weights may be one `model.safetensors`, several `model-0000i-of-0000n.safetensors` with an index json,
or the older `pytorch_model*.bin` equivalents. Each tensor is read only when asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import families
from ..checks import JsonProblem, read_json_file
from ..errors import LlamaMPError
from . import layout
from .params import ModelArgs, ffn_fields_for, parse_params

# Meta's scaled rope (Llama 3.1 and later; runtime/model.py) as transformers names it: rope_type "llama3".
# Only the stretch `factor` varies between Meta's models; these three are fixed in Meta's code, so a
# config with other values describes a model llama_mp would run differently.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Meta name (inside a layer) -> HF name (inside model.layers.N.)
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


def hf_name(meta_key: str) -> str:
    """The transformers parameter name of a Meta tensor name."""
    if meta_key in _TOP_NAMES:
        return _TOP_NAMES[meta_key]
    _, layer, rest = meta_key.split(".", 2)
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder wq/wk output rows from Meta's interleaved pairs to transformers' split halves, per head."""
    rows, cols = w.shape
    # Per head, Meta's rows are (pair i, member j); HF wants (member j, pair i).
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `to_hf_rows`."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads_for(meta_key: str, args: ModelArgs) -> Optional[int]:
    """Head count whose rows `meta_key` must be reordered by, or None for tensors left as they are."""
    if meta_key.endswith("attention.wq.weight"):
        return args.n_heads
    if meta_key.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


@dataclass(frozen=True)
class Join:
    """Meta tensors and the Hugging Face tensors they are, both ways: `to_hf(*meta tensors)` gives the HF
    tensors in `hf`'s order, `to_meta(*hf tensors)` the Meta ones in `meta`'s (whole tensors; views where
    they can be). Each Meta tensor and each HF tensor is in one Join of a model."""

    meta: Tuple[str, ...]
    hf: Tuple[str, ...]
    to_hf: Callable[..., Tuple[torch.Tensor, ...]]
    to_meta: Callable[..., Tuple[torch.Tensor, ...]]


def same(t: torch.Tensor) -> Tuple[torch.Tensor]:
    return (t,)


def hf_format(args: ModelArgs):
    """The module of the family's own Hugging Face format (`Family.hf_format`), or None for LlamaForCausalLM."""
    family = families.family_of(args)
    return None if family.hf_format is None else families.piece(family.hf_format)


def joins(args: ModelArgs) -> List[Join]:
    """Every tensor of the model, Meta's order, as its family's Hugging Face format holds it."""
    own = hf_format(args)
    if own is not None:
        return own.joins(args)

    def llama_join(key: str) -> Join:
        heads = _heads_for(key, args)
        if heads is None:
            return Join((key,), (hf_name(key),), same, same)
        return Join((key,), (hf_name(key),), lambda w: (to_hf_rows(w, heads),), lambda w: (from_hf_rows(w, heads),))

    return [llama_join(key) for key in layout.full_shapes(args)]


def hf_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """{HF name: shape} of every tensor, from Meta's shapes (on the meta device: nothing is allocated)."""
    shapes = layout.full_shapes(args)
    out = {}
    for join in joins(args):
        made = join.to_hf(*(torch.empty(shapes[k], device="meta") for k in join.meta))
        out.update({name: tuple(t.shape) for name, t in zip(join.hf, made)})
    return out


# ----------------------------------------------------------------------------------------------
# Reading


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def args_from_config(config: dict, where: str) -> ModelArgs:
    """Meta params for a transformers LlamaConfig dict, refusing what our model cannot run."""
    def need(name):
        if name not in config:
            raise LlamaMPError(f"{where} has no {name!r}; it is not a Llama config.json.")
        return config[name]

    model_type = config.get("model_type", "llama")  # transformers' LlamaForCausalLM, for Llama 1/2/3
    named = next((f for f in families.FAMILIES if model_type in f.hf_model_types), None)
    if named is not None and named.hf_format is not None:
        return families.piece(named.hf_format).args_from_config(config, where)
    if named is None:
        known = ", ".join(repr(t) for t in dict.fromkeys(t for f in families.FAMILIES for t in f.hf_model_types))
        raise LlamaMPError(f"{where} describes a {config.get('model_type')!r} model; convert reads Hugging Face "
                           f"models of type {known} (LlamaForCausalLM, Llama4ForCausalLM and the Hub's Llama 4 "
                           "folders).")
    # transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x wrote `rope_scaling` beside a
    # top-level rope_theta. Either may be present, or both.
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "llama3"):
        raise LlamaMPError(f"{where} uses rope scaling {kind!r}, which llama_mp does not implement; only plain "
                           "rotary embeddings (rope_theta) and Meta's Llama 3.1 scaling (rope_type 'llama3') "
                           "are supported.")
    unsupported = [name for name in ("attention_bias", "mlp_bias") if config.get(name)]
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={config['hidden_act']}")
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    if config.get("head_dim") not in (None, dim // n_heads):
        unsupported.append(f"head_dim={config['head_dim']} (Meta's layout needs hidden_size/heads)")
    if unsupported:
        raise LlamaMPError(f"{where} uses {', '.join(unsupported)}, which Meta's LLaMA layout cannot express.")
    kv = config.get("num_key_value_heads") or n_heads
    raw = {"dim": dim, "n_layers": need("num_hidden_layers"), "n_heads": n_heads,
           "n_kv_heads": kv if kv != n_heads else None, "vocab_size": need("vocab_size"),
           "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
           "rope_theta": float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)}
    raw.update(ffn_fields_for(dim, need("intermediate_size")))
    if kind == "default":
        return parse_params(raw, where=where)
    factor = _llama3_rope_factor(rope, where)
    raw["use_scaled_rope"] = True
    args = parse_params(raw, where=where)
    if args.rope_scale != factor:  # params.json states the factor only where Meta's rule would guess wrong
        args = parse_params({**raw, "rope_scaling_factor": factor}, where=where)
    return args


def _llama3_rope_factor(rope: dict, where: str) -> float:
    """The stretch factor of a rope_type "llama3" config, refusing parameters Meta's scheme does not use."""
    factor = rope.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise LlamaMPError(f"{where} uses rope scaling 'llama3' but its factor is {factor!r}, not a positive "
                           "number (Llama 3.1 and 3.3 use 8, Llama 3.2 1B and 3B 32).")
    different = [f"{name} {rope.get(name)!r} (Meta's: {value:g})" for name, value in LLAMA3_ROPE_FIXED.items()
                 if rope.get(name, value) != value]
    if different:
        raise LlamaMPError(f"{where} uses rope scaling 'llama3' with {', '.join(different)}. llama_mp implements "
                           "only Meta's Llama 3.1 scheme, whose low_freq_factor, high_freq_factor and "
                           "original_max_position_embeddings are fixed, so this model would run differently "
                           "here; it cannot be converted.")
    return float(factor)


def _damaged(path: str, problem: str) -> LlamaMPError:
    """The error for a file of a Hugging Face download that cannot be used as it is."""
    return LlamaMPError(f"Cannot read {path}: {problem}. The download is damaged or incomplete; download "
                        "this file again (e.g. `huggingface-cli download` re-fetches what does not match).")


def _reason(e: BaseException) -> str:
    """The exception's type and first sentence (torch's load errors go on with advice that does not apply)."""
    text = str(e).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_json(path: str) -> dict:
    try:
        data = read_json_file(path)
    except JsonProblem as e:
        raise _damaged(path, f"it {e.reason}") from None
    except OSError as e:
        raise _damaged(path, f"it cannot be read ({_reason(e)})") from None
    if not isinstance(data, dict):
        raise _damaged(path, f"it holds a JSON {type(data).__name__}, not an object")
    return data


def _weight_files(model_dir: str) -> Dict[str, str]:
    """{HF tensor name: file} from an index json, or every name of the single weights file."""
    for name in WEIGHT_FILES:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            weight_map = _read_json(path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise _damaged(path, 'it has no "weight_map" object of tensor name -> file name')
            return {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
        return {k: path for k in _open_weights(path).keys()}
    original = os.path.join(model_dir, "original")
    if os.path.isfile(os.path.join(original, "params.json")):
        # Meta's repos on the Hub carry Meta's own checkpoint there; it converts (reshards) as it is.
        raise LlamaMPError(f"{model_dir} has a config.json but none of {', '.join(WEIGHT_FILES)}; its original/ "
                           f"folder holds Meta's checkpoint, so convert that instead: `llama-mp convert "
                           f"{original} DST --mp M`, or download the safetensors weights too.")
    raise LlamaMPError(f"{model_dir} has a config.json but none of {', '.join(WEIGHT_FILES)}. Download the "
                       "weights too (safetensors preferred).")


class _TorchBin:
    """A `pytorch_model*.bin` opened like a safetensors file: mmap when the file allows it."""

    def __init__(self, path: str):
        try:
            try:
                self.sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # pre-zip (legacy) torch files cannot be mapped; read them whole
                self.sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for truncated or corrupt files
            raise _damaged(path, _reason(e)) from None
        if not isinstance(self.sd, dict) or not all(isinstance(v, torch.Tensor) for v in self.sd.values()):
            raise _damaged(path, "it does not hold a state dict of tensors")

    def keys(self) -> List[str]:
        return list(self.sd)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.sd[name]


def _open_weights(path: str):
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            return safe_open(path, framework="pt")
        except Exception as e:  # SafetensorError (bad header, truncated data), OSError (missing shard)
            raise _damaged(path, _reason(e)) from None
    return _TorchBin(path)


def hf_tokenizer_model(model_dir: str) -> Optional[str]:
    """The tokenizer file llama_mp reads, from a Hugging Face folder: its own tokenizer.model (Llama 2
    repos: SentencePiece), else `original/tokenizer.model` (Llama 3 repos keep Meta's tiktoken file there,
    beside a tokenizer.json that llama_mp does not read). None when there is neither."""
    for path in (os.path.join(model_dir, "tokenizer.model"), os.path.join(model_dir, "original", "tokenizer.model")):
        if os.path.isfile(path):
            return path
    return None


class HFSource:
    """A Hugging Face Llama directory seen as whole Meta-layout tensors (see convert.py)."""

    def __init__(self, model_dir: str):
        config_path = os.path.join(model_dir, "config.json")
        self.config = _read_json(config_path)
        self.args = args_from_config(self.config, config_path)
        self.tokenizer = hf_tokenizer_model(model_dir)
        self._files = _weight_files(model_dir)
        self._open: Dict[str, object] = {}
        self._joins = {key: join for join in joins(self.args) for key in join.meta}
        own = hf_format(self.args)
        # A family's model may sit under a prefix (Llama 4's language model in a multimodal folder).
        embedding = self._joins["tok_embeddings.weight"].hf[0]
        self._prefix = next((p for p in (own.NAME_PREFIXES if own else ("",)) if p + embedding in self._files), "")
        output = self._joins["output.weight"].hf[0]
        self._tied = self._prefix + output not in self._files
        self.ties_output = self._tied
        if self._tied and not self.config.get("tie_word_embeddings", False):
            raise LlamaMPError(f"{model_dir} has no {self._prefix + output} and its config does not tie it to the "
                               "embedding; the weights are incomplete.")
        missing = list(dict.fromkeys(name for key in self.keys() for name in self._names(key)
                                     if name not in self._files))
        if missing:
            title = families.family_of(self.args).title
            raise LlamaMPError(f"{model_dir} lacks {len(missing)} tensor(s) a {title} model needs, e.g. "
                               f"{', '.join(missing[:4])}. The download is incomplete or not a {title} model.")

    def keys(self) -> List[str]:
        return list(layout.full_shapes(self.args))

    def _join(self, meta_key: str) -> Tuple[Join, int]:
        """The Join that makes `meta_key`, and its place among the Join's Meta tensors (a tied output is made
        as the embedding)."""
        if meta_key == "output.weight" and self._tied:
            meta_key = "tok_embeddings.weight"
        join = self._joins[meta_key]
        return join, join.meta.index(meta_key)

    def _names(self, meta_key: str) -> List[str]:
        """The names in the files of the HF tensors `meta_key` is made of."""
        return [self._prefix + name for name in self._join(meta_key)[0].hf]

    def _handle(self, name: str):
        path = self._files[name]
        if path not in self._open:
            self._open[path] = _open_weights(path)
        return self._open[path]

    def _hf_shape(self, name: str) -> Tuple[int, ...]:
        handle = self._handle(name)
        return tuple(self._read(name, lambda: handle.get_slice(name).get_shape()
                                if hasattr(handle, "get_slice") else handle.get_tensor(name).shape))

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Every tensor's shape from the file headers, without reading any weights (HF tensors that cannot
        make a Meta one, as a fused tensor's parts of mismatched widths, are named in an error)."""
        out = {}
        for key in self.keys():
            names = self._names(key)
            shapes = [self._hf_shape(name) for name in names]
            join, place = self._join(key)
            try:
                made = join.to_meta(*(torch.empty(shape, device="meta") for shape in shapes))
            except RuntimeError:
                found = ", ".join(f"{n} {list(sh)}" for n, sh in zip(names, shapes))
                wanted = ", ".join(f"{list(layout.full_shapes(self.args)[k])}" for k in join.meta)
                raise LlamaMPError(f"Hugging Face tensors {found} do not make Meta's {', '.join(join.meta)} of this "
                                   f"config ({wanted}). The files are incomplete or from different models.") from None
            out[key] = tuple(made[place].shape)
        return out

    def dtypes(self) -> Dict[str, object]:
        """{"file: HF name": dtype} of every tensor, from the safetensors headers (a string such as
        "BF16" or "I8") or the loaded state dict of a pytorch_model*.bin (a torch.dtype)."""
        out = {}
        for key in self.keys():
            for name in self._names(key):
                handle = self._handle(name)
                dtype = self._read(name, lambda: handle.get_slice(name).get_dtype()
                                   if hasattr(handle, "get_slice") else handle.get_tensor(name).dtype)
                out[f"{os.path.basename(self._files[name])}: {name}"] = dtype
        return out

    def _read(self, name: str, read: Callable[[], object]):
        """`read()` of tensor `name`, a failure inside its file reported as a damaged download."""
        try:
            return read()
        except Exception as e:  # SafetensorError (truncated data), or a name the file lacks
            raise _damaged(self._files[name], f"{_reason(e)} (reading {name})") from None

    def tensor(self, meta_key: str) -> torch.Tensor:
        join, place = self._join(meta_key)
        hf = [self._read(name, lambda: self._handle(name).get_tensor(name)) for name in self._names(meta_key)]
        return join.to_meta(*hf)[place]


# ----------------------------------------------------------------------------------------------
# Writing


def hf_rope(args: ModelArgs) -> Tuple[dict, Optional[dict]]:
    """(rope_parameters for transformers 5, rope_scaling for 4.x or None) of the model's rotary embedding."""
    if not args.use_scaled_rope:
        return {"rope_type": "default", "rope_theta": args.rope_theta}, None
    scaling = {"rope_type": "llama3", "factor": args.rope_scale, **LLAMA3_ROPE_FIXED}
    return {**scaling, "rope_theta": args.rope_theta}, scaling


def common_config(args: ModelArgs, dtype: torch.dtype, tie_word_embeddings: bool,
                  special_ids: Tuple[int, List[int]]) -> dict:
    """The config.json fields every family's transformers class reads alike: the attention's shape, the
    vocabulary, the norm, rope's theta, the activation, the tie, the bos and stop ids and the dtype."""
    dtype_name = str(dtype).replace("torch.", "")
    bos, stops = special_ids
    return {"hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
            "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "hidden_act": "silu",
            "attention_bias": False, "tie_word_embeddings": tie_word_embeddings, "bos_token_id": bos,
            "eos_token_id": stops[0] if len(stops) == 1 else list(stops), "torch_dtype": dtype_name,
            "dtype": dtype_name}


def hf_config(args: ModelArgs, dtype: torch.dtype, max_position_embeddings: Optional[int] = None,
              tie_word_embeddings: bool = False, special_ids: Optional[Tuple[int, List[int]]] = None) -> dict:
    """config.json for `LlamaForCausalLM` (rope given both ways, for transformers 4.x and 5.x), or the
    family's own model class (`Family.hf_format`).

    `max_position_embeddings` defaults to the context the model was made for (Llama 3.x), else 4096;
    `special_ids` (bos id, stop ids) to the family's (`Family.hf_special_ids`)."""
    special_ids = special_ids or families.family_of(args).hf_special_ids
    own = hf_format(args)
    if own is not None:
        return own.hf_config(args, dtype, max_position_embeddings, tie_word_embeddings, special_ids)
    rope_parameters, rope_scaling = hf_rope(args)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **common_config(args, dtype, tie_word_embeddings, special_ids),
        "intermediate_size": args.ffn_hidden_dim,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": max_position_embeddings or args.max_context or 4096,
        "mlp_bias": False,
    }
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def hf_state_dict(args: ModelArgs, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A whole-model Meta state dict as the family's transformers model's state dict (views where possible)."""
    out: Dict[str, torch.Tensor] = {}
    for join in joins(args):
        if all(key in state for key in join.meta):
            out.update(zip(join.hf, join.to_hf(*(state[key] for key in join.meta))))
    return out


def write_hf(out_dir: str, args: ModelArgs, keys: List[str], tensor: Callable[[str], torch.Tensor],
             max_file_bytes: int = 5 << 30, max_position_embeddings: Optional[int] = None,
             progress: Callable[[], None] = None, tie_word_embeddings: bool = False,
             special_ids: Optional[Tuple[int, List[int]]] = None) -> None:
    """Write `model.safetensors` (or size-capped `model-0000i-of-0000n.safetensors` + index) from whole
    Meta tensors fetched one at a time by `tensor(key)`, each once; one file's tensors are in memory at
    once, and `progress()` is called after each Meta tensor. With `tie_word_embeddings` no lm_head.weight
    is written (transformers uses the embedding)."""
    from safetensors.torch import save_file

    if tie_word_embeddings:
        keys = [key for key in keys if key != "output.weight"]
    wanted = set(keys)
    order = {key: i for i, key in enumerate(keys)}
    model_joins = sorted((j for j in joins(args) if set(j.meta) <= wanted), key=lambda j: order[j.meta[0]])
    hf_sizes = hf_shapes(args)
    # The first tensor gives the dtype (hence file sizes) and is the first one written: fetched once,
    # and not held past its own file.
    pending = {keys[0]: tensor(keys[0])}
    itemsize = pending[keys[0]].dtype.itemsize
    dtype = pending[keys[0]].dtype

    def nbytes(join: Join) -> int:
        return sum(itemsize * torch.Size(hf_sizes[name]).numel() for name in join.hf)

    groups: List[List[Join]] = [[]]
    size = 0
    for join in model_joins:
        if groups[-1] and size + nbytes(join) > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(join)
        size += nbytes(join)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map = {}
    for name, group in zip(names, groups):
        out = {}
        for join in group:
            meta = [pending.pop(key) if key in pending else tensor(key) for key in join.meta]
            for hf, t in zip(join.hf, join.to_hf(*meta)):
                out[hf] = t.clone(memory_format=torch.contiguous_format)
                weight_map[hf] = name
            del meta
            if progress:
                for _ in join.meta:
                    progress()
        save_file(out, os.path.join(out_dir, name), metadata={"format": "pt"})
        del out
    if len(names) > 1:
        total = sum(nbytes(join) for join in model_joins)
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(args, dtype, max_position_embeddings, tie_word_embeddings, special_ids), f, indent=2)
