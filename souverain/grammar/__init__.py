"""Grammar-constrained decoding with llguidance: JSON output and tool calls.

>>> proc = json_processor(tokenizer, {"type": "object", "properties": {...}}, vocab_size=V)
>>> SamplingParams(logits_processors=[proc])

Each processor bans, at every step, the tokens its grammar does not allow next; the server
maps `GrammarError` (bad schema, unknown tool, impossible grammar) to HTTP 400.
"""

from souverain.grammar.builders import (
    JSON_OPTIONS,
    json_processor,
    tool_call_processor,
    tools_system_prompt,
)
from souverain.grammar.processor import GrammarError, GrammarProcessor
from souverain.grammar.vocab import ll_tokenizer, token_bytes, token_table

__all__ = [
    "JSON_OPTIONS",
    "GrammarError",
    "GrammarProcessor",
    "json_processor",
    "ll_tokenizer",
    "token_bytes",
    "token_table",
    "tool_call_processor",
    "tools_system_prompt",
]
