"""Chunked pipeline parallelism: a long prompt split over several prefill instances, each stage's
past streamed live from the stage before. The split decision is plain logic; end to end, the
output is the cold output token for token, and a stage whose past never comes computes it."""

import asyncio
import uuid

import pytest

from conftest import reference_greedy, start_cluster
from helpers import post, prompt_keys, run_prefill_tasks
from libs.protocol import PrefillTask, SamplingParams
from services.conductor.pipeline import pipeline_finish, plan_pipeline, split_points

BS = 16


def _price(end: int, start: int) -> float:
    """A cost model with attention: a token attends to every one before it."""
    new = end - start
    return 0.01 + 1e-4 * new + 1e-7 * new * (start + new / 2)


def test_split_points_give_each_stage_the_same_compute_on_block_boundaries():
    bounds = split_points(8192, 0, 4, BS, _price)
    assert bounds[0] == 0 and bounds[-1] == 8192 and len(bounds) == 5
    assert all(b % BS == 0 for b in bounds[1:-1]) and bounds == sorted(bounds)
    costs = [_price(bounds[k + 1], bounds[k]) for k in range(4)]
    assert max(costs) - min(costs) < 0.05 * max(costs)
    sizes = [bounds[k + 1] - bounds[k] for k in range(4)]
    assert sizes == sorted(sizes, reverse=True)  # later chunks attend to more: fewer tokens
    # a reused prefix is not computed by any stage; too few blocks for every stage: fewer stages
    assert split_points(8192, 1024, 2, BS, _price)[0] == 1024
    assert split_points(40, 0, 4, BS, _price) == [0, 16, 32, 40]


def test_stages_run_one_layer_apart_and_wait_for_their_queue():
    # two equal stages of 1 s over 10 layers, idle instances: the second ends a layer after the first
    assert pipeline_finish([0.0, 0.0], [1.0, 1.0], [0.0, 0.0], 10) == pytest.approx([1.0, 1.1])
    # the second instance is busy for 3 s: it starts then
    assert pipeline_finish([0.0, 3.0], [1.0, 1.0], [0.0, 0.0], 10) == pytest.approx([1.0, 4.0])
    # moving the past costs its share per layer
    assert pipeline_finish([0.0, 0.0], [1.0, 1.0], [0.0, 0.5], 10)[1] == pytest.approx(1.15)


def test_a_pipeline_is_chosen_only_when_it_gives_the_first_token_sooner():
    kw = dict(block_size=BS, layers=30, price=_price, move=lambda t: 1e-6 * t, max_stages=4, min_tokens=4096)
    single = _price(8192, 0)
    idle = [(f"p{i}", 0.0) for i in range(1, 8)]
    p = plan_pipeline(8192, 0, ("p0", 0.0), idle, single_ttft=single, **kw)
    assert p is not None and len(p.stages) == 4 and p.ttft < 0.5 * single
    assert p.stages[0].instance_id == "p0" and p.stages[-1].end == 8192
    assert [s.start for s in p.stages[1:]] == [s.end for s in p.stages[:-1]]
    # too short, no other instance, or one stage allowed: one instance
    assert plan_pipeline(2048, 0, ("p0", 0.0), idle, single_ttft=_price(2048, 0), **kw) is None
    assert plan_pipeline(8192, 0, ("p0", 0.0), [], single_ttft=single, **kw) is None
    assert plan_pipeline(8192, 0, ("p0", 0.0), idle, single_ttft=single, **{**kw, "max_stages": 1}) is None
    # the others are busy for longer than the whole prompt takes alone: not worth it
    busy = [(f"p{i}", 2 * single) for i in range(1, 8)]
    assert plan_pipeline(8192, 0, ("p0", 0.0), busy, single_ttft=single, **kw) is None
    # the shortest queues take the later stages
    mixed = [("p1", 5.0), ("p2", 0.0), ("p3", 0.1)]
    p = plan_pipeline(8192, 0, ("p0", 0.0), mixed, single_ttft=single, **{**kw, "max_stages": 3})
    assert [s.instance_id for s in p.stages] == ["p0", "p2", "p3"]


def test_the_benchmark_reads_the_stages_each_prompt_ran_on_from_the_conductors_log(tmp_path):
    from bench.pipeline import _stages_used

    log = tmp_path / "conductor-0.log"
    log.write_text("\n".join([
        '{"event": "scheduled", "request_id": "cmpl-a", "stages": ["prefill-0", "prefill-3", "prefill-1"]}',
        '{"event": "scheduled", "request_id": "cmpl-b", "stages": null}',
        'not json',
        '{"event": "instance_joined", "id": "prefill-0"}',
    ]))
    assert _stages_used(log) == {"cmpl-a": 3, "cmpl-b": 1}
    assert _stages_used(tmp_path / "missing.log") == {}


def test_the_conductor_queues_a_task_per_stage_each_reading_the_one_before():
    from libs.config import Settings
    from libs.protocol import Heartbeat, PrefillReport, ScheduleRequest
    from services.conductor.scheduler import Scheduler

    s = Scheduler(Settings(policy="global_cache_aware", admission="none", pipeline_max_stages=3))
    for kind, iid in [("prefill", f"p{i}") for i in range(3)] + [("decode", "d0")]:
        s.heartbeat(Heartbeat(kind=kind, instance_id=iid, interval=1.0, max_running=32), 0.0)

    def request(rid, n):
        prompt = [(5 * i + len(rid)) % 30000 + 50 for i in range(n)]
        return ScheduleRequest(attempt_id=rid, prompt_token_ids=prompt, block_hashes=[bytes([i % 256, i // 256]) * 8
                                                                                      for i in range(n // BS)],
                               sampling=SamplingParams(max_tokens=8))

    assert not s.schedule(request("before-layers", 8192), 0.0).stages  # the model's layers not known yet
    s.prefill_report(PrefillReport(attempt_id="x", instance_id="p0", prompt_tokens=100, local_tokens=0,
                                   pool_tokens=0, load_bytes=0, load_seconds=0.0, compute_seconds=0.1,
                                   queue_seconds=0.0, num_layers=30), 0.0)
    assert not s.schedule(request("short", 2048), 0.0).stages  # under pipeline_min_tokens
    s = Scheduler(Settings(policy="global_cache_aware", admission="none", pipeline_max_stages=3))
    for kind, iid in [("prefill", f"p{i}") for i in range(3)] + [("decode", "d0")]:
        s.heartbeat(Heartbeat(kind=kind, instance_id=iid, interval=1.0, max_running=32), 0.0)
    s.cost.layers = 30
    d = s.schedule(request("long", 8192), 0.0)
    assert len(d.stages) == 2 and d.placement.stages == 3 and d.placement.plan == "pipeline"
    tasks = [t for _, t in d.stages] + [d.task]
    where = [iid for iid, _ in d.stages] + [d.placement.prefill_id]
    assert sorted(where) == ["p0", "p1", "p2"]
    assert [t.attempt_id for t in tasks] == ["long~s0", "long~s1", "long"]
    ends = [t.stage_end for t in tasks[:-1]]
    assert tasks[-1].stage_end == 0 and 0 < ends[0] < ends[1] < 8192 and all(e % BS == 0 for e in ends)
    assert [(t.stage_from, t.stage_attempt, t.stage_past) for t in tasks] == [
        ("", "", 0), (where[0], "long~s0", ends[0]), (where[1], "long~s1", ends[1])]
    assert all(not t.use_pool and t.reuse_blocks == t.stage_past // BS for t in tasks[1:])
    assert all(s.queues.pending(iid) == 1 for iid in where)  # every stage counted on its instance's queue
    assert d.placement.predicted_ttft < s.cost.prefill_seconds(8192, 0) / 2
    # a lost last stage is placed again as a whole prompt, reading no stage
    placement, moved = s.reassign(d.task, 1.0)
    assert moved is not None and (moved.stage_from, moved.stage_attempt, moved.stage_past) == ("", "", 0)


async def test_a_stage_is_kept_while_the_next_stage_reads_it_and_forgotten_after_its_hold_when_nobody_does():
    from services.prefill.stages import LiveStages

    stages = LiveStages(hold_seconds=0.05)
    read = stages.open("a", buf=object(), keys=[b"k" * 16])
    read.serving = True  # the next stage's get is under way
    closing = asyncio.ensure_future(stages.close("a"))
    await asyncio.sleep(0.3)
    assert not closing.done() and not read.ended  # past its hold: still read, still kept
    read.served.set()
    await closing
    assert read.ended and await stages.find("a", 1.0) is None  # ended: a late get is answered at once
    unread = stages.open("b", buf=object(), keys=[b"k" * 16])
    await stages.close("b")  # nobody asked within the hold
    assert unread.ended
    assert await stages.find("never-started", 0.05) is None


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cpp_cluster(tiny_dir, tmp_path_factory):
    """Three prefill instances; prompts from 96 tokens may be split; a stage waits 5 s for its past."""
    cluster = start_cluster(tiny_dir, tmp_path_factory.mktemp("cpp"), prefill=3, pipeline_min_tokens=96,
                            pipeline_stage_timeout=5.0)
    yield cluster
    cluster.stop()


async def _run_stages(cluster, model_dir, prompt: list[int], plan: list[tuple[str, int]], max_tokens: int = 16,
                      bogus_past: bool = False) -> tuple[list[int], int]:
    """Queue a pipeline's tasks straight on the instances (``plan``: each stage's instance and
    end, the last's end the prompt's length), as the conductor would; collect the output."""
    rid = f"cmpl-cpp-{uuid.uuid4().hex[:8]}"
    keys = prompt_keys(model_dir, prompt, BS)
    tasks, before, start = [], ("", ""), 0
    for k, (iid, end) in enumerate(plan):
        last = k == len(plan) - 1
        aid = rid if last else f"{rid}~s{k}"
        tasks.append((iid, PrefillTask(attempt_id=aid, prompt_token_ids=prompt, decode_id="decode-0", block_hashes=keys,
                                       sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                       stage_end=0 if last else end, stage_from=before[0],
                                       stage_attempt=before[1] + ("-never" if bogus_past else ""), stage_past=start,
                                       reuse_blocks=start // BS if k else -1, use_pool=k == 0)))
        before, start = (iid, aid), end
    return await run_prefill_tasks(cluster.nats.url, rid, tasks)


async def _stage_counts(cluster) -> dict[str, float]:
    import aiohttp

    out: dict[str, float] = {}
    async with aiohttp.ClientSession() as s:
        for name in ("prefill-0", "prefill-1", "prefill-2"):
            async with s.get(cluster.metrics_urls[name]) as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("yuebing:prefill_pipeline_stages_total{"):
                        labels = dict(kv.split("=") for kv in line.split("{")[1].split("}")[0].split(","))
                        key = f"{labels['role'].strip(chr(34))}:{labels['outcome'].strip(chr(34))}"
                        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def test_a_prompt_split_over_three_instances_is_token_exact(cpp_cluster, tiny_dir, tiny_model):
    model, _ = tiny_model
    prompt = [(11 * i + 5) % 30000 + 200 for i in range(300)]
    expected = reference_greedy(model, prompt, 16)
    tokens, cached = await _run_stages(cpp_cluster, tiny_dir, prompt,
                                       [("prefill-0", 128), ("prefill-1", 224), ("prefill-2", 300)])
    assert tokens == expected and cached == 0  # the stages' KV was computed, not cached
    counts = await _stage_counts(cpp_cluster)
    assert counts.get("before:ok") == 2 and counts.get("last:ok") == 1
    # each stage wrote the blocks it computed to the pool: the prompt again, on one instance, reuses them all
    tokens, cached = await _run_stages(cpp_cluster, tiny_dir, prompt, [("prefill-1", 300)])
    assert tokens == expected and cached == 288


async def test_a_stage_whose_past_never_comes_computes_it_itself(cpp_cluster, tiny_dir, tiny_model):
    model, _ = tiny_model
    prompt = [(19 * i + 3) % 30000 + 700 for i in range(200)]
    before = await _stage_counts(cpp_cluster)
    tokens, cached = await _run_stages(cpp_cluster, tiny_dir, prompt, [("prefill-1", 112), ("prefill-2", 200)],
                                       bogus_past=True)
    assert tokens == reference_greedy(model, prompt, 16)
    after = await _stage_counts(cpp_cluster)
    key = "last:past_recomputed"
    assert after.get(key, 0) - before.get(key, 0) == 1


async def test_the_conductor_splits_a_long_prompt_and_the_answer_is_the_cold_one(cpp_cluster, tiny_dir, tiny_model):
    """Through the gateway: a prompt long enough for the conductor's cost model to predict the
    pipeline sooner runs split (the stages' metrics say so), and the text is the reference's."""
    model, tok = tiny_model
    warm = [(3 * i + 1) % 30000 + 900 for i in range(40)]  # the first report tells the model's layers
    status, body, _ = await post(cpp_cluster.url + "/v1/completions",
                                 {"model": tiny_dir.name, "prompt": warm, "max_tokens": 2, "temperature": 0})
    assert status == 200, body
    before = await _stage_counts(cpp_cluster)
    prompt = [(23 * i + 9) % 30000 + 1000 for i in range(480)]
    status, body, _ = await post(cpp_cluster.url + "/v1/completions",
                                 {"model": tiny_dir.name, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    expected = tok.decode(reference_greedy(model, prompt, 16), skip_special_tokens=True,
                          clean_up_tokenization_spaces=False)
    assert body["choices"][0]["text"] == expected
    after = await _stage_counts(cpp_cluster)
    key = "before:ok"
    assert after.get(key, 0) - before.get(key, 0) >= 1
