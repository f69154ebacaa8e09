"""Model families: what sets LLaMA 1 / Llama 2 / Code Llama ("llama"), Llama 3.x ("llama3") and Llama 4
("llama4") apart, one module each stating its differences as a `Family`, and the registry below.

Generic code asks a family (`family_of(args)` from params.json, `named(tokenizer.family)` from a
tokenizer) instead of comparing names, so the next family is a module here and one `register` line at
the end of this file.
The pieces that are code of their own (a tokenizer class, a chat format, model layers) are named as
"module:attribute" inside llama_mp and imported when first used (`piece`): this package then imports
nothing above checkpoints/, which itself asks it what a params.json is.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import LlamaMPError


@dataclass(frozen=True)
class OwnParams:
    """A family's own params.json fields, parsed into a ModelArgs attribute of their own (Llama 4's)."""

    attribute: str                                   # the ModelArgs field that holds them ("llama4")
    fields: Tuple[str, ...]                          # the params.json names only this family has
    is_in: Callable[[Dict[str, Any]], bool]          # whether a raw params.json dict is this family's
    with_defaults: Callable[[Dict[str, Any], Dict[str, Any]], Dict[str, Any]]  # its defaults of common fields
    parse: Callable[[Dict[str, Any], Dict[str, Any]], Tuple[Any, List[str]]]  # (parsed, problems)


@dataclass(frozen=True)
class ToolRules:
    """How a family's chat format offers tools and writes and reads their calls (runtime/tools.py)."""

    default_format: str              # the format when none is asked for
    formats: Tuple[str, ...]         # the formats it calls tools in
    formats_text: str                # those, as a refusal names them
    code_tags: Tuple[str, str]       # what marks code for the interpreter: (before it, after it or "")
    python_list_prompt: str          # its system prompt before a pythonic list of custom functions
    eom_after_any_call: bool         # every turn that calls ends with eom (else only built-in calls)
    code_interpreter_tag: bool       # the code tag starts a turn that calls the code interpreter


@dataclass(frozen=True)
class Family:
    """One model family's differences from the others, in the terms generic code asks about."""

    name: str                        # as users see it: ModelArgs.family, Tokenizer.family, --family
    title: str                       # as messages name it: "Llama 3.x"
    identifies: Callable[[Any], bool]  # whether parsed ModelArgs are this family's (newest family asked first)
    tokenizer_format: str            # "sentencepiece" or "tiktoken": how its tokenizer.model is read
    tokenizer_text: str              # its tokenizer, as messages describe it: "tiktoken"
    tokenizer_class: str             # "module:class" of its runtime tokenizer
    chat_format: str                 # "module:function" (tokenizer, dialog, tool format) -> prompt ids
    synth_tokenizer: str             # the file name of Meta's tokenizer in ../shared/assets
    synth_params: Dict[str, Any]     # `llama-mp synth --family NAME`: params.json fields beyond the shape
    hf_tokenizer_class: str          # transformers' class for its tokenizer (GET /tokenizer_info)
    # A tokenizer file of its format that this family claims: (path, the model's family name or None).
    # None: every file of the format that no newer family claims.
    claims_tokenizer: Optional[Callable[[str, Optional[str]], bool]] = None
    tools: Optional[ToolRules] = None            # None: its chat format has no tools
    text_turn_markers: bool = False  # turns marked by text ([INST]): a guard on dialogs, and turns alternate
    vocab_in_params: bool = False    # Meta's params.json states vocab_size (else -1, from the checkpoint)
    cpu_kernels_problem: Optional[str] = None    # why the C decode kernels (kernels/) cannot run it
    compiled_quantized_problem: Optional[str] = None  # why --decoder compiled cannot run it quantized
    own_params: Optional[OwnParams] = None       # its own params.json fields, if any
    split_dims: Optional[Dict[str, Optional[int]]] = None  # the split of each tensor in the common layout
    layout: Optional[str] = None     # else: "module" of a layout of its own (checkpoints/layout.py)
    layers_alike: bool = True        # every layer has the same shapes (memory estimates count one)
    # A shard's tensors as Meta ships them, where they come under other names (Llama 4's model names);
    # else the shard as it is. Asked of every shard before its family is known.
    shipped_names: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
    hf_model_types: Tuple[str, ...] = ()         # config.json model_type values of its HF checkpoints
    hf_special_ids: Optional[Tuple[int, List[int]]] = None  # (bos, stop ids) of its HF config.json
    # "module" of its own Hugging Face format (args_from_config, joins, hf_config, NAME_PREFIXES; see
    # checkpoints/hf.py); None: LlamaForCausalLM's, which hf.py holds.
    hf_format: Optional[str] = None
    max_context: Callable[[Any], Optional[int]] = lambda args: None  # what Meta states (None: nothing)
    rope_scale: Callable[[Any], float] = lambda args: 8.0           # scaled rope's stretch, unless in params
    rope_high_freq_factor: Callable[[Any], float] = lambda args: 4.0
    # Model pieces (runtime/model.py): "module" of its own layers, which gives layer_kind(args, index) ->
    # LayerKind, feed_forward(args, shapes, prefix, comm, index) -> nn.Module, query_scale(own params
    # fields, positions) -> a step's query temperature or None, and dequantized_bytes(args, ranks, dtype
    # size) -> the most a quantized layer dequantises at once (footprint.py); None: Llama's own layers.
    layers: Optional[str] = None
    attention_chunk: Callable[[Any], Optional[int]] = lambda args: None  # positions a RoPE layer sees
    loading_notes: Callable[[Any], List[str]] = lambda args: []  # said once a checkpoint is loaded

    @property
    def layout_module(self):
        """The module of its own layout, or None for the common one (split_dims)."""
        return None if self.layout is None else piece(self.layout)

    @property
    def layers_module(self):
        """The module of its own layers, or None for Llama's (runtime/model.py)."""
        return None if self.layers is None else piece(self.layers)

    def own_fields(self, args):
        """Its own params.json fields as parsed into `args` (None for a family without any)."""
        return None if self.own_params is None else getattr(args, self.own_params.attribute)

    def encode_dialog(self, tokenizer, dialog, tool_format: Optional[str]) -> List[int]:
        return piece(self.chat_format)(tokenizer, dialog, tool_format)


def piece(ref: str):
    """The object a "module:attribute" reference inside llama_mp names ("module" alone: the module),
    imported on first use."""
    module, _, attribute = ref.partition(":")
    found = importlib.import_module(f"{__package__.rpartition('.')[0]}.{module}")
    return getattr(found, attribute) if attribute else found


FAMILIES: List[Family] = []  # oldest first; a newer family is asked first (it is the more specific)


def register(family: Family) -> None:
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES.append(family)


def names() -> List[str]:
    return [f.name for f in FAMILIES]


def named(name: str) -> Family:
    """The family called `name` (Tokenizer.family, --family), or an error naming the known ones."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise LlamaMPError(f"Unknown model family {name!r}; llama_mp knows {', '.join(names())}.")


def family_of(args) -> Family:
    """The family of parsed params (ModelArgs); None (params unknown, as for a damaged folder) is the
    oldest family, whose layout is the common one."""
    if args is None:
        return FAMILIES[0]
    return next(f for f in reversed(FAMILIES) if f.identifies(args))


def own_params_of(raw: Dict[str, Any]) -> Optional[OwnParams]:
    """The own fields of the family a raw params.json dict belongs to, if that family has any."""
    return next((f.own_params for f in reversed(FAMILIES) if f.own_params and f.own_params.is_in(raw)), None)


def own_params() -> List[OwnParams]:
    return [f.own_params for f in FAMILIES if f.own_params is not None]


def tokenizer_family(fmt: str, path: str, model_family: Optional[str]) -> Family:
    """The family whose tokenizer reads the `fmt` file at `path`, for a model of `model_family` (or None)."""
    return next(f for f in reversed(FAMILIES) if f.tokenizer_format == fmt
                and (f.claims_tokenizer is None or f.claims_tokenizer(path, model_family)))


# One line per family, oldest first; each module needs the classes above.
register(importlib.import_module(".llama", __name__).FAMILY)
register(importlib.import_module(".llama3", __name__).FAMILY)
register(importlib.import_module(".llama4", __name__).FAMILY)
