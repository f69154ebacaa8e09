"""Llama 3.x (3.0 to 3.3): a 128256-token tiktoken vocabulary and, from 3.1 on, scaled rope.

Told apart from Llama 2 by `use_scaled_rope` or that vocabulary; its embedding is split by vocabulary
rows (fairscale's VocabParallelEmbedding), and Meta states the context it was made for.
"""

from . import Family, ToolRules
from .llama import SPLIT_DIMS as LLAMA_SPLIT_DIMS

LLAMA3_VOCAB = 128256          # 128000 BPE tokens + 256 special tokens
LLAMA3_CONTEXT = 8192          # Llama 3
LLAMA31_CONTEXT = 131072       # Llama 3.1, 3.2, 3.3 (scaled rope)
LLAMA32_SMALL_SHAPES = {(2048, 16), (3072, 28)}  # Llama 3.2 1B and 3B: (dim, n_layers); rope scaled by 32


def max_context(args):
    return LLAMA31_CONTEXT if args.use_scaled_rope else LLAMA3_CONTEXT


def rope_scale(args) -> float:
    return 32.0 if (args.dim, args.n_layers) in LLAMA32_SMALL_SHAPES else 8.0


# Llama 3.2's and 3.3's system prompt for custom tools in the pythonic format (llama-stack's)
PYTHON_LIST_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the function can be used, point it out. If the given question lacks the parameters required "
    "by the function,\nalso point it out. You should only return the function call in tools call sections.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of "
    "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
    "You SHOULD NOT include any other text in the response.\n\n"
    "Here is a list of functions in JSON format that you can invoke.\n\n")

# Llama 3.1's json (llama-stack's default for a Llama 3 model it cannot name) unless python_list is asked
# for (3.2, 3.3); `<|python_tag|>` before code for the interpreter, `<|eom_id|>` after built-in calls.
TOOLS = ToolRules(default_format="json", formats=("json", "python_list"), formats_text="json or python_list",
                  code_tags=("<|python_tag|>", ""), python_list_prompt=PYTHON_LIST_PROMPT,
                  eom_after_any_call=False, code_interpreter_tag=True)

FAMILY = Family(
    name="llama3",
    title="Llama 3.x",
    identifies=lambda args: args.use_scaled_rope or args.vocab_size == LLAMA3_VOCAB,
    tokenizer_format="tiktoken",
    tokenizer_text="tiktoken",
    tokenizer_class="runtime.tokenizer:TiktokenTokenizer",
    chat_format="runtime.chat:encode_llama3_dialog",
    synth_tokenizer="llama3-tokenizer.model",
    synth_params={"rope_theta": 500000.0, "use_scaled_rope": True},
    hf_tokenizer_class="PreTrainedTokenizerFast",
    tools=TOOLS,
    vocab_in_params=True,
    split_dims={**LLAMA_SPLIT_DIMS, "tok_embeddings.weight": 0},
    hf_model_types=("llama",),  # LlamaForCausalLM, as Llama 2's
    # Meta's HF configs (transformers' convert_llama_weights_to_hf.py) give bos 128000 and, for instruct
    # models, end_of_text, eom_id and eot_id; llama_mp stops on all three for every Llama 3 model.
    hf_special_ids=(128000, [128001, 128008, 128009]),
    max_context=max_context,
    rope_scale=rope_scale,
)
