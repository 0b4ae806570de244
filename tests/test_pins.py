"""An operator's pin of a prefix through the gateway (POST/DELETE /cache/pins), on the shared tiny
cluster: the keys it pins are those a chat request with that prefix wrote to the pool."""

from __future__ import annotations

import aiohttp

from helpers import post, wait_until

SYSTEM = ("You are the assistant of a bakery. Answer questions about bread, cakes and opening hours. "
          "Be brief and friendly, and never promise a delivery time. ") * 3


async def _delete(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.delete(url, json=body) as r:
            return r.status, await r.json()


async def test_pin_a_system_prompt_then_end_the_pin(tiny_cluster, tiny_dir, tiny_model):
    _, tok = tiny_model
    url = tiny_cluster.url
    bs = tiny_cluster.settings.block_size
    system = [{"role": "system", "content": SYSTEM}]
    blocks = len(tok.apply_chat_template(system, tokenize=True, return_dict=False)) // bs
    assert blocks >= 2
    status, body, _ = await post(url + "/v1/chat/completions", {
        "model": tiny_dir.name, "messages": system + [{"role": "user", "content": "When do you open?"}],
        "max_tokens": 2})
    assert status == 200, body

    async def pinned():
        status, body, _ = await post(url + "/cache/pins", {"messages": system, "ttl_seconds": 600})
        assert status == 200, body
        return body if body["held_blocks"] == blocks else None

    # the request's prompt blocks reach the pool after its answer: the pin finds them held
    body = await wait_until(pinned, timeout=30)
    assert body, "the pool never held the system prompt's blocks the chat request wrote"
    assert (body["object"], body["blocks"], body["tokens"]) == ("cache.pin", blocks, blocks * bs)
    (store, counts), = body["instances"].items()
    assert store.startswith("cachestore") and counts == {"held": blocks, "pinned": blocks}

    status, body = await _delete(url + "/cache/pins", {"messages": system})
    assert status == 200 and body["object"] == "cache.unpin"
    assert body["instances"][store]["pinned"] == 0


async def test_bad_pins_are_refused_by_name(tiny_cluster):
    url = tiny_cluster.url + "/cache/pins"
    for body, param in [({"prompt": SYSTEM}, "ttl_seconds"),
                        ({"prompt": SYSTEM, "ttl_seconds": 0}, "ttl_seconds"),
                        ({"prompt": SYSTEM, "ttl_seconds": 10 ** 9}, "ttl_seconds"),
                        ({"ttl_seconds": 60}, "prompt"),
                        ({"prompt": SYSTEM, "messages": [{"role": "system", "content": "x"}], "ttl_seconds": 60},
                         "messages"),
                        ({"prompt": "hi", "ttl_seconds": 60}, "prompt"),  # shorter than one block
                        ({"prompt": SYSTEM, "ttl_seconds": 60, "pinned": True}, "pinned")]:
        status, resp, _ = await post(url, body)
        assert status == 400 and resp["error"]["param"] == param, (body, resp)
    status, resp = await _delete(url, {"prompt": SYSTEM, "ttl_seconds": 5})
    assert status == 400 and resp["error"]["param"] == "ttl_seconds"
