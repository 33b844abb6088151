"""JSON on the canvas: an object schema -> a template whose keys and punctuation are pinned and whose
values are holes constrained to their type, so the output always parses and matches."""

from __future__ import annotations

import json
from typing import Any, Iterator

from ..diffusion.options import GenerationOptions
from . import template as tpl
from ..prompts.render import prompt_ids
from .infill import CanvasPlan, InfillResult, canvas_options, layout_plan, run_plan
from .template import Fixed, Hole, TemplateError

_JSON_TYPES = ("string", "integer", "number", "boolean")
MAX_PROPERTIES = 256  # each is a hole and a pinned key: more would not fit a context anyway


def json_segments(schema: dict, string_tokens: int = 16, number_tokens: int = 6) -> list[tpl.Segment]:
    """A template for an object schema (string / integer / number / boolean / enum fields): keys,
    quotes and punctuation fixed, one hole per value. Numbers are written as whole numbers,
    non-negative unless the schema's `minimum` is negative."""
    if not isinstance(schema, dict) or schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise TemplateError("the JSON schema must be an object schema with 'properties'")
    props = schema["properties"]
    if not props:
        raise TemplateError("the JSON schema has no properties")
    if len(props) > MAX_PROPERTIES:
        raise TemplateError(f"the JSON schema has {len(props)} properties; at most {MAX_PROPERTIES} are supported")
    segments: list[tpl.Segment] = []
    text = "{"
    for i, (key, spec) in enumerate(props.items()):
        if not isinstance(spec, dict):
            raise TemplateError(f"property {key!r}: its schema must be an object")
        name = f"f{i}"
        # Compact separators: no space before a value, so that tokenizers that join a space to
        # the next word do not see a pinned lone space before a hole (see template.check_merges).
        text += ("" if i == 0 else ",") + json.dumps(key, ensure_ascii=False) + ":"
        if "enum" in spec:
            options = spec["enum"]
            if not options or not all(isinstance(o, str) for o in options):
                raise TemplateError(f"property {key!r}: only non-empty enums of strings are supported")
            segments += [Fixed(text + '"'), Hole(name, None, options=tuple(options))]
            text = '"'
        elif spec.get("type") == "boolean":
            segments += [Fixed(text), Hole(name, None, options=("true", "false"))]
            text = ""
        elif spec.get("type") == "string":
            n = spec.get("maxLength", string_tokens)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= tpl.MAX_HOLE_TOKENS:
                raise TemplateError(f"property {key!r}: maxLength must be an integer from 1 to {tpl.MAX_HOLE_TOKENS}")
            segments += [Fixed(text + '"'), Hole(name, max(1, n), exact=False, allowed="string")]
            text = '"'
        elif spec.get("type") in ("integer", "number"):
            minimum = spec.get("minimum")
            kind = "signed" if isinstance(minimum, (int, float)) and minimum < 0 else "integer"
            segments += [Fixed(text), Hole(name, number_tokens, exact=False, allowed=kind)]
            text = ""
        else:
            raise TemplateError(f"property {key!r}: type {spec.get('type')!r} is not supported "
                                f"(use one of {', '.join(_JSON_TYPES)} or an enum of strings)")
    segments.append(Fixed(text + "}"))
    return [s for s in segments if not (isinstance(s, Fixed) and not s.text)]


def _json_value(spec: dict, text: str):
    if "enum" in spec or spec.get("type") == "string":
        return text
    if spec.get("type") == "boolean":
        return text == "true"
    return int(text)  # digits with an optional sign (the masks guarantee it)


def json_plan(model, tokenizer, ids: list[int], schema: dict, options: GenerationOptions) -> CanvasPlan:
    """The canvas plan of a JSON object for `schema` after the prompt `ids`: TemplateError (before
    any work) for a schema that cannot be pinned or does not fit the context. Its result's `.value`
    is the parsed object, `.text` its JSON."""
    segments = json_segments(schema)
    lay = tpl.layout(tokenizer, segments)
    tpl.check_context(lay, model, len(ids))
    plan = layout_plan(model, tokenizer, ids, lay, options)
    specs = list(schema["properties"].items())

    def finish(result) -> InfillResult:
        out = fill(result)
        value = {}
        holes = {}
        for i, (key, spec) in enumerate(specs):
            raw = out.holes[f"f{i}"]
            if spec.get("type") in ("integer", "number") and "enum" not in spec:
                if raw in ("", "-"):  # cannot happen with the masks; kept as a guard
                    raise TemplateError(f"the model wrote no number for {key!r}")
                raw = str(int(raw))
            holes[key] = raw
            value[key] = _json_value(spec, raw)
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))  # as pinned on the canvas
        return InfillResult(text, holes, out.details, out.result, value=value)

    fill = plan.finish
    return CanvasPlan(plan.request, finish,
                      reply=lambda out: (out.text, sum(len(d["tokens"]) for d in out.details.values()), "stop"))


def stream_fill_json(model, tokenizer, prompt, schema: dict, *, thinking: bool | None = None,
                     options: GenerationOptions | None = None, **kwargs: Any) -> Iterator:
    """`fill_json` as events; the last item is the InfillResult (its `.value` the parsed object)."""
    opts = canvas_options(options, kwargs, thinking)
    json_segments(schema)  # the schema's errors before the prompt is rendered
    ids = prompt_ids(tokenizer, prompt, opts.thinking)
    yield from run_plan(model, tokenizer, json_plan(model, tokenizer, ids, schema, opts))


def fill_json(model, tokenizer, prompt, schema: dict, **options: Any) -> InfillResult:
    """Fill a JSON object for a small schema; `.value` is the parsed object, `.text` its JSON.

    Keys and punctuation are pinned; string values cannot contain a quote, a backslash or a
    control character, integers are digits with an optional sign, enums and booleans are read as
    the best option on the committing step. The text therefore always parses and matches."""
    out = None
    for item in stream_fill_json(model, tokenizer, prompt, schema, **options):
        out = item
    return out
