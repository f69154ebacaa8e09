"""Llama 4 (Scout, Maverick; text): its own params fields, layout, layers, tokenizer and chat format.

The implementation stays in checkpoints/llama4.py (params fields, layout, names), runtime/llama4.py
(MoE and dense layers, NoPE, chunked attention, temperature) and runtime/llama4_tokenizer.py (2048
special tokens, header/eot chat format); this is what the generic code is told of them.
"""

from ..checkpoints import llama4 as fields
from . import Family, OwnParams, ToolRules, piece



def claims_tokenizer(path: str, model_family) -> bool:
    """Llama 4's 200,000-rank file, or a tiktoken file of another size read for a Llama 4 model."""
    return piece("runtime.llama4_tokenizer:is_llama4_file")(path, model_family)


def rope_high_freq_factor(args) -> float:
    factor = args.llama4.rope_high_freq_factor
    return fields.LLAMA4_ROPE_HIGH_FREQ_FACTOR if factor is None else factor


def shipped_names(sd):
    """Meta's Llama 4 model names (experts.w1, wq, ...) read as the shipped ones; any other shard as it is."""
    return fields.fused_names(sd) if fields.has_unfused_names(sd) else sd


def loading_notes(args):
    return (["this Llama 4 checkpoint's vision encoder is not read; llama_mp runs its text model."]
            if args.llama4.has_vision else [])


# Scout's kinds of layer at a small size for `synth --family llama4`: MoE (4 experts, top 1) every other
# layer, the others dense as in Maverick, NoPE every 4th layer, chunks of 16 positions, qk norm,
# temperature tuning.
SYNTH_PARAMS = {"rope_theta": 500000.0, "ffn_exp": 4.0, "ffn_dim_multiplier": 1.2,
                "moe_args": {"num_experts": 4, "top_k": 1, "interleave_moe_layer_step": 2,
                             "capacity_factor": 1.0, "auto_scale_F": True},
                "nope_layer_interval": 4, "attention_chunk_size": 16, "use_qk_norm": True,
                "attn_temperature_tuning": True, "floor_scale": 8192.0, "attn_scale": 0.1}

# Llama 4's (llama-stack's models/llama/llama4/prompt_templates/system_prompts.py, as its Jinja renders it)
LLAMA4_PYTHON_LIST_PROMPT = (
    "You are a helpful assistant and an expert in function composition. You can answer general questions using "
    "your internal knowledge OR invoke functions when necessary. Follow these strict guidelines:\n\n"
    "1. FUNCTION CALLS:\n"
    "- ONLY use functions that are EXPLICITLY listed in the function list below\n"
    "- If NO functions are listed (empty function list []), respond ONLY with internal knowledge or "
    "\"I don't have access to [Unavailable service] information\"\n"
    "- If a function is not in the list, respond ONLY with internal knowledge or \"I don't have access to "
    "[Unavailable service] information\"\n"
    "- If ALL required parameters are present AND the query EXACTLY matches a listed function's purpose: output "
    "ONLY the function call(s)\n"
    "- Use exact format: [func_name1(param1=value1, param2=value2), func_name2(...)]\n"
    "Examples:\n"
    "CORRECT: [get_weather(location=\"Vancouver\"), calculate_route(start=\"Boston\", end=\"New York\")] <- Only "
    "if get_weather and calculate_route are in function list\n"
    "INCORRECT: get_weather(location=\"New York\")\n"
    "INCORRECT: Let me check the weather: [get_weather(location=\"New York\")]\n"
    "INCORRECT: [get_events(location=\"Singapore\")] <- If function not in list\n\n"
    "2. RESPONSE RULES:\n"
    "- For pure function requests matching a listed function: ONLY output the function call(s)\n"
    "- For knowledge questions: ONLY output text\n"
    "- For missing parameters: ONLY request the specific missing parameters\n"
    "- For unavailable services (not in function list): output ONLY with internal knowledge or \"I don't have "
    "access to [Unavailable service] information\". Do NOT execute a function call.\n"
    "- If the query asks for information beyond what a listed function provides: output ONLY with internal "
    "knowledge about your limitations\n"
    "- NEVER combine text and function calls in the same response\n"
    "- NEVER suggest alternative functions when the requested service is unavailable\n"
    "- NEVER create or invent new functions not listed below\n\n"
    "3. STRICT BOUNDARIES:\n"
    "- ONLY use functions from the list below - no exceptions\n"
    "- NEVER use a function as an alternative to unavailable information\n"
    "- NEVER call functions not present in the function list\n"
    "- NEVER add explanatory text to function calls\n"
    "- NEVER respond with empty brackets\n"
    "- Use proper Python/JSON syntax for function calls\n"
    "- Check the function list carefully before responding\n\n"
    "4. TOOL RESPONSE HANDLING:\n"
    "- When receiving tool responses: provide concise, natural language responses\n"
    "- Don't repeat tool response verbatim\n"
    "- Don't add supplementary information\n\n"
    "Here is a list of functions in JSON format that you can invoke:\n")

# python_list only (Meta's stack offers Llama 4 no other format), code between <|python_start|> and
# <|python_end|>, and <|eom|> ending every turn that calls.
TOOLS = ToolRules(default_format="python_list", formats=("python_list",),
                  formats_text="the pythonic list `[f(a=1), g()]`",
                  code_tags=("<|python_start|>", "<|python_end|>"),
                  python_list_prompt=LLAMA4_PYTHON_LIST_PROMPT,
                  eom_after_any_call=True, code_interpreter_tag=False)

FAMILY = Family(
    name="llama4",
    title="Llama 4",
    identifies=lambda args: args.llama4 is not None,
    tokenizer_format="tiktoken",
    tokenizer_text="tiktoken, 2048 special tokens",
    tokenizer_class="runtime.llama4_tokenizer:Llama4Tokenizer",
    chat_format="runtime.llama4_tokenizer:encode_dialog",
    synth_tokenizer="llama4-tokenizer.model",
    synth_params=SYNTH_PARAMS,
    hf_tokenizer_class="PreTrainedTokenizerFast",
    claims_tokenizer=claims_tokenizer,
    tools=TOOLS,
    vocab_in_params=True,
    cpu_kernels_problem="the C kernels have no mixture-of-experts, NoPE or chunked attention layers",
    compiled_quantized_problem=(
        "--decoder compiled cannot run a quantized Llama 4: its packed int8/int4 products have no layout for the "
        "routed experts (stacks of [in, out] matrices quantized expert by expert), and `llama-mp plan` cannot "
        "count them. Use --decoder pytorch or static (auto picks pytorch), which multiply by the dequantised "
        "experts."),
    own_params=OwnParams(attribute="llama4", fields=fields.FIELDS, is_in=fields.is_llama4,
                         with_defaults=fields.with_defaults, parse=fields.parse_fields),
    layout="checkpoints.llama4",
    layers_alike=False,  # MoE and dense layers
    shipped_names=shipped_names,
    hf_model_types=("llama4", "llama4_text"),
    hf_special_ids=(200000, [200001, 200007, 200008]),  # begin_of_text; end_of_text, eom, eot
    hf_format="checkpoints.hf_llama4",
    rope_scale=lambda args: fields.LLAMA4_ROPE_SCALE,
    rope_high_freq_factor=rope_high_freq_factor,
    layers="runtime.llama4",
    attention_chunk=lambda args: args.llama4.attention_chunk_size,
    loading_notes=loading_notes,
)
