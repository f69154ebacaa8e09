"""llama_mp: model-parallel LLaMA inference over Meta checkpoints, launched with torchrun."""

from .checkpoints.params import ModelArgs
from .errors import LlamaMPError
from .runtime.chat import Dialog, Message
from .runtime.llama import ChatPrediction, CompletionPrediction, Llama
from .runtime.model import Transformer
from .runtime.tokenizer import Tokenizer

__all__ = ["Llama", "Dialog", "Message", "ChatPrediction", "CompletionPrediction", "ModelArgs",
           "Transformer", "Tokenizer", "LlamaMPError"]
__version__ = "0.1.0"
