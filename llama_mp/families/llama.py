"""LLaMA 1, Llama 2 and Code Llama: the first family, and the one every later family is told apart from.

A SentencePiece tokenizer, [INST] turns written as text (so dialogs are guarded against forged tags, and
turns alternate), no tool calling, the embedding split by its columns, params.json's vocab_size -1.
"""

from . import Family

# The dimension each tensor is split along across Meta's shards (None: replicated); keys inside a layer
# without their "layers.N." prefix. Llama 3 changes only the embedding's.
SPLIT_DIMS = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}

FAMILY = Family(
    name="llama",
    title="LLaMA / Llama 2 / Code Llama",
    identifies=lambda args: True,  # what no newer family claims
    tokenizer_format="sentencepiece",
    tokenizer_text="SentencePiece",
    tokenizer_class="runtime.tokenizer:SentencePieceTokenizer",
    chat_format="runtime.chat:encode_llama2_dialog",
    synth_tokenizer="tokenizer.model",
    synth_params={},
    hf_tokenizer_class="LlamaTokenizer",
    text_turn_markers=True,
    split_dims=SPLIT_DIMS,
    hf_model_types=("llama",),
    hf_special_ids=(1, [2]),
)
