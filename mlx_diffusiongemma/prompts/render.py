"""Prompts -> token ids: the one renderer of conversations, through the checkpoint's chat template.

Every face renders here: the Python API, the chat, the HTTP server and training. A chat template is
Jinja code from the checkpoint (or, over HTTP, from a client): it runs under a wall-clock limit
(`timelimit.py`), and a template that raises on a conversation is reported as `ChatTemplateError`.
"""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx

from ..errors import DiffusionGemmaError
from .timelimit import time_limit

Messages = Sequence[dict[str, Any]]

# Longest a chat template may take to render (the Gemma 4 template takes milliseconds).
TEMPLATE_TIME_LIMIT = 10.0


# Names a caller may not set through `template_kwargs`: what the renderer and transformers'
# apply_chat_template set themselves (the conversation, the special tokens, transformers' template
# globals) and apply_chat_template's own parameters, which would change how it renders or what it
# returns (another template, text instead of ids, tensors).
RENDERER_KEYS = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "bos_token", "eos_token", "pad_token", "unk_token", "raise_exception", "strftime_now",
    "chat_template", "tokenize", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "padding", "truncation", "max_length", "tokenizer_kwargs", "processor_kwargs",
})


class ChatTemplateError(DiffusionGemmaError, ValueError):
    """The chat template refused the conversation (it raised while rendering it)."""


def template_variables(tokenizer) -> frozenset[str]:
    """The `template_kwargs` names a caller may set: the variables the checkpoint's chat template
    reads (found by Jinja's own parser, as vLLM filters its `chat_template_kwargs`), less
    RENDERER_KEYS; `enable_thinking` always (render_messages sets it itself)."""
    from jinja2 import TemplateError, meta
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = getattr(tokenizer, "chat_template", None)
    sources = template.values() if isinstance(template, dict) else [template]
    env = ImmutableSandboxedEnvironment(extensions=[loopcontrols])  # transformers' {% break %}
    names: set[str] = set()
    for source in sources:
        if not isinstance(source, str):
            continue
        try:
            names |= meta.find_undeclared_variables(env.parse(source))
        except TemplateError:  # a tag of transformers' own ({% generation %}): no extra variables
            pass
    return frozenset((names - RENDERER_KEYS) | {"enable_thinking"})


def render_messages(tokenizer, messages: Messages, thinking: bool | None = False, *,
                    tools: Sequence[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation (with the model turn's header when `add_generation_prompt`),
    through the checkpoint's template. `thinking` sets the template's `enable_thinking` (None:
    leave it to the template and `template_kwargs`); `tools` are the OpenAI-style tool schemas."""
    if getattr(tokenizer, "chat_template", None) is None:
        text = "\n".join(str(m.get("content", "")) for m in messages)
        return list(tokenizer.encode(text))
    kwargs = dict(template_kwargs or {})
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    if tools is not None:
        kwargs["tools"] = tools
    with time_limit(TEMPLATE_TIME_LIMIT, "rendering the chat template"):
        try:
            ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                tokenize=True, **kwargs)
        except Exception as e:  # jinja raises TemplateError (and others) on a conversation it refuses
            raise ChatTemplateError(f"the chat template rejected the conversation: {e}") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def prompt_ids(tokenizer, prompt: str | Messages | Sequence[int] | mx.array, thinking: bool = False) -> list[int]:
    """A string is one user message; a list of dicts is a conversation; ids are used as given."""
    if isinstance(prompt, mx.array):
        return [int(i) for i in prompt.reshape(-1).tolist()]
    if isinstance(prompt, str):
        return render_messages(tokenizer, [{"role": "user", "content": prompt}], thinking)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return render_messages(tokenizer, prompt, thinking)
    return [int(i) for i in prompt]
