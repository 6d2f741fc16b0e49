"""Prompt rendering, shared by training and evaluation so that both see exactly the same text.

Templates:
- ``coin``: the paper's official format, ``"{instruction}\\n{input}\\n\\n### Response:\\n"`` then the output.
- ``alpaca``: the Stanford Alpaca template (with or without an input).
- ``chat``: the tokenizer's own chat template, the instruction and input as one user turn.
- ``auto``: ``chat`` when the tokenizer has a chat template, ``alpaca`` otherwise.
"""

from __future__ import annotations

TEMPLATES = ("auto", "coin", "alpaca", "chat")

_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def resolve_template(template: str, tokenizer=None) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt template 'chat' needs a tokenizer with a chat template; use 'alpaca' or 'coin'")
    return template


def render_prompt(template: str, instruction: str, input: str, tokenizer=None) -> str:
    """The text the model sees before its answer (the answer itself is appended by the caller)."""
    template = resolve_template(template, tokenizer)
    instruction, input = instruction.strip(), input.strip()
    if template == "coin":
        return f"{instruction}\n{input}\n\n### Response:\n" if input else f"{instruction}\n\n### Response:\n"
    if template == "alpaca":
        return (_ALPACA_INPUT if input else _ALPACA_NO_INPUT).format(instruction=instruction, input=input)
    content = f"{instruction}\n\n{input}" if input else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
