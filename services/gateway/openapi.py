"""The OpenAPI document of the gateway, built from the request Structs the gateway validates with."""

from __future__ import annotations

import msgspec

from yuebing import __version__

from services.gateway import openai as oa


def _error_response(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def document(model_name: str) -> dict:
    (chat, completion, tokenize, detokenize), components = msgspec.json.schema_components(
        [oa.ChatCompletionRequest, oa.CompletionRequest, oa.TokenizeRequest, oa.DetokenizeRequest],
        ref_template="#/components/schemas/{name}"
    )
    components["ErrorResponse"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                                 "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                "param": {"type": ["string", "null"]},
                                                "code": {"type": ["string", "null"]}}}},
    }
    errors = {
        "400": _error_response("invalid request"),
        "401": _error_response("missing or wrong API key"),
        "404": _error_response("unknown model"),
        "413": _error_response("request body too large"),
        "429": _error_response("not admitted now; see Retry-After"),
        "503": _error_response("no worker available; see Retry-After"),
    }
    completion_ok = {
        "description": "a completion (JSON), or a stream of server-sent events ending in `data: [DONE]`",
        "content": {"application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}}},
    }

    def post(summary: str, schema: dict, ok: dict = completion_ok, description: str | None = None) -> dict:
        op = {"summary": summary, "security": [{"bearer": []}],
              "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
              "responses": {"200": ok, **errors}}
        if description:
            op["description"] = description
        return {"post": op}

    def json_ok(description: str) -> dict:
        return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}

    def refused(typ) -> str:
        return ("Fields outside the schema are refused with a 400 naming them (code unknown_parameter); "
                "these OpenAI and vLLM fields, not implemented, are refused with a 400 naming them "
                "(code unsupported_parameter) unless given their default value: " + ", ".join(sorted(oa.UNSUPPORTED[typ])))

    return {
        "openapi": "3.1.0",
        "info": {"title": "yuebing", "version": __version__,
                 "description": f"OpenAI-compatible API serving {model_name}"},
        "paths": {
            "/v1/chat/completions": post("Chat completion", chat, description=refused(oa.ChatCompletionRequest)),
            "/v1/completions": post("Text completion", completion, description=refused(oa.CompletionRequest)),
            "/tokenize": post("Token ids of a prompt, or of chat messages with the chat template applied (vLLM's)",
                              tokenize, json_ok("{count, max_model_len, tokens, token_strs}")),
            "/detokenize": post("Text of token ids (vLLM's)", detokenize, json_ok("{prompt}")),
            "/version": {"get": {"summary": "The server's version", "security": [{"bearer": []}],
                                 "responses": {"200": json_ok("{version}"), "401": errors["401"]}}},
            "/v1/models": {"get": {"summary": "Served models", "security": [{"bearer": []}],
                                   "responses": {"200": {"description": "model list",
                                                         "content": {"application/json": {"schema": {"type": "object"}}}},
                                                 "401": errors["401"]}}},
            "/health": {"get": {"summary": "Readiness: 200 when a conductor, a prefill and a decode are live",
                                "responses": {code: {"description": what,
                                                     "content": {"application/json": {"schema": {"type": "object"}}}}
                                              for code, what in (("200", "ready"),
                                                                 ("503", "not ready: the body's missing says why"))}}},
            "/live": {"get": {"summary": "Liveness of the gateway process, whatever the workers do",
                              "responses": {"200": {"description": "alive",
                                                    "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
