"""A GPU inference engine for BitNet b1.58 (ternary-weight) language models."""

from .llm import LLM, Completion, GenerationStats
from .sampling import SamplingParams

__all__ = ["LLM", "Completion", "GenerationStats", "SamplingParams"]
__version__ = "0.1.0"
