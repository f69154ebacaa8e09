"""Weight-only quantization: int8 per output channel and int4 in groups along the input (scheme.py); Llama 4's
routed experts in the same formats, expert by expert (experts.py)."""

from .scheme import MODES, INT4_GROUP_SIZES, Scheme, dequantize, parse_scheme, quantize

__all__ = ["MODES", "INT4_GROUP_SIZES", "Scheme", "dequantize", "parse_scheme", "quantize"]
