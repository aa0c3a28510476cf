"""Chat templates: rendering a conversation and tokenising only what a new turn adds.

A template is the model's own (`tokenizer.chat_template`) or an explicit Jinja string / file; a
model without one needs it given: a template is never guessed. Rendering goes through the
tokenizer's `apply_chat_template` (HF's Jinja environment, so templates behave as in transformers).

The token history grows by appending: a new turn adds the tokens of the text its rendering adds
after the previous rendering (`suffix`), and a reply adds its generated tokens plus the tokens of
the text the template puts after an assistant message (`closing`). The history is therefore the
tokenisation of the rendered conversation piece by piece, never re-tokenised as a whole (which
could merge tokens across a turn boundary and invalidate the KV cache).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


class TemplateError(ValueError):
    """No chat template, or one that cannot be applied turn by turn."""


def resolve_template(model, chat_template: Optional[str]) -> str:
    """A Jinja string: `chat_template` itself, the file it names, or the tokenizer's own."""
    if model.tokenizer is None:
        raise TemplateError(f"model at {model.path} has no tokenizer; a conversation needs one to encode text")
    if chat_template is not None:
        if "{" not in chat_template and "\n" not in chat_template:
            path = Path(chat_template).expanduser()
            if not path.is_file():
                raise TemplateError(f"chat template {chat_template!r} is neither a Jinja template nor an existing "
                                    f"file; pass the template text or a path to a .jinja file")
            chat_template = path.read_text()
        if not chat_template.strip():
            raise TemplateError("the chat template is empty; pass a Jinja template string or file")
        return chat_template
    own = getattr(model.tokenizer, "chat_template", None)
    if not own:
        raise TemplateError(f"model at {model.path} has no chat template (tokenizer_config.json has no "
                            f"'chat_template'); pass chat_template= (a Jinja string or a file path; the CLI: "
                            f"--chat-template FILE). rewire-jax never guesses a template")
    if isinstance(own, dict):   # named templates: the default one
        own = own.get("default") or next(iter(own.values()))
    return own


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """The conversation as text (no tokenisation)."""
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:   # jinja2 errors: name the template as the culprit
        raise TemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from e


def suffix(before: str, after: str) -> str:
    """The text `after` adds to `before`, or a TemplateError if it rewrites earlier turns."""
    if not after.startswith(before):
        raise TemplateError("the chat template renders earlier turns differently once a new turn is added; "
                            "a conversation needs a template whose rendering only grows at the end")
    return after[len(before):]
