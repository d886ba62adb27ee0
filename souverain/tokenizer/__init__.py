"""Tokenizers: mistral-common files, GGUF-embedded BPE, Hugging Face tokenizer.json.

Every kind implements `Tokenizer` (encode/decode, chat with tools, FIM, tool-call parsing,
stop ids); `IncrementalDetokenizer` streams generated ids as text.
"""

from souverain.tokenizer.base import Tokenizer
from souverain.tokenizer.detokenize import IncrementalDetokenizer
from souverain.tokenizer.gguf_tokenizer import tokenizer_from_gguf
from souverain.tokenizer.loader import find_tokenizer_in_dir, load_tokenizer_file

__all__ = [
    "IncrementalDetokenizer",
    "Tokenizer",
    "find_tokenizer_in_dir",
    "load_tokenizer_file",
    "tokenizer_from_gguf",
]
