"""Plain logic, tested directly: detokenisation, stop strings, validation, batching, placement."""

import msgspec
import pytest

from libs.protocol import Heartbeat, SamplingParams
from services.conductor.registry import Registry
from services.decode.batcher import Batcher, Sequence
from services.gateway import openai as oa
from services.gateway.detok import IncrementalDetokenizer, StopStrings


# ---------------------------------------------------------------- detokenisation
def test_incremental_detok_equals_full_decode(tiny_model):
    _, tok = tiny_model
    text = "Héllo wörld — naïve café, 日本語のテキスト and emoji 🚀🌕 done."
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("deltas,stops,expected,stopped", [
    (["Hel", "lo wo", "rld"], ["wor"], "Hello ", True),
    (["ab", "c", "STO", "P", "xyz"], ["STOP"], "abc", True),
    (["no stop here"], ["zzz"], "no stop here", False),
    (["plain"], [], "plain", False),
    (["x", "END"], ["END", "x"], "", True),
])
def test_stop_strings(deltas, stops, expected, stopped):
    s = StopStrings(stops)
    out = "".join(s.feed(d) for d in deltas)
    out += s.flush()
    assert out == expected and s.stopped == stopped


def test_stop_strings_hold_back_a_possible_prefix():
    s = StopStrings(["STOP"])
    assert s.feed("abcST") == "abc"  # "ST" could still become "STOP"
    assert s.feed("x") == "STx"
    assert s.feed("S") == ""
    assert s.feed("TOP and more") == ""
    assert s.stopped and s.flush() == "" and s.text == "abcSTx"


# ---------------------------------------------------------------- validation
def test_parse_names_the_bad_field():
    with pytest.raises(oa.ApiError) as e:
        oa.parse({"model": "m", "messages": [], "max_tokens": "many"}, oa.ChatCompletionRequest)
    assert e.value.status == 400 and e.value.param == "max_tokens"
    with pytest.raises(oa.ApiError) as e:
        oa.parse({"model": "m"}, oa.ChatCompletionRequest)
    assert e.value.param == "messages"


def _req(**kw):
    return msgspec.convert({"model": "m", "prompt": [1], **kw}, oa.CompletionRequest)


def test_normalize_bounds_and_defaults():
    n = oa.normalize(_req(), [1, 2, 3], 100, None, 16)
    assert n.sampling.max_tokens == 16 and n.sampling.temperature == 1.0
    n = oa.normalize(_req(), [1, 2, 3], 10, None, None)
    assert n.sampling.max_tokens == 7  # the rest of the context
    for kw, param in [({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 9}, "n"), ({"n": 0}, "n"),
                      ({"top_k": -3}, "top_k"), ({"stop": ["x" * 300]}, "stop")]:
        with pytest.raises(oa.ApiError) as e:
            oa.normalize(_req(**kw), [1], 100, None, 16)
        assert e.value.param == param
    with pytest.raises(oa.ApiError) as e:
        oa.normalize(_req(), [1] * 10, 10, None, 16)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(oa.ApiError) as e:
        oa.normalize(_req(), [1] * 5, 10, 6, 16)
    assert e.value.param == "max_tokens"


def test_completion_prompt_forms():
    assert oa.completion_prompt(_req(prompt="hi"), 10) == "hi"
    assert oa.completion_prompt(_req(prompt=[[1, 2]]), 10) == [1, 2]
    assert oa.completion_prompt(_req(prompt=["x"]), 10) == "x"
    for bad in ([1, "a"], [[1], [2]], [True], [10]):
        with pytest.raises(oa.ApiError):
            oa.completion_prompt(_req(prompt=bad), 10)


def test_chat_messages_text_parts_and_roles():
    req = msgspec.convert({"model": "m", "messages": [
        {"role": "developer", "content": "be nice"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]}, oa.ChatCompletionRequest)
    assert oa.chat_messages(req) == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "ab"}]


def test_fields_not_implemented_are_refused_by_name_unless_off():
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for extra, param in [({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
                         ({"logit_bias": {"5": 10}}, "logit_bias"), ({"echo": True}, "echo"),
                         ({"min_p": 0.1}, "min_p")]:
        with pytest.raises(oa.ApiError) as e:
            oa.parse({**chat, **extra}, oa.ChatCompletionRequest)
        assert (e.value.status, e.value.param, e.value.code) == (400, param, "unsupported_parameter")
        assert "not supported" in e.value.message
    # their defaults ask for nothing: accepted
    off = {"logprobs": False, "top_logprobs": 0, "echo": False, "n": 1, "response_format": {"type": "text"},
           "tools": [], "tool_choice": "none", "parallel_tool_calls": True, "min_p": 0, "best_of": 1}
    assert oa.parse({**chat, **off}, oa.ChatCompletionRequest).n == 1
    text = {"model": "m", "prompt": "x"}
    for extra, param in [({"suffix": "end"}, "suffix"), ({"best_of": 2}, "best_of")]:
        with pytest.raises(oa.ApiError) as e:
            oa.parse({**text, **extra}, oa.CompletionRequest)
        assert (e.value.param, e.value.code) == (param, "unsupported_parameter")
    assert oa.parse({**text, "logprobs": None, "echo": False, "suffix": ""}, oa.CompletionRequest).prompt == "x"


def test_unknown_fields_are_refused_by_name():
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for body, param in [({**chat, "temprature": 0.5}, "temprature"),
                        ({**chat, "prompt": "x"}, "prompt"),  # the other endpoint's field
                        ({"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
                         "messages[0].tool_calls"),
                        ({**chat, "stream_options": {"include_usage": True, "chunky": 1}}, "stream_options.chunky")]:
        with pytest.raises(oa.ApiError) as e:
            oa.parse(body, oa.ChatCompletionRequest)
        assert (e.value.status, e.value.param, e.value.code) == (400, param, "unknown_parameter"), e.value.message
        assert param.rpartition(".")[2] in e.value.message
    with pytest.raises(oa.ApiError) as e:
        oa.parse({"model": "m", "prompt": "x", "foo": 1, "bar": 2}, oa.CompletionRequest)
    assert e.value.param == "foo" and "'foo', 'bar'" in e.value.message


def test_penalties_and_stop_token_ids_are_checked_and_carried():
    n = oa.normalize(_req(presence_penalty=-2, frequency_penalty=2, repetition_penalty=1.3, stop_token_ids=[5, 3, 5]),
                     [1], 100, None, 16, vocab_size=10)
    s = n.sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.stop_token_ids) == (-2.0, 2.0, 1.3, [3, 5])
    assert s.penalized and not oa.normalize(_req(), [1], 100, None, 16).sampling.penalized
    for kw, param in [({"presence_penalty": 2.01}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
                      ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": -1}, "repetition_penalty"),
                      ({"stop_token_ids": [10]}, "stop_token_ids"), ({"stop_token_ids": [-1]}, "stop_token_ids")]:
        with pytest.raises(oa.ApiError) as e:
            oa.normalize(_req(**kw), [1], 100, None, 16, vocab_size=10)
        assert e.value.param == param and e.value.status == 400
    with pytest.raises(oa.ApiError) as e:
        oa.normalize(_req(stream_options={"continuous_usage_stats": True}), [1], 100, None, 16)
    assert e.value.code == "unsupported_parameter" and e.value.param == "stream_options.continuous_usage_stats"
    assert oa.ended_by_stop_token(5, "stop", [3, 5]) and not oa.ended_by_stop_token(5, "length", [5])
    assert not oa.ended_by_stop_token(4, "stop", [3, 5])  # an EOS


def test_penalties_follow_vllm():
    import torch

    from libs.engine.sampling import penalize, sample_token, split_resumed_prompt

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    p = SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=2.0)
    # tokens seen in the prompt or the output: positive logits halved, negative doubled
    assert penalize(logits, p, [0, 1], [3]).tolist() == [1.0, -2.0, 0.5, 1.5, 1.0]
    p = SamplingParams(max_tokens=1, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25)
    # only the output counts: 3 twice, 4 once; the prompt's 0 is left alone
    assert penalize(logits, p, [0], [3, 4, 3]).tolist() == [2.0, -1.0, 0.5, 3.0 - 1.25, 1.0 - 0.75]
    assert sample_token(logits, p, 0, [0], [3, 3, 3]) == 0  # greedy honours them: 3 - 1.75 < 2
    assert sample_token(logits, SamplingParams(max_tokens=1, temperature=0.0), 0, [0], [3, 3, 3]) == 3
    off = SamplingParams(max_tokens=1)
    assert penalize(logits, off, [0], [3]) is logits
    # a resumed attempt's prompt ends with the tokens streamed before it: they are output
    assert split_resumed_prompt([1, 2, 3, 9, 8], 2) == ([1, 2, 3], [9, 8])
    assert split_resumed_prompt([1, 2, 3], 0) == ([1, 2, 3], [])
    seq = Sequence(attempt_id="a", params=p, prompt_len=5, output=[7], prompt=[1, 2, 3], earlier_outputs=[9, 8])
    assert seq.penalty_history() == ([1, 2, 3], [9, 8, 7])
    assert _seq("b").penalty_history() == ([], [])


def test_served_model_name_on_the_command_line_and_in_the_banner():
    from yuebing.cli import _model_id, _settings, build_parser

    for argv in (["up", "--served-model-name", "house-model"],
                 ["serve", "gateway", "--served-model-name", "house-model"]):
        settings = _settings(build_parser().parse_args(argv))
        assert settings.served_model_name == "house-model" and _model_id(settings) == "house-model"
    assert _model_id(_settings(build_parser().parse_args(["up"]))) != "house-model"


# ---------------------------------------------------------------- batching
def _seq(rid, max_tokens=3, eos=()):
    return Sequence(attempt_id=rid, params=SamplingParams(max_tokens=max_tokens, temperature=0.0), prompt_len=4,
                    output=[7])


def test_batcher_joins_within_capacity_and_finishes():
    b = Batcher(max_running=2, eos_ids=(2,))
    for rid in "abc":
        b.submit(_seq(rid))
    plan = b.plan()
    assert [s.attempt_id for s in plan.rows] == ["a", "b"] and len(b.waiting) == 1
    finished = b.record(plan.rows, [5, 2])  # b emits EOS
    assert [s.attempt_id for s in finished] == ["b"] and finished[0].finish == "stop"
    plan = b.plan()
    assert plan.leaves == {"b"} and [s.attempt_id for s in plan.rows] == ["a", "c"]
    finished = b.record(plan.rows, [5, 5])  # a reaches max_tokens=3 (7, 5, 5)
    assert [(s.attempt_id, s.finish) for s in finished] == [("a", "length")]


def test_batcher_gives_free_rows_to_urgent_sequences_first():
    b = Batcher(max_running=1, eos_ids=(2,))
    b.submit(_seq("long", max_tokens=50))  # ten gaps or more: its wait for a row is outside its TBT
    assert b.plan().rows[0].attempt_id == "long"
    b.submit(_seq("l2", max_tokens=50))
    for rid in ("s1", "s2"):  # ten tokens, nine gaps: the wait for a row is its TBT
        b.submit(_seq(rid, max_tokens=10))
    assert [s.attempt_id for s in b.waiting] == ["s1", "s2", "l2"]  # urgent first, in arrival order
    b.submit(_seq("l3", max_tokens=11))
    assert [s.attempt_id for s in b.waiting] == ["s1", "s2", "l2", "l3"]
    b.abort("long")
    assert [s.attempt_id for s in b.plan().rows] == ["s1"]
    assert _seq("x", max_tokens=10).urgent and not _seq("x", max_tokens=11).urgent
    assert not _seq("x", max_tokens=1).urgent  # one token never reaches decode


def test_batcher_keeps_its_urgent_rows_for_urgent_sequences():
    b = Batcher(max_running=1, eos_ids=(2,), urgent_rows=1)
    b.submit(_seq("long", max_tokens=50))
    b.submit(_seq("l2", max_tokens=50))
    assert [s.attempt_id for s in b.plan().rows] == ["long"]  # the second row is not for it
    b.submit(_seq("s1", max_tokens=5))
    b.submit(_seq("s2", max_tokens=5))
    assert [s.attempt_id for s in b.plan().rows] == ["long", "s1"]  # one urgent row
    assert [s.attempt_id for s in b.waiting] == ["s2", "l2"]
    b.abort("long")
    assert [s.attempt_id for s in b.plan().rows] == ["s1", "s2"]  # the freed row goes to the urgent one
    b.abort("s1")
    b.abort("s2")
    assert [s.attempt_id for s in b.plan().rows] == ["l2"]


def test_batcher_abort_waiting_and_running():
    b = Batcher(max_running=4, eos_ids=(2,))
    b.submit(_seq("a"))
    b.plan()
    b.submit(_seq("w"))
    assert b.abort("w").finish == "abort" and not b.waiting
    assert b.abort("a").finish == "abort"
    assert b.record(list(b.running.values()), [9]) == []  # no token recorded after abort
    assert b.plan().leaves == {"a"} and not b.running


# ---------------------------------------------------------------- conductor
def _hb(kind, iid, **load):
    return Heartbeat(kind=kind, instance_id=iid, interval=1.0, **load)


def test_registry_expires_after_three_missed_beats():
    r = Registry()
    r.beat(_hb("prefill", "p0"), now=0.0)
    assert [i.instance_id for i in r.alive("prefill", 2.9)] == ["p0"]
    assert r.alive("prefill", 3.1) == []
    assert [i.instance_id for i in r.prune(3.1)] == ["p0"]


def test_registry_answers_alive_again_at_one_time_until_a_beat_or_prune_changes_it():
    r = Registry()
    r.beat(_hb("prefill", "p0"), now=0.0)
    first = r.alive("prefill", 1.0)
    assert r.alive("prefill", 1.0) is first and r.alive("decode", 1.0) == []
    r.beat(_hb("prefill", "p1"), now=1.0)  # a new instance at the same time
    assert [i.instance_id for i in r.alive("prefill", 1.0)] == ["p0", "p1"]
    r.beat(_hb("prefill", "p1", draining=True), now=1.0)  # draining: no new work
    assert [i.instance_id for i in r.alive("prefill", 1.0)] == ["p0"]
    assert [i.instance_id for i in r.alive("prefill", 3.5)] == []  # p0 silent for 3.5 s
    assert [i.instance_id for i in r.prune(3.5)] == ["p0"]


def test_registry_judges_liveness_as_of_how_far_behind_the_conductor_is_on_heartbeats():
    r = Registry(lag_cap=10.0)
    r.beat(_hb("prefill", "p0"), now=0.0)
    r.clock.sent(0.5)  # the conductor's own beat, not taken in yet at 3.5: it is 3 s behind
    assert [i.instance_id for i in r.alive("prefill", 3.5)] == ["p0"] and r.prune(3.5) == []
    r.clock.received(3.6, sent_at=0.5)  # taken in 3.1 s late: p0's next beats may be as late
    assert [i.instance_id for i in r.alive("prefill", 3.7)] == ["p0"]
    r.clock.sent(4.0)
    r.clock.received(4.01, sent_at=4.0)  # caught up: p0 has been silent for four beats
    assert [i.instance_id for i in r.prune(4.02)] == ["p0"]
    # a beat of its own lost on the way holds the judgement back until a later one comes back
    r.beat(_hb("prefill", "p1"), now=10.0)
    r.clock.sent(10.0)  # lost
    r.clock.sent(11.0)
    r.clock.received(11.01, sent_at=11.0)
    assert r.clock.behind(14.0) < 0.1 and r.alive("prefill", 14.0) == []
    r.clock.sent(20.0)  # and by at most the cap when none does
    assert r.clock.behind(40.0) == 10.0


def test_a_conductor_that_stalled_does_not_take_the_instances_for_lost():
    """Its loop blocked for 5 s (no beat sent, none taken in): the instances' beats queued meanwhile
    come in before its own next one, so until that one is back it judges as of the stall."""
    r = Registry(lag_cap=10.0, interval=1.0)
    r.beat(_hb("prefill", "p0"), now=0.0)
    r.clock.sent(0.0)
    r.clock.received(0.01, sent_at=0.0)
    assert r.prune(5.9) == []  # stalled: its own beat is overdue by 4.9 s
    r.clock.sent(6.0)  # the next beat, 6 s after the last: 5 s of stall
    assert r.prune(6.05) == [] and [i.instance_id for i in r.alive("prefill", 6.05)] == ["p0"]
    r.beat(_hb("prefill", "p0"), now=6.06)  # its queued beat taken in
    r.clock.received(6.1, sent_at=6.0)
    assert r.prune(6.2) == []
    # without the stall allowance it would have been judged silent for 6 s
    plain = Registry(lag_cap=10.0)
    plain.beat(_hb("prefill", "p0"), now=0.0)
    plain.clock.sent(6.0)
    assert [i.instance_id for i in plain.prune(6.05)] == ["p0"]


def test_every_setting_reaches_the_services_yuebing_up_starts():
    """A setting that is neither forwarded nor given per service would be the launcher's alone: its
    services would run on the default (as decode_write_back once did)."""
    from libs.config import Settings
    from yuebing.cluster import FORWARDED, PER_SERVICE

    fields = set(Settings.__struct_fields__)
    assert set(FORWARDED) | set(PER_SERVICE) == fields, fields - set(FORWARDED) - set(PER_SERVICE)
    assert not set(FORWARDED) & set(PER_SERVICE)


def test_counts_on_the_command_line_refuse_values_below_their_least():
    import argparse

    from yuebing.args import count

    assert count(0)("0") == 0 and count(1)("32") == 32
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
        count(1)("0")
    with pytest.raises(ValueError):
        count(0)("two")


def test_restarts_back_off_reset_after_a_healthy_run_and_give_up_on_a_crash_loop():
    from yuebing.supervisor import RestartPolicy, Restarts

    r = Restarts(RestartPolicy(first_delay=0.5, max_delay=4.0, healthy_after=60.0, crash_limit=4, window=100.0))
    # quick exits: the delay doubles, up to the cap
    assert r.exited("prefill-0", started_at=0.0, now=1.0) == 1.5
    assert r.exited("prefill-0", started_at=1.5, now=2.0) == 3.0
    assert r.exited("prefill-0", started_at=3.0, now=3.5) == 5.5
    assert r.restarts("prefill-0") == 3 and not r.given_up("prefill-0")
    # a fourth exit within the window: given up on; another service is not affected
    assert r.exited("prefill-0", started_at=5.5, now=6.0) is None and r.given_up("prefill-0")
    assert r.exited("decode-0", started_at=0.0, now=6.0) == 6.5
    # after a run longer than healthy_after, the delay starts again from the first one, and exits
    # older than the window no longer count towards giving up
    assert r.exited("decode-0", started_at=6.5, now=80.0) == 80.5
    assert r.exited("decode-0", started_at=80.5, now=81.0) == 82.0
    assert r.exited("decode-0", started_at=82.0, now=150.0) == 150.5  # a long run: reset, not 4.0
    assert r.recent_exits("decode-0") == 3 and not r.given_up("decode-0")  # the exit at 6.0 left the window
    rr = Restarts(RestartPolicy(first_delay=1.0, max_delay=4.0, healthy_after=1000.0, crash_limit=100, window=10.0))
    assert [rr.exited("x", t, t) - t for t in (0.0, 20.0, 40.0, 60.0)] == [1.0, 2.0, 4.0, 4.0]  # capped


def test_a_shared_system_prompt_does_not_send_every_conversation_to_one_instance():
    """Ties between equally good instances go by the prompt's first block that no instance holds:
    conversations that all begin with one system prompt (held everywhere) spread over the prefill
    instances, and the same prompt keeps to one."""
    from libs.config import Settings
    from libs.kv.keys import block_hashes
    from libs.protocol import Heartbeat
    from services.conductor.scheduler import Scheduler

    s = Scheduler(Settings(policy="local_cache_aware", admission="none", use_pool=False))
    for kind, iid in [("prefill", f"p{i}") for i in range(4)] + [("decode", "d0")]:
        s.heartbeat(Heartbeat(kind=kind, instance_id=iid, interval=1.0, max_running=32), 0.0)
    ns = b"n" * 16
    system = list(range(16))
    for i in range(4):  # every instance holds the system prompt's block
        s.index.load_dump(f"p{i}", "prefill", "e", 0, block_hashes(system, 16, ns))

    def chosen(conversation: int) -> str:
        prompt = system + [1000 + conversation] * 32
        return s.place(len(prompt), block_hashes(prompt, 16, ns), 0.1)[0].prefill_id

    picks = [chosen(c) for c in range(16)]
    assert len(set(picks)) >= 3, picks  # by the first block held nowhere, not by the shared one
    assert [chosen(c) for c in range(16)] == picks


def test_a_resumed_request_avoids_the_decode_instance_it_failed_on():
    """A request handed back after its decode instance failed is placed on another decode while
    one is alive, even before the conductor has noticed the failed one is gone; with no other, on
    that one (it may be back)."""
    from libs.config import Settings
    from libs.protocol import Heartbeat, Resume, SamplingParams, ScheduleRequest
    from services.conductor.scheduler import Scheduler

    s = Scheduler(Settings(policy="least_loaded", admission="none"))
    for kind, iid in (("prefill", "p0"), ("decode", "d0"), ("decode", "d1")):
        s.heartbeat(Heartbeat(kind=kind, instance_id=iid, interval=1.0, max_running=32), 0.0)

    def request(rid, resume=None):
        return ScheduleRequest(attempt_id=rid, prompt_token_ids=list(range(100, 140)),
                               sampling=SamplingParams(max_tokens=8), resume=resume)

    first = s.schedule(request("a"), 0.1).placement.decode_id
    for n in range(2, 5):  # every resume of it avoids the instance it failed on
        again = s.schedule(request(f"a.a{n}", Resume(output_id="a", seq_base=1, failed_decode=first)), 0.1 * n)
        assert again.placement.admitted and again.placement.decode_id != first
    alone = Scheduler(Settings(policy="least_loaded", admission="none"))
    for kind, iid in (("prefill", "p0"), ("decode", "d0")):
        alone.heartbeat(Heartbeat(kind=kind, instance_id=iid, interval=1.0, max_running=32), 0.0)
    kept = alone.schedule(request("b.a2", Resume(output_id="b", seq_base=1, failed_decode="d0")), 0.1)
    assert kept.placement.admitted and kept.placement.decode_id == "d0"


def test_a_queue_placed_on_the_built_in_guess_is_priced_again_once_reports_ground_the_model():
    """Requests queued while the prefill cost model was still its built-in guess (2 ms a token, far
    too slow for a small model) must not keep the queue looking tens of seconds long once reports
    have fitted it: admission, then trusting the model, would reject what the instance serves in
    milliseconds."""
    from libs.config import Settings
    from libs.protocol import Heartbeat, PrefillReport, SamplingParams, ScheduleRequest
    from services.conductor.scheduler import Scheduler

    s = Scheduler(Settings(policy="least_loaded", admission="predictive"))
    for kind, iid in (("prefill", "p0"), ("decode", "d0")):
        s.heartbeat(Heartbeat(kind=kind, instance_id=iid, interval=1.0, max_running=32), 0.0)

    def request(rid, n):
        return ScheduleRequest(attempt_id=rid, prompt_token_ids=[(7 * i + n) % 30000 + 50 for i in range(n)],
                               sampling=SamplingParams(max_tokens=4), ttft_slo=30.0)

    for i in range(24):  # admitted on the guess: an ungrounded model judges nothing
        assert s.schedule(request(f"q{i}", 1000 + 16 * i), 0.01 * i).placement.admitted
    assert s.queue_seconds("p0", 0.3) > 30.0  # as the guess prices them
    for i in range(8):  # the first eight are computed, at 0.1 ms a token
        n = 1000 + 16 * i
        s.prefill_report(PrefillReport(attempt_id=f"q{i}", instance_id="p0", prompt_tokens=n,
                                       local_tokens=0, pool_tokens=0, load_bytes=0, load_seconds=0.0,
                                       compute_seconds=1e-4 * n, queue_seconds=0.0, ttft_seconds=0.5), 0.5)
    assert s.cost.fits > 0
    assert s.queue_seconds("p0", 0.5) < 5.0
    assert s.schedule(request("late", 1200), 0.6).placement.admitted


def test_conductors_split_the_instances_each_kind_dealt_in_turn():
    from services.conductor.partition import Partition

    conductors = ("c-a", "c-b", "c-c")
    prefills = [f"p{i}" for i in range(7)]
    shares = {c: Partition(c).mine(prefills, conductors) for c in conductors}
    assert sorted(sum(shares.values(), [])) == sorted(prefills)  # each instance to exactly one
    assert sorted(len(v) for v in shares.values()) == [2, 2, 3]
    for c, mine in shares.items():
        assert all(Partition.owner(p, prefills, conductors) == c for p in mine)
    # fewer instances than conductors: the last conductor gets none
    assert [len(Partition(c).mine(["d0", "d1"], conductors)) for c in conductors] == [1, 1, 0]
    # alone, a conductor has them all; a lost instance still has its owner among those left
    assert Partition("c-a").mine(prefills, ("c-a",)) == prefills
    assert Partition.owner("p3", [p for p in prefills if p != "p3"], conductors) == "c-a"


def test_two_conductors_place_only_on_their_own_instances_and_take_over_when_one_is_lost():
    from libs.config import Settings
    from libs.protocol import Heartbeat, SamplingParams, ScheduleRequest
    from services.conductor.scheduler import Scheduler

    def beat(s: Scheduler, now: float, *instances) -> None:
        for kind, iid in instances:
            s.heartbeat(Heartbeat(kind=kind, instance_id=iid, interval=1.0, max_running=32), now)

    workers = [("prefill", f"p{i}") for i in range(4)] + [("decode", f"d{i}") for i in range(4)]
    a, b = (Scheduler(Settings(policy="least_loaded", admission="none", instance_id=c)) for c in ("c-a", "c-b"))
    for s in (a, b):
        beat(s, 0.0, ("conductor", "c-a"), ("conductor", "c-b"), *workers)
    assert a.placing(0.0) == b.placing(0.0) == {"prefill": 2, "decode": 2}

    def placed(s: Scheduler, n: int, now: float) -> set[str]:
        out = set()
        for i in range(n):
            d = s.schedule(ScheduleRequest(attempt_id=f"{s.partition.own}-{now}-{i}",
                                           prompt_token_ids=list(range(100, 140)),
                                           sampling=SamplingParams(max_tokens=8)), now)
            assert d.placement.admitted
            out |= {d.placement.prefill_id, d.placement.decode_id}
        return out

    by_a, by_b = placed(a, 12, 0.1), placed(b, 12, 0.1)
    assert by_a and by_b and not by_a & by_b  # never the same instance
    assert by_a | by_b == {iid for _, iid in workers}
    # an instance lost now: exactly one of the two moves its work
    for kind, iid in workers:
        assert a.owns_lost(kind, iid, 0.2) != b.owns_lost(kind, iid, 0.2)
    # c-b falls silent: c-a places on every instance, and moves the work of an instance lost now
    # whatever its owner was
    beat(a, 3.5, ("conductor", "c-a"), *workers)
    a.prune(3.5)
    assert a.placing(3.5) == {"prefill": 4, "decode": 4}
    assert placed(a, 24, 3.6) == {iid for _, iid in workers}
    assert all(a.owns_lost(kind, iid, 3.6) for kind, iid in workers)


def test_decode_predictions_are_made_for_the_least_loaded_few():
    from libs.config import Settings
    from libs.protocol import Heartbeat, SamplingParams, ScheduleRequest
    from services.conductor.decodeview import DECODE_CANDIDATES, decode_candidates
    from services.conductor.scheduler import Scheduler

    s = Scheduler(Settings(policy="global_cache_aware", admission="none"))
    s.heartbeat(Heartbeat(kind="prefill", instance_id="p0", interval=1.0), 0.0)
    for i in range(20):  # d00 is the busiest, d19 the idlest
        s.heartbeat(Heartbeat(kind="decode", instance_id=f"d{i:02d}", interval=1.0, max_running=32,
                              running=20 - i, kv_tokens=1000 * (20 - i)), 0.0)
    chosen = decode_candidates(s.registry.alive("decode", 0.0))
    assert sorted(i.instance_id for i in chosen) == [f"d{i:02d}" for i in range(20 - DECODE_CANDIDATES, 20)]
    _, _, views = s.place(40, [], 0.1, tokens=8)
    assert len(views) == DECODE_CANDIDATES
    d = s.schedule(ScheduleRequest(attempt_id="a", prompt_token_ids=list(range(40)),
                                   sampling=SamplingParams(max_tokens=8)), 0.1)
    assert d.placement.decode_id == "d19"  # the idlest, as with a prediction for every instance
    _, _, views = s.place(40, [], 0.1, tokens=8, avoid_decode="d19")
    assert "d19" not in {v.instance_id for v in views}


def test_gateways_ask_the_conductors_in_turn_and_another_when_one_is_lost():
    from services.gateway.conductors import ConductorChoice

    c = ConductorChoice()
    picks = [c.pick(["c-b", "c-a"]) for _ in range(4)]
    assert sorted(picks) == ["c-a", "c-a", "c-b", "c-b"] and picks[0] != picks[1]
    assert {c.pick(["c-a", "c-b"], avoid={"c-a"}) for _ in range(3)} == {"c-b"}
    assert c.pick(["c-a"], avoid={"c-a"}) == "" and c.pick([]) == ""  # none: the queue group


def test_gateways_ask_a_conductor_by_name_and_a_restarted_one_again():
    from libs.protocol import Heartbeat
    from services.gateway.conductors import ConductorChoice

    def beat(iid, inc, share=True, **kw):
        return Heartbeat(kind="conductor", instance_id=iid, interval=1.0, incarnation=inc,
                         instances={"prefill": int(share), "decode": int(share)}, **kw)

    c = ConductorChoice()
    a, b = beat("c-a", "a1"), beat("c-b", "b1", share=False)
    worker = Heartbeat(kind="prefill", instance_id="p-0", interval=1.0)
    assert {c.target([a, b, worker], {}) for _ in range(3)} == {"c-a"}  # the one placing work
    # c-a lost (or said "elsewhere"): c-b by name, though it has no share, not the queue group
    assert c.target([a, b], {"c-a": "a1"}) == "c-b"
    assert c.target([a, b], {"c-a": "a1", "c-b": "b1"}) == ""
    # c-a restarted under the same id: another process, asked again
    assert c.target([beat("c-a", "a2"), b], {"c-a": "a1", "c-b": "b1"}) == "c-a"
    assert c.target([beat("c-a", "a1", draining=True)], {}) == ""
