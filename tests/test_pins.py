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


async def _pinned(nc, keys: list[bytes] = (), unpin: bool = False) -> int:
    """The blocks pinned on the cluster's cachestore (after ending the pins of ``keys`` if ``unpin``)."""
    from libs.protocol import CachePinReply, CachePinRequest, Subjects, decode, encode

    raw = await nc.request(Subjects.cache("cachestore-0", "pin"), encode(CachePinRequest(keys=list(keys), unpin=True)
                                                                         if unpin else CachePinRequest(keys=[])),
                           timeout=5)
    return decode(raw.data, CachePinReply).pinned


async def test_a_session_keeps_its_turns_blocks_pinned(tiny_cluster, tiny_dir, tiny_model):
    from libs.bus import connect
    from libs.engine.loading import model_identity
    from libs.kv.keys import block_hashes, namespace_digest

    _, tok = tiny_model
    bs = tiny_cluster.settings.block_size
    ns = namespace_digest(model_identity(tiny_dir), "float32", bs)
    nc = await connect(tiny_cluster.nats.url, "test-sessions")
    try:
        before = await _pinned(nc)
        turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Do you sell rye bread?"}]
        status, body, _ = await post(tiny_cluster.url + "/v1/chat/completions", {
            "model": tiny_dir.name, "messages": turn1, "max_tokens": 20, "temperature": 0, "ignore_eos": True,
            "session_id": "bakery-42"})
        assert status == 200, body
        ids1 = tok.apply_chat_template(turn1, add_generation_prompt=True, tokenize=True, return_dict=False)
        blocks1 = (len(ids1) + 20 - 1) // bs

        async def pinned_now(n):
            return await _pinned(nc) == before + n
        assert await wait_until(lambda: pinned_now(blocks1), timeout=15)

        # the next turn (the session named by the header) renews the pins of its own, longer chain
        turn2 = turn1 + [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "And rolls?"}]
        status, body2, _ = await post(tiny_cluster.url + "/v1/chat/completions", {
            "model": tiny_dir.name, "messages": turn2, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
            headers={"X-Session-Id": "bakery-42"})
        assert status == 200, body2
        ids2 = tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=True, return_dict=False)
        blocks2 = (len(ids2) + 6 - 1) // bs
        assert blocks2 > blocks1
        assert await wait_until(lambda: pinned_now(blocks2), timeout=15)
        # exactly the blocks of the second turn's prompt (and the answer's first tokens): ending
        # the pins of its prompt's blocks leaves only the answer's
        prompt_keys = block_hashes(ids2, bs, ns)
        assert await _pinned(nc, prompt_keys, unpin=True) == before + blocks2 - len(prompt_keys)
    finally:
        await nc.close()
    status, resp, _ = await post(tiny_cluster.url + "/v1/chat/completions", {
        "model": tiny_dir.name, "messages": turn1, "max_tokens": 2, "session_id": "x" * 200})
    assert status == 400 and resp["error"]["param"] == "session_id"


def test_sessions_renew_their_chain_and_stay_bounded():
    from services.gateway.sessions import Sessions

    s = Sessions(ttl_seconds=60, max_blocks=3, max_sessions=2)
    k = [bytes([i]) * 16 for i in range(6)]
    assert (s.turn("a", k[:2], now=0).pin, s.turn("a", k[:2], now=0).unpin) == (k[:2], [])
    r = s.turn("a", k[:5], now=10)  # a longer chain: its leading 3 blocks pinned, none ended
    assert (r.pin, r.unpin) == (k[:3], [])
    r = s.turn("a", [k[0], k[5]], now=20)  # the conversation was edited after its first block
    assert (r.pin, r.unpin) == ([k[0], k[5]], [k[1], k[2]])
    s.turn("b", k[:1], now=30)
    s.turn("c", k[:1], now=40)  # a third session: the one idle longest is forgotten
    assert len(s) == 2 and s.pinned("a") == [] and s.pinned("b") == k[:1]
    s.expire(now=95)  # b's pins (from 30) have run out, c's (from 40) not yet
    assert s.pinned("b") == [] and s.pinned("c") == k[:1]
    assert not Sessions(ttl_seconds=0, max_blocks=3).enabled
