"""API keys, the OpenAPI document, input bounds, and fuzzing of the HTTP API."""

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import start_cluster
from helpers import get_json, post


@pytest.fixture(scope="module")
def keyed_cluster(tiny_dir, tmp_path_factory):
    cluster = start_cluster(tiny_dir, tmp_path_factory.mktemp("keyed"), no_auth=False, api_keys="k-one,k-two")
    yield cluster
    cluster.stop()


async def test_api_keys_are_required_and_checked(keyed_cluster, tiny_dir):
    body = {"model": tiny_dir.name, "prompt": "hi", "max_tokens": 2}
    url = keyed_cluster.url + "/v1/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic k-one"}):
        status, resp, _ = await post(url, body, headers=headers)
        assert status == 401 and resp["error"]["code"] == "invalid_api_key"
    for key in ("k-one", "k-two"):
        status, resp, _ = await post(url, body, headers={"Authorization": f"Bearer {key}"})
        assert status == 200, resp
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.get(keyed_cluster.url + "/v1/models", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with s.get(keyed_cluster.url + "/v1/models", headers={"Authorization": "Bearer k-two"}) as r:
            assert r.status == 200 and (await r.json())["data"][0]["id"] == tiny_dir.name
        # the routes outside /v1/ that vLLM serves are behind the keys too
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]}), ("/version", None)):
            for headers, status in (({}, 401), ({"Authorization": "Bearer k-one"}, 200)):
                call = s.get(keyed_cluster.url + path, headers=headers) if body is None else \
                    s.post(keyed_cluster.url + path, json=body, headers=headers)
                async with call as r:
                    assert r.status == status, (path, headers, await r.text())
    assert (await get_json(keyed_cluster.url + "/health"))["ready"]  # health stays open
    assert (await get_json(keyed_cluster.url + "/live"))["status"] == "alive"  # and liveness


async def test_openapi_document(tiny_cluster):
    doc = await get_json(tiny_cluster.url + "/openapi.json")
    assert doc["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/version",
            "/health", "/live"} <= set(doc["paths"])
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(chat["required"])


async def test_deeply_nested_json_is_refused(tiny_cluster, tiny_dir):
    deep = {"type": "text", "text": "x"}
    for _ in range(40):
        deep = {"a": deep}
    body = {"model": tiny_dir.name, "messages": [{"role": "user", "content": "hi"}], "user": deep}
    status, resp, _ = await post(tiny_cluster.url + "/v1/chat/completions", body)
    assert status == 400 and resp["error"]["code"] == "too_deep"


# ---------------------------------------------------------------- fuzzing
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
                       st.text(max_size=40))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_FIELDS = ["model", "messages", "prompt", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
           "stream_options", "ignore_eos", "user", "stop_token_ids", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "logprobs", "echo", "response_format"]


@st.composite
def _request(draw, model: str):
    """(path, body): bodies near the real schema: the right field names with values of any shape,
    or a valid request for the path (a field of the other endpoint is refused as unknown) with
    random sampling parameters."""
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    if draw(st.integers(0, 3)) == 0:
        body = {"model": model} | (
            {"messages": [{"role": "user", "content": draw(st.text(min_size=1, max_size=40))}]}
            if path == "/v1/chat/completions"
            else {"prompt": draw(st.lists(st.integers(0, 40000), min_size=1, max_size=30))})
        return path, body | {
            "max_tokens": draw(st.integers(1, 4)),
            "temperature": draw(st.floats(0, 2)),
            "top_p": draw(st.floats(0.01, 1)),
            "seed": draw(st.integers(0, 2**31)),
            "stop": draw(st.lists(st.text(min_size=1, max_size=5), max_size=3)),
            "presence_penalty": draw(st.floats(-2, 2)),
            "repetition_penalty": draw(st.floats(0.5, 2)),
            "stream": False,
        }
    body = {}
    for field in draw(st.lists(st.sampled_from(_FIELDS), max_size=7, unique=True)):
        body[field] = draw(_json)
    if draw(st.booleans()):
        body["model"] = model
    if draw(st.booleans()):
        body["messages"] = draw(st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
             "content": st.one_of(st.text(max_size=30), _json)}), max_size=3))
    # the length fields are always bounded small: a random model may never emit EOS, and thousands
    # of tokens per example would only make the run long, not the check stronger
    length_field = draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))
    body[length_field] = draw(st.one_of(st.integers(-3, 5), st.booleans(), st.floats(), st.text(max_size=5)))
    if isinstance(body[length_field], int) and not isinstance(body[length_field], bool) and body[length_field] > 5:
        body[length_field] = 5
    body["stream"] = False  # streams are fuzzed through the same validation; keep replies whole
    return path, body


async def test_fuzzed_bodies_never_get_a_5xx(tiny_cluster, tiny_dir):
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=_request(tiny_dir.name), raw=st.one_of(st.none(), st.binary(max_size=60)))
    def check(request, raw):
        path, body = request
        status, resp, _ = asyncio.run_coroutine_threadsafe(
            post(tiny_cluster.url + path, body, raw=raw if raw is not None else None), loop).result(60)
        seen.append(status)
        assert status < 500, (body, resp)
        if status != 200:
            assert set(resp["error"]) == {"message", "type", "param", "code"}

    await asyncio.to_thread(check)
    assert any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)
    status, resp, _ = await post(tiny_cluster.url + "/v1/chat/completions",
                                 {"model": tiny_dir.name, "messages": [{"role": "user", "content": "ok?"}],
                                  "max_tokens": 3})
    assert status == 200, resp
