"""Chat rows: what a list of messages is, and rendering a prompt and its completion with the
tokenizer's chat template (the completion is what the template adds after the prompt)."""

from __future__ import annotations

from typing import Any


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def as_assistant_messages(value: Any) -> list[dict] | None:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return value if is_messages(value) else None


def render_chat(
    tokenizer, prompt_messages: list[dict], completion_messages: list[dict], tools: list | None = None
) -> tuple[str, str]:
    """Render prompt and completion with the chat template; the completion is the text the
    template adds after the prompt (with the generation prompt) when the reply is appended."""
    prompt_text = tokenizer.apply_chat_template(
        prompt_messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(prompt_messages + completion_messages, tools=tools, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the full dialogue")
    return prompt_text, full_text[len(prompt_text) :]
