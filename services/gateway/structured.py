"""Structured output requests: OpenAI's ``response_format`` and vLLM's ``structured_outputs`` and
``guided_*`` fields, read into the one llguidance grammar the sampling instances follow
(``libs/engine/grammar.py``). Plain logic: the gateway checks the grammar against the tokenizer.

Accepted (at most one constraint per request):
- ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}`` (any JSON object),
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``;
- ``structured_outputs``: one of ``json`` (a schema, as an object or a JSON string), ``json_object``,
  ``regex``, ``choice`` (a list of strings) or ``grammar`` (Lark, or GBNF/EBNF as llama.cpp writes
  it), and ``disable_any_whitespace``;
- the same as ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``.
JSON is compact by default (no whitespace beyond ``", "`` and ``": "``): a model free to put any
whitespace between tokens can fill its whole budget with it. ``whitespace_pattern`` (a regular
expression; vLLM's ``guided_whitespace_pattern``) sets what may go there instead, and
``disable_any_whitespace: false`` allows any.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import msgspec
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from services.gateway.errors import ApiError

MAX_CHOICES = 256
# backends a client may name: this server has one
BACKENDS = (None, "auto", "guidance", "llguidance")


class JsonSchemaFormat(msgspec.Struct, forbid_unknown_fields=True):
    name: str | None = None
    description: str | None = None
    schema: Any = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, forbid_unknown_fields=True):
    """vLLM's ``structured_outputs`` parameter."""

    json: Any = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool | None = None
    whitespace_pattern: str | None = None
    # vLLM's, not implemented here: refused by name when set
    structural_tag: Any = None
    disable_fallback: bool | None = None
    disable_additional_properties: bool | None = None


def _bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _whitespace(disable_any: bool | None, pattern: str | None) -> dict:
    """llguidance's JSON options for the whitespace a request allows between tokens."""
    if pattern is not None:
        return {"whitespace_pattern": pattern}
    return {"whitespace_flexible": disable_any is False}


def _schema_grammar(schema: Any, param: str, whitespace: dict) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise _bad(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise _bad(f"{param} must be a JSON schema (an object)", param)
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=whitespace)


def _choice_grammar(choices: Any, param: str) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise _bad(f"{param} must be a non-empty list of non-empty strings", param)
    if len(choices) > MAX_CHOICES:
        raise _bad(f"{param} may list at most {MAX_CHOICES} choices", param)
    # Lark's string literals take JSON's escapes
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def _lark_grammar(text: Any, param: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise _bad(f"{param} must be a grammar (Lark, or GBNF)", param)
    try:
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(text))
    except GbnfToLarkError as e:
        raise _bad(f"{param} is neither a Lark nor a GBNF grammar: {e}", param) from None


def _regex_grammar(pattern: Any, param: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise _bad(f"{param} must be a non-empty regular expression", param)
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def _response_format(fmt: ResponseFormat, whitespace: dict) -> str | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _schema_grammar({"type": "object"}, "response_format", whitespace)
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise _bad("response_format json_schema needs json_schema.schema", "response_format.json_schema")
        return _schema_grammar(fmt.json_schema.schema, "response_format.json_schema.schema", whitespace)
    raise _bad(f"response_format type must be text, json_object or json_schema, not {fmt.type[:32]!r}",
               "response_format.type")


def _structured_outputs(so: StructuredOutputs, whitespace: dict) -> str | None:
    for name in ("structural_tag", "disable_fallback", "disable_additional_properties"):
        if getattr(so, name) not in (None, False):
            raise ApiError(400, f"structured_outputs.{name} is not supported by this server",
                           param=f"structured_outputs.{name}", code="unsupported_parameter")
    given = [name for name in ("json", "json_object", "regex", "choice", "grammar")
             if getattr(so, name) not in (None, False)]
    if len(given) > 1:
        raise _bad(f"structured_outputs takes one of json, json_object, regex, choice, grammar; got {given}",
                   f"structured_outputs.{given[1]}")
    if not given:
        return None
    kind, param = given[0], f"structured_outputs.{given[0]}"
    if kind == "json":
        return _schema_grammar(so.json, param, whitespace)
    if kind == "json_object":
        return _schema_grammar({"type": "object"}, param, whitespace)
    if kind == "regex":
        return _regex_grammar(so.regex, param)
    if kind == "choice":
        return _choice_grammar(so.choice, param)
    return _lark_grammar(so.grammar, param)


def request_grammar(req: Any) -> tuple[str, str] | None:
    """(the field that asked, the llguidance grammar) a request's output must follow, or None; raises a 400 naming
    the field for a malformed or conflicting one. ``req`` has the fields of ``services/gateway/openai.py``'s
    ``_Common``."""
    if req.guided_decoding_backend not in BACKENDS:
        raise ApiError(400, f"guided_decoding_backend {str(req.guided_decoding_backend)[:32]!r} is not available; "
                       "this server's is llguidance (\"guidance\")", param="guided_decoding_backend",
                       code="unsupported_parameter")
    so = req.structured_outputs
    if so is not None and so.whitespace_pattern is not None and req.guided_whitespace_pattern is not None:
        raise _bad("give the whitespace pattern once", "guided_whitespace_pattern")
    pattern = req.guided_whitespace_pattern if so is None or so.whitespace_pattern is None else so.whitespace_pattern
    whitespace = _whitespace(so.disable_any_whitespace if so is not None else None, pattern)
    found: list[tuple[str, str]] = []
    if req.response_format is not None:
        g = _response_format(req.response_format, whitespace)
        if g is not None:
            found.append(("response_format", g))
    if so is not None:
        g = _structured_outputs(so, whitespace)
        if g is not None:
            found.append(("structured_outputs", g))
    if req.guided_json is not None:
        found.append(("guided_json", _schema_grammar(req.guided_json, "guided_json", whitespace)))
    if req.guided_regex is not None:
        found.append(("guided_regex", _regex_grammar(req.guided_regex, "guided_regex")))
    if req.guided_choice is not None:
        found.append(("guided_choice", _choice_grammar(req.guided_choice, "guided_choice")))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", _lark_grammar(req.guided_grammar, "guided_grammar")))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise _bad(f"a request takes one structured output constraint; got {names}", found[1][0])
    json_kinds = ("response_format", "guided_json") + (("structured_outputs",) if so is not None and (
        so.json is not None or so.json_object) else ())
    if pattern is not None and not (found and found[0][0] in json_kinds):
        param = "guided_whitespace_pattern" if req.guided_whitespace_pattern is not None else \
            "structured_outputs.whitespace_pattern"
        raise _bad("a whitespace pattern applies to JSON output (json_object, a JSON schema) only", param)
    if found and req.ignore_eos:
        raise _bad("ignore_eos cannot be combined with structured output (the grammar ends the output)",
                   "ignore_eos")
    return found[0] if found else None
