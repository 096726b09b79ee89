"""Chat models behind one protocol: the bundled local model, any Hugging Face
causal-LM directory, and any OpenAI-compatible endpoint.

Import nothing heavy here; torch/transformers load inside ``local``.
"""

from personal_gpt.models.base import ChatModel, Usage

__all__ = ["ChatModel", "Usage"]
