"""Multi-turn reuse on the shared tiny cluster: decode writes each sequence's full blocks (the
prompt's tail and the output) to the pool as they fill, under the keys the next turn's prompt
hashes to, and the next turn loads them: its cached tokens reach into the previous answer, and its
greedy output is still a plain transformers generate's."""

from __future__ import annotations

from conftest import reference_greedy
from helpers import logged, wait_for_pool
from libs.engine.loading import model_identity
from libs.kv.keys import block_hashes, namespace_digest


async def test_the_next_turn_loads_the_answer_decode_wrote(client, tiny_cluster, tiny_dir, tiny_model):
    model, tok = tiny_model
    bs = tiny_cluster.settings.block_size
    prompt = tok.encode("Once upon a time, in a harbour town of grey stone, the ships came home at dusk",
                        add_special_tokens=False)
    n = 3 * bs + 3
    out = reference_greedy(model, prompt, n)
    assert len(out) == n, "the reference must not stop early for the block count below to hold"
    r = await client.completions.create(model=tiny_dir.name, prompt=prompt, max_tokens=n, temperature=0)
    assert r.choices[0].text == tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # every block whose KV decode computed: up to the last output token, which is never fed
    written = (len(prompt) + n - 1) // bs
    assert written > len(prompt) // bs + 2
    keys = block_hashes(prompt + out, bs, namespace_digest(model_identity(tiny_dir), "float32", bs))[:written]
    assert await wait_for_pool(tiny_cluster.nats.url, keys), "decode's blocks never reached the pool"

    # the next turn: the previous prompt and answer, then more
    turn2 = prompt + out + tok.encode(" and then the storm came", add_special_tokens=False)
    ref2 = reference_greedy(model, turn2, 8)
    r2 = await client.completions.create(model=tiny_dir.name, prompt=turn2, max_tokens=8, temperature=0)
    # the conductor sees the pool hold the whole previous prompt and answer; it loads them unless
    # its cost model finds recomputing faster (the tiny model computes a few blocks in microseconds)
    (placed,) = await logged(tiny_cluster.log_dir / "conductor-0.log", "scheduled", {r2.id})
    assert placed["pool_blocks"] == written
    if placed["plan"] == "pool":
        assert r2.usage.prompt_tokens_details.cached_tokens == written * bs
    assert r2.choices[0].text == tok.decode(ref2, skip_special_tokens=True, clean_up_tokenization_spaces=False)
