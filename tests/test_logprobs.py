"""Logprobs, echo and n > 1 in plain logic: validation, the log-probabilities computed, their
OpenAI formats, the gateway's ordering and resuming of choices, decode's forks, the simulated
engine's logprobs. The cluster end to end is in test_openai_api.py."""

import math

import msgspec
import pytest
import torch

from libs.engine.logprobs import PromptScores, logprobs_at, logprobs_rows
from libs.protocol import SamplingParams, TokenEvent, TokenLogprobs, choice_seed, decode, encode
from services.conductor.scheduler import reusable_keys
from services.decode.batcher import Group, fork_ids
from services.gateway import openai as oa
from services.gateway.choices import Choices, resume_id, resume_sampling
from services.prefill.service import reusable_blocks


def _chat(**kw):
    return msgspec.convert({"model": "m", "messages": [{"role": "user", "content": "x"}], **kw},
                           oa.ChatCompletionRequest)


def _text(**kw):
    return msgspec.convert({"model": "m", "prompt": [1], **kw}, oa.CompletionRequest)


# ---------------------------------------------------------------- validation
def test_logprobs_echo_and_n_validated_into_sampling():
    s = oa.normalize(_chat(logprobs=True, top_logprobs=20, n=8), [1, 2], 100, None, None).sampling
    assert (s.logprobs, s.prompt_logprobs, s.n) == (20, None, 8)
    assert oa.normalize(_chat(logprobs=True), [1], 100, None, None).sampling.logprobs == 0
    assert oa.normalize(_chat(logprobs=False, top_logprobs=0), [1], 100, None, None).sampling.logprobs is None
    n = oa.normalize(_text(logprobs=5, echo=True), [1, 2, 3], 100, 0, 16)
    assert (n.sampling.logprobs, n.sampling.prompt_logprobs, n.sampling.max_tokens, n.echo) == (5, 5, 0, True)
    n = oa.normalize(_text(logprobs=0), [1, 2, 3], 100, None, 16)
    assert (n.sampling.logprobs, n.sampling.prompt_logprobs, n.echo) == (0, None, False)
    assert oa.normalize(_text(echo=True), [1, 2], 100, 0, 16).sampling.prompt_logprobs is None
    for req, max_tokens, param in [(_chat(logprobs=True, top_logprobs=21), 4, "top_logprobs"),
                                   (_chat(top_logprobs=2), 4, "top_logprobs"),  # without logprobs
                                   (_text(logprobs=6), 4, "logprobs"), (_text(logprobs=-1), 4, "logprobs"),
                                   (_text(), 0, "max_tokens"),  # 0 only with echo
                                   (_chat(n=9), 4, "n"), (_text(n=0), 4, "n")]:
        with pytest.raises(oa.ApiError) as e:
            oa.normalize(req, [1, 2], 100, max_tokens, 16)
        assert (e.value.status, e.value.param) == (400, param), e.value.message
    # an echo's prompt logprobs travel in one message: a prompt too long for it is refused
    assert oa.prompt_logprobs_fit(20000, 5) and not oa.prompt_logprobs_fit(30000, 5)
    with pytest.raises(oa.ApiError) as e:
        oa.normalize(_text(logprobs=5, echo=True), [1] * 30000, 40000, 1, 16)
    assert e.value.param == "echo"


def test_logprobs_fields_parse_with_their_types():
    assert oa.parse({"model": "m", "prompt": "x", "logprobs": 2, "echo": True}, oa.CompletionRequest).logprobs == 2
    for body, typ in [({"model": "m", "prompt": "x", "logprobs": True}, oa.CompletionRequest),
                      ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": 3},
                       oa.ChatCompletionRequest)]:
        with pytest.raises(oa.ApiError) as e:
            oa.parse(body, typ)
        assert e.value.param == "logprobs"
    # still refused: chat's echo, best_of
    for body, typ, param in [({"model": "m", "messages": [{"role": "user", "content": "x"}], "echo": True},
                              oa.ChatCompletionRequest, "echo"),
                             ({"model": "m", "prompt": "x", "best_of": 2}, oa.CompletionRequest, "best_of")]:
        with pytest.raises(oa.ApiError) as e:
            oa.parse(body, typ)
        assert (e.value.param, e.value.code) == (param, "unsupported_parameter")


# ---------------------------------------------------------------- the values
def test_logprobs_are_the_log_softmax_of_the_raw_logits_and_its_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    ref = torch.log_softmax(logits, -1)
    got = logprobs_rows(logits[[0, 2, 3]], [5, 7, 9], [3, 0, 1])
    for row, tok, k, lp in zip([0, 2, 3], [5, 7, 9], [3, 0, 1], got):
        assert lp.logprob == pytest.approx(ref[row, tok].item(), abs=1e-6)
        top = ref[row].topk(k) if k else None
        assert lp.top_ids == (top.indices.tolist() if k else [])
        assert lp.top_logprobs == pytest.approx(top.values.tolist() if k else [], abs=1e-6)
    # n choices from one distribution: one top-k, each choice its own token's logprob
    at = logprobs_at(logits[1], [4, 4, 11], 2)
    assert [a.logprob for a in at] == pytest.approx([ref[1, 4].item(), ref[1, 4].item(), ref[1, 11].item()])
    assert all(a.top_ids == ref[1].topk(2).indices.tolist() for a in at)


def test_prompt_scores_chunk_by_chunk_and_over_the_bus():
    torch.manual_seed(1)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    logits = torch.randn(len(prompt), 50)
    ref = torch.log_softmax(logits, -1)
    scores = PromptScores(prompt, 2)
    scores.add(logits[:3], 0)
    with pytest.raises(RuntimeError):
        scores.message()  # positions missing: never a partial answer
    scores.add(logits[3:], 3)  # the last position's logits are the first output token's: ignored
    ev = decode(encode(TokenEvent(output_id="r", seq=0, token_ids=[1], prompt_logprobs=scores.message())), TokenEvent)
    rows = ev.prompt_logprobs.rows()
    assert len(rows) == len(prompt) - 1
    for p, (lp, ids, vals) in enumerate(rows):
        assert lp == pytest.approx(ref[p, prompt[p + 1]].item(), abs=1e-6)
        assert ids == ref[p].topk(2).indices.tolist()
        assert vals == pytest.approx(ref[p].topk(2).values.tolist(), abs=1e-6)


def test_a_request_without_logprobs_carries_none():
    ev = decode(encode(TokenEvent(output_id="r", seq=3, token_ids=[7])), TokenEvent)
    assert ev.logprobs is None and ev.prompt_logprobs is None and ev.index == 0


# ---------------------------------------------------------------- formats
def _text_of(tid):
    return {1: ("a", [97]), 2: ("bc", [98, 99]), 3: ("\ufffd", [240])}[tid]


def test_chat_logprobs_format():
    lp = TokenLogprobs(-0.5, [1, 2], [-0.5, -20000.0])
    assert oa.chat_logprobs([1], [lp], _text_of) == [{
        "token": "a", "logprob": -0.5, "bytes": [97],
        "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]},
                         {"token": "bc", "logprob": oa.LOGPROB_FLOOR, "bytes": [98, 99]}]}]


def test_completion_logprobs_format_with_an_echoed_prompt():
    rows = [(-1.0, [1], [-0.1]), (-2.0, [2], [-0.2])]
    entries = oa.prompt_entries([2, 1, 3], rows) + [(1, TokenLogprobs(-0.3, [2], [-0.2])),
                                                    (2, TokenLogprobs(-math.inf, [], []))]
    body = oa.CompletionLogprobs(_text_of).body(entries)
    assert body == {
        "tokens": ["bc", "a", "\ufffd", "a", "bc"],
        "token_logprobs": [None, -1.0, -2.0, -0.3, oa.LOGPROB_FLOOR],
        # each position's most likely tokens, and the token itself whatever its rank
        "top_logprobs": [None, {"a": -0.1}, {"bc": -0.2, "\ufffd": -2.0}, {"bc": -0.2, "a": -0.3},
                         {"bc": oa.LOGPROB_FLOOR}],
        "text_offset": [0, 2, 3, 4, 5],
    }
    # a streamed chunk's offsets go on from the characters sent before it
    assert oa.CompletionLogprobs(_text_of, 7).body([(2, TokenLogprobs(-1.0, [], []))])["text_offset"] == [7]


# ---------------------------------------------------------------- n > 1
def test_choice_seeds():
    p = SamplingParams(max_tokens=4, seed=42, n=3, temperature=0.7)
    assert p.choice(0).seed == 42 and p.choice(0).n == 1
    seeds = {p.choice(i).seed for i in range(3)}
    assert len(seeds) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert p.choice(2).seed == choice_seed(42, 2) == SamplingParams(max_tokens=9, seed=42, n=5).choice(2).seed
    assert SamplingParams(max_tokens=4, n=2).choice(1).seed is None
    single = SamplingParams(max_tokens=4, seed=1)
    assert single.choice(0) is single


def _ev(index, seq, tokens=(5,), finish=None, retry=False):
    return TokenEvent(output_id="r", seq=seq, token_ids=list(tokens), finish_reason=finish, index=index,
                      retry=retry, error="x" if retry else "")


def test_choices_in_order_and_resumed_alone():
    state = Choices("r", 3)
    state.placed("r", "decode-0")
    assert state.accept(_ev(1, 1)) == ([], None)  # early: waits for seq 0
    ready, failed = state.accept(_ev(1, 0))
    assert [e.seq for e in ready] == [0, 1] and failed is None
    assert state.accept(_ev(1, 0)) == ([], None)  # a duplicate
    assert state.accept(_ev(0, 0, finish="stop"))[0][0].finish_reason == "stop"
    assert state.accept(_ev(7, 0)) == ([], None)  # no such choice
    # choice 2 handed back: the attempt failed; choices 1 and 2 are resumed, each alone
    state.accept(_ev(2, 0))
    assert state.accept(_ev(2, 1, tokens=(), retry=True)) == ([], "r")
    todo = state.failed("r")
    assert [c.index for c in todo] == [1, 2] and state.decode == {}
    params = SamplingParams(max_tokens=10, seed=3, n=3, logprobs=2, prompt_logprobs=2)
    for c in todo:
        s = resume_sampling(params, c)
        assert (s.n, s.seed, s.max_tokens, s.prompt_logprobs) == (1, params.choice(c.index).seed, 10 - len(c.got), None)
        state.moved(c, resume_id("r", c, 3), f"decode-{c.index}")
    assert sorted(state.decode) == ["r.c1.a2", "r.c2.a2"]
    # the failed attempt's hand-back of choice 1 comes late, at the seq its new attempt starts from
    assert state.accept(_ev(1, 2, tokens=(), retry=True)) == ([], None)
    assert [e.seq for e in state.accept(_ev(1, 2, finish="length"))[0]] == [2]
    assert sorted(state.decode) == ["r.c2.a2"] and not state.done
    # a stop string ends choice 2 at the gateway: its attempt serves it alone, so it is aborted whole
    assert state.finish(2) == "r.c2.a2" and state.done and state.decode == {}


def test_choices_finished_early_are_aborted_by_choice_while_others_run():
    state = Choices("r", 2)
    state.placed("r", "decode-0")
    assert state.finish(1) == "r#1" and list(state.decode) == ["r"]
    state.accept(_ev(0, 0, finish="length"))
    assert state.done and state.decode == {}
    one = Choices("q", 1)
    one.placed("q", "d")
    assert one.finish(0) == "q"


def test_a_choice_resumed_before_its_first_event_still_gets_the_prompt_logprobs():
    state = Choices("r", 2)
    state.placed("r", "d")
    params = SamplingParams(max_tokens=5, n=2, logprobs=1, prompt_logprobs=1)
    c0, c1 = state.failed("r")
    assert resume_sampling(params, c0).prompt_logprobs == 1 and resume_sampling(params, c1).prompt_logprobs == 1
    assert resume_id("r", c0, 1) == "r.a2"


def test_decode_forks():
    assert fork_ids("a", [0, 2, 3]) == ["a", "a#2", "a#3"]
    g = Group("a", dict(zip([2, 3], fork_ids("a", [2, 3]))))
    assert g.live == {"a", "a#3"}
    assert g.sequences("a") == ["a", "a#3"]
    assert g.sequences("a#2") == ["a"] and g.sequences("a#3") == ["a#3"]
    assert g.sequences("a#1") is None and g.sequences("b") is None
    assert not g.leave("a#3") and g.sequences("a#3") is None and g.leave("a")


# ---------------------------------------------------------------- no reused prefix for prompt logprobs
def test_prompt_logprobs_reuse_no_cached_prefix():
    assert reusable_blocks(65, 16, -1, False) == 4 and reusable_blocks(64, 16, -1, False) == 3
    assert reusable_blocks(65, 16, 2, False) == 2
    assert reusable_blocks(65, 16, -1, True) == 0
    keys = [b"k1", b"k2"]
    assert reusable_keys(SamplingParams(max_tokens=1), keys) == keys
    assert reusable_keys(SamplingParams(max_tokens=1, logprobs=0, prompt_logprobs=0), keys) == []


# ---------------------------------------------------------------- the simulated engine
def test_sim_engine_logprobs_follow_its_logits(tiny_dir):
    from libs.engine.costs import CostProfile
    from libs.engine.simengine import LOGIT_HIGH, LOGIT_LOW, SimRunner

    sim = SimRunner(tiny_dir, CostProfile(model="t", threads=1, prefill=(0.0, 0.0, 0.0), decode=(0.0, 0.0, 0.0)))
    first = sim.words[0]
    other = next(w for w in sim.words if w != sim.next_word(first, 0))  # not the sim's word after it
    prompt = [first, other, sim.next_word(other, 1)]
    prompt.append(sim.next_word(prompt[2], 2))
    scores = PromptScores(prompt, 2)
    logits, _ = sim.prefill(prompt, chunk=3, scores=scores)
    rows = scores.message().rows()
    low = LOGIT_LOW - LOGIT_HIGH  # a token other than the sim's word, up to a negligible normaliser
    assert rows[0][0] == pytest.approx(low, abs=1e-3)
    assert rows[1][0] == pytest.approx(0.0, abs=1e-6) and rows[2][0] == pytest.approx(0.0, abs=1e-6)
    assert rows[1][1][0] == prompt[2] and rows[1][2][1] == pytest.approx(low, abs=1e-3)
    token = sim.next_word(prompt[-1], len(prompt) - 1)
    assert logprobs_at(logits, [token], 1)[0].logprob == pytest.approx(0.0, abs=1e-6)
