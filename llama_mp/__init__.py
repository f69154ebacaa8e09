"""llama_mp: model-parallel LLaMA inference over Meta checkpoints, launched with torchrun."""

from .chat import Dialog, Message
from .errors import LlamaMPError
from .generation import ChatPrediction, CompletionPrediction, Llama
from .model import Transformer
from .params import ModelArgs
from .tokenizer import Tokenizer

__all__ = ["Llama", "Dialog", "Message", "ChatPrediction", "CompletionPrediction", "ModelArgs",
           "Transformer", "Tokenizer", "LlamaMPError"]
__version__ = "0.1.0"
