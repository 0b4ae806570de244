"""Gateway wiring: the HTTP API, tokenisation, scheduling requests, turning token events into SSE."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from dataclasses import dataclass, field

import msgspec
import nats
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from libs import metrics
from libs.engine.device import DTYPES
from libs.kv.keys import block_hashes, namespace_digest
from libs.config import SLO
from libs.engine import grammar
from libs.engine.modelpath import model_name_for, resolve_model
from libs.engine.loading import load_tokenizer, model_identity, read_shape
from libs.protocol import (
    Abort,
    CachePinReply,
    CachePinRequest,
    Heartbeat,
    Resume,
    ScheduleReply,
    ScheduleRequest,
    Subjects,
    TokenEvent,
    decode,
    encode,
)
from libs.service import Service
from yuebing import __version__

from services.gateway import openai as oa
from services.gateway import openapi, pins
from services.gateway.choices import Choices, resume_id, resume_sampling
from services.gateway.conductors import ConductorChoice
from services.gateway.dashboard import Dashboard
from services.gateway.detok import IncrementalDetokenizer, StopStrings, TokenText
from services.gateway.phases import PhaseTimes
from services.gateway.sessions import Sessions

SCHEDULE_TIMEOUT = 10.0
CONDUCTOR_CHECK_SECONDS = 0.25  # while a schedule request waits, how often its conductor's liveness is checked


class ConductorLost(Exception):
    """The conductor asked to place a request was lost before it answered."""
STALL_TIMEOUT = 120.0  # longest silence between two token events before the request fails
MAX_ATTEMPTS = 3  # a request is resumed at most twice after instance failures


class ClientGone(Exception):
    pass


def _json(obj, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers)


def _error_response(err: oa.ApiError) -> web.Response:
    return _json(err.body(), status=err.status, headers=err.headers)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except oa.ApiError as e:
        return _error_response(e)
    except web.HTTPRequestEntityTooLarge as e:
        return _error_response(oa.ApiError(413, f"request body too large: {e.text}", code="body_too_large"))
    except web.HTTPException as e:
        if e.status >= 400:
            return _error_response(oa.ApiError(e.status, e.reason or "error"))
        raise


# routes outside /v1/ that need an API key as /v1/* does (vLLM's utility routes)
KEYED_PATHS = frozenset({"/tokenize", "/detokenize", "/version", "/cache/pins"})
PIN_TIMEOUT = 5.0  # seconds a cachestore instance has to answer a pin
# what /health needs heard from before it answers 200 (ready)
READY_NEEDS = ("conductor", "prefill", "decode")
DOWN_FORGET_SECONDS = 600.0  # /health names a silent instance as down for this long


class GatewayService(Service):
    kind = "gateway"

    async def setup(self) -> None:
        s = self.settings
        if problem := s.gateway_auth_error():
            raise RuntimeError(problem)
        self.api_keys = set(s.api_key_list())
        path = await asyncio.to_thread(resolve_model, s.model, s.resolved_models_dir())
        self.tokenizer = await asyncio.to_thread(load_tokenizer, path)
        self.token_text = TokenText(self.tokenizer)  # tokens as logprobs name them
        self.shape = read_shape(path)
        self.model_path = path
        self.sessions = Sessions(s.session_ttl_seconds, s.session_max_blocks)
        # prompts are hashed in the KV namespace the prefill instances announce (it binds the dtype
        # they chose, which a gateway without their hardware cannot know); until one is heard, in
        # the one the settings name (a dtype "auto" taken as float32)
        dtype = s.dtype if s.dtype in DTYPES else "float32"
        self.namespace = namespace_digest(model_identity(path, s.load_format), dtype, s.block_size)
        self.root_name = model_name_for(s.model, path)  # the model itself
        self.model_name = s.served_model_name or self.root_name  # the name clients send
        self.created = oa.now()
        self.reconnects = 0
        self.slo = s.slo()
        self.slo_classes = s.slo_class_map()
        self.live: dict[tuple[str, str], tuple[float, Heartbeat]] = {}  # (kind, id) -> (last seen, beat)
        self.conductors = ConductorChoice()
        self.dashboard = Dashboard(self, s.dashboard, ready_needs=READY_NEEDS, forget_after=DOWN_FORGET_SECONDS)
        await self.nc.subscribe(f"{Subjects.HEARTBEAT_PREFIX}.>", cb=self._on_heartbeat)

        self.openapi = openapi.document(self.model_name)
        app = web.Application(client_max_size=s.max_body_bytes, middlewares=[errors_middleware, self._auth])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/version", self.version)
        app.router.add_post("/cache/pins", self.pin_prefix)
        app.router.add_delete("/cache/pins", self.pin_prefix)
        app.router.add_get("/health", self.health)
        app.router.add_get("/live", self.live_probe)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/openapi.json", self.openapi_json)
        self.dashboard.start(app)
        self.keyed_paths = KEYED_PATHS | self.dashboard.keyed_paths
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.host, s.port)
        await site.start()
        self.url = f"http://{s.host}:{s.port}"
        self.log.info("gateway_listening", url=self.url, model=self.model_name)

    def on_reconnected(self) -> None:
        # token events published while the gateway was cut off are lost: in-flight requests resume
        self.reconnects += 1

    async def teardown(self) -> None:
        await self._runner.cleanup()

    async def _on_heartbeat(self, msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        now = time.monotonic()
        self.live[(hb.kind, hb.instance_id)] = (now, hb)
        self.dashboard.heartbeat(hb, now)
        if hb.kind == "prefill" and hb.kv_namespace and hb.kv_namespace != self.namespace.hex():
            try:
                announced = bytes.fromhex(hb.kv_namespace)
            except ValueError:
                return
            others = {b.kv_namespace for b in self.live_beats() if b.kind == "prefill" and b.kv_namespace}
            if len(others) > 1:
                self.log.warning("kv_namespaces_differ", namespaces=sorted(others),
                                 hint="prefill instances run different dtypes or models: they cannot share KV")
            self.namespace = announced

    def live_beats(self) -> list[Heartbeat]:
        now = time.monotonic()
        return [hb for seen, hb in self.live.values() if now - seen <= 3 * hb.interval]

    def down(self) -> list[dict]:
        """Instances heard from that fell silent without saying they were stopping (no draining
        beat): crashed, hung or cut off, for up to ``DOWN_FORGET_SECONDS``."""
        now = time.monotonic()
        return [{"kind": hb.kind, "id": hb.instance_id, "silent_seconds": round(now - seen, 1)}
                for seen, hb in sorted(self.live.values(), key=lambda v: (v[1].kind, v[1].instance_id))
                if 3 * hb.interval < now - seen <= DOWN_FORGET_SECONDS and not hb.draining]

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """Bearer API keys on /v1/*, /tokenize, /detokenize, /version, /cache/pins and the dashboard's
        data (unless it is "open"); /health, /live, /metrics, /openapi.json and the dashboard's page
        stay open."""
        if self.api_keys and (request.path.startswith("/v1/") or request.path in self.keyed_paths):
            header = request.headers.get("Authorization", "")
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip(), k) for k in self.api_keys):
                raise oa.ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
        return await handler(request)

    # ---------------------------------------------------------------- routes
    async def openapi_json(self, request: web.Request) -> web.Response:
        return _json(self.openapi)

    async def health(self, request: web.Request) -> web.Response:
        """Readiness: 200 only when the cluster can serve a request (the bus connected, and a
        conductor, a prefill and a decode instance heard from), else 503; the same body either way,
        saying what is missing."""
        beats = self.live_beats()
        counts = {"conductor": 0, "prefill": 0, "decode": 0, "cachestore": 0}
        for hb in beats:
            counts[hb.kind] = counts.get(hb.kind, 0) + 1
        ok = self.nc.is_connected
        missing = ([] if ok else ["nats"]) + [k for k in READY_NEEDS if counts[k] == 0]
        ready = not missing
        workers = [
            {"kind": hb.kind, "id": hb.instance_id, "queued": hb.queued, "running": hb.running,
             "kv_tokens": hb.kv_tokens, "restarts": hb.restarts,
             **({"device": hb.device, "dtype": hb.dtype} if hb.device else {})}
            for hb in sorted(beats, key=lambda b: (b.kind, b.instance_id))
        ]
        body = {"status": "ok" if ready else "unavailable", "ready": ready, "missing": missing,
                "model": self.model_name, "instances": counts, "workers": workers, "down": self.down(),
                "gateway": {"id": self.instance_id, "restarts": self.settings.restarts}}
        return _json(body, status=200 if ready else 503)

    async def live_probe(self, request: web.Request) -> web.Response:
        """Liveness: 200 while the gateway process answers, whatever the workers or the bus do."""
        return _json({"status": "alive", "nats_connected": self.nc.is_connected})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.EXPORTED), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        card = oa.model_card(self.model_name, self.root_name, self.created, self.shape.max_context)
        return _json({"object": "list", "data": [card]})

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": __version__})

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.tokenizer.chat_template:
            raise oa.ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                       tokenize=True, return_dict=False))

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: the token ids a prompt (as /v1/completions tokenizes it) or chat
        messages (the chat template applied, as /v1/chat/completions does) become."""
        req = await self._body(request, oa.TokenizeRequest)
        if oa.tokenize_input(req) == "messages":
            ids = self._chat_ids(oa.chat_messages(req), req.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=bool(req.add_special_tokens))
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return _json(oa.tokenize_body(list(ids), self.shape.max_context, strs))

    async def detokenize(self, request: web.Request) -> web.Response:
        req = await self._body(request, oa.DetokenizeRequest)
        ids = oa.check_token_ids(req.tokens, self.shape.vocab_size, "tokens")
        return _json({"prompt": self.tokenizer.decode(ids, skip_special_tokens=False,
                                                      clean_up_tokenization_spaces=False)})

    async def pin_prefix(self, request: web.Request) -> web.Response:
        """Pin a prefix's blocks in the pool for a time to live (POST), or end its pins (DELETE), on
        every live cachestore instance. A pin that one instance refuses (its bound on pinned blocks)
        is taken back from the others and answered 409."""
        req = await self._body(request, pins.PinRequest)
        pinning = request.method == "POST"
        pins.check(req, pinning)
        if req.messages is not None:
            ids = self._chat_ids(oa.chat_messages(req), add_generation_prompt=False)
        elif isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=False)
        else:
            ids = oa.check_token_ids(req.prompt, self.shape.vocab_size, "prompt")
        bs = self.settings.block_size
        keys = block_hashes(list(ids)[: self.shape.max_context], bs, self.namespace)
        if not keys:
            raise oa.ApiError(400, f"the prefix has {len(ids)} tokens; a pin keeps whole blocks of {bs}",
                              param="messages" if req.messages is not None else "prompt", code="invalid_value")
        stores = sorted(b.instance_id for b in self.live_beats() if b.kind == "cachestore")
        if not stores:
            raise oa.ApiError(503, "no cachestore instance is alive", code="service_unavailable",
                              headers={"Retry-After": "2"})
        answers = await self._ask_stores(stores, CachePinRequest(keys=keys, ttl_seconds=req.ttl_seconds or 0.0,
                                                                 unpin=not pinning))
        refused = {iid: a.error for iid, a in answers.items() if a is not None and a.error}
        if pinning and (refused or None in answers.values()):
            undo = encode(CachePinRequest(keys=keys, unpin=True))
            for iid, a in answers.items():
                if a is not None and not a.error:
                    await self.nc.publish(Subjects.cache(iid, "pin"), undo)
            if refused:
                iid, why = next(iter(refused.items()))
                raise oa.ApiError(409, f"cachestore {iid} refused the pin: {why}", code="pin_limit_exceeded")
            silent = ", ".join(iid for iid, a in answers.items() if a is None)
            raise oa.ApiError(503, f"cachestore {silent} did not answer the pin", code="service_unavailable",
                              headers={"Retry-After": "2"})
        return _json({"object": "cache.pin" if pinning else "cache.unpin", "blocks": len(keys),
                      "tokens": len(keys) * bs, "ttl_seconds": req.ttl_seconds if pinning else None,
                      # of the prefix's blocks, how many the pool holds now (each on the instance it is sharded to)
                      "held_blocks": min(len(keys), sum(a.held for a in answers.values() if a is not None)),
                      "instances": {iid: None if a is None else {"held": a.held, "pinned": a.pinned}
                                    for iid, a in answers.items()}})

    async def _ask_stores(self, stores: list[str], ask: CachePinRequest) -> dict[str, CachePinReply | None]:
        """Send a pin (or its end) to each of ``stores``; each one's answer, None where none came."""
        replies = await asyncio.gather(*[self.nc.request(Subjects.cache(iid, "pin"), encode(ask), timeout=PIN_TIMEOUT)
                                         for iid in stores], return_exceptions=True)
        answers = {}
        for iid, r in zip(stores, replies):
            try:
                answers[iid] = decode(r.data, CachePinReply) if not isinstance(r, BaseException) else None
            except (msgspec.DecodeError, msgspec.ValidationError):
                answers[iid] = None
        return answers

    async def _keep_session(self, session: str, tokens: list[int]) -> None:
        """A turn of ``session`` is over: pin the blocks whose KV its prompt and answer have (every
        token's but the last one's: nothing was generated after it) until the session's time to
        live; end the pins of blocks its chain no longer has. Best effort: a pin the pool refuses
        leaves the blocks to its eviction."""
        bs = self.settings.block_size
        keys = block_hashes(tokens[: len(tokens) - 1], bs, self.namespace)
        renewal = self.sessions.turn(session, keys, time.monotonic())
        stores = sorted(b.instance_id for b in self.live_beats() if b.kind == "cachestore")
        if not stores or not (renewal.pin or renewal.unpin):
            return
        asks = [CachePinRequest(keys=renewal.pin, ttl_seconds=self.sessions.ttl)] if renewal.pin else []
        if renewal.unpin:
            asks.append(CachePinRequest(keys=renewal.unpin, unpin=True))
        for ask in asks:
            answers = await self._ask_stores(stores, ask)
            refused = {iid: a.error or "no answer" for iid, a in answers.items() if a is None or a.error}
            if refused:
                self.log.warning("session_pin_failed", session=session, blocks=len(ask.keys), unpin=ask.unpin,
                                 refused=refused)

    async def _body(self, request: web.Request, typ):
        raw = await request.read()
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise oa.ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        req = oa.parse(obj, typ)
        if req.model is not None and req.model != self.model_name:  # /tokenize may leave it out
            raise oa.ApiError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")
        return req

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._body(request, oa.ChatCompletionRequest)
        ids = self._chat_ids(oa.chat_messages(req))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        norm = oa.normalize(req, ids, self.shape.max_context, max_tokens, None, self.slo, self.slo_classes,
                            self.shape.vocab_size, request.headers.get("X-Session-Id"))
        await self._check_grammar(norm)
        return await self._serve(request, norm, "chat", f"chatcmpl-{uuid.uuid4().hex}")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._body(request, oa.CompletionRequest)
        prompt = oa.completion_prompt(req, self.shape.vocab_size)
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(
            prompt, add_special_tokens=bool(req.add_special_tokens))
        # OpenAI's default for completions is 16 tokens.
        norm = oa.normalize(req, list(ids), self.shape.max_context, req.max_tokens, 16, self.slo, self.slo_classes,
                            self.shape.vocab_size, request.headers.get("X-Session-Id"))
        await self._check_grammar(norm)
        echoed = ""
        if norm.echo:  # the prompt as given, or as its token ids read
            echoed = prompt if isinstance(prompt, str) else self.tokenizer.decode(
                list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return await self._serve(request, norm, "text", f"cmpl-{uuid.uuid4().hex}", echoed)

    async def _check_grammar(self, norm: oa.Normalized) -> None:
        """A structured output's grammar must compile for this model's tokenizer (as the sampling
        instances will compile it): a 400 naming the field otherwise."""
        if norm.sampling.grammar is None:
            return
        try:
            tokenizer = await asyncio.to_thread(grammar.tokenizer_for, self.model_path, self.shape.eos_token_ids)
            await asyncio.to_thread(grammar.check, norm.sampling.grammar, tokenizer)
        except grammar.GrammarError as e:
            raise oa.ApiError(400, f"{norm.grammar_from} cannot be followed: {e}", param=norm.grammar_from,
                              code="invalid_grammar") from None

    # ---------------------------------------------------------------- generation
    async def _schedule(self, attempt_id: str, prompt: list[int], sampling, resume: Resume | None,
                        slo: SLO) -> ScheduleReply:
        sreq = ScheduleRequest(
            ttft_slo=slo.ttft,
            tbt_slo=slo.tbt,
            attempt_id=attempt_id,
            prompt_token_ids=prompt,
            sampling=sampling,
            block_hashes=block_hashes(prompt, self.settings.block_size, self.namespace),
            arrival_time=time.time(),
            resume=resume,
        )
        # one of the live conductors in turn (none heard of yet: whichever listens). No conductor
        # subscribed (restarting), or the one asked lost before it answered: ask again, another
        # one if there is one, within SCHEDULE_TIMEOUT; a request a live conductor took and did
        # not answer in time is not asked again
        deadline = time.monotonic() + SCHEDULE_TIMEOUT
        pause = 0.1
        avoid: dict[str, str] = {}  # conductor -> the process of it that was lost or said "elsewhere"
        body = encode(sreq)
        while True:
            target = self.conductors.target(self.live_beats(), avoid)  # services/gateway/conductors.py
            incarnation = self._incarnation("conductor", target)
            try:
                raw = await self._ask_conductor(target, incarnation, body, deadline)
                reply = decode(raw.data, ScheduleReply)
                if reply.admitted or reply.cause != "elsewhere" or time.monotonic() + pause >= deadline:
                    break
                # a conductor with no share of the instances (the split changed since its last
                # heartbeat): another one places it
                if target:
                    avoid[target] = incarnation
                else:
                    await asyncio.sleep(pause)
                    pause = min(1.0, 2 * pause)
                continue
            except (nats.errors.NoRespondersError, ConductorLost) as e:
                if target:
                    avoid[target] = incarnation
                    self.log.warning("conductor_lost", conductor=target, request_id=attempt_id,
                                     error=type(e).__name__)
                if time.monotonic() + pause < deadline:
                    if not target:  # no conductor listens: give one time to (re)start
                        await asyncio.sleep(pause)
                        pause = min(1.0, 2 * pause)
                    continue
            except nats.errors.TimeoutError:
                pass
            metrics.REJECTED.labels(reason="no_conductor").inc()
            if resume is None:  # a request's own (a resumed attempt's outcome is its request's)
                self.dashboard.rejected(attempt_id, None, "the scheduler (conductor) is not reachable", len(prompt))
            raise oa.ApiError(503, "the scheduler (conductor) is not reachable", code="service_unavailable",
                              headers={"Retry-After": "2"}) from None
        if not reply.admitted:
            metrics.REJECTED.labels(reason=str(reply.status)).inc()
            if resume is None:
                self.dashboard.rejected(attempt_id, reply, reply.reason, len(prompt))
            retry = max(1, round(reply.retry_after))
            raise oa.ApiError(reply.status, reply.reason, code="service_unavailable" if reply.status == 503
                              else "rate_limited", headers={"Retry-After": str(retry)})
        return reply

    async def _ask_conductor(self, target: str, asked: str, body: bytes, deadline: float):
        """Ask ``target`` (or, with "", whichever conductor listens) to place a request; raises
        ``ConductorLost`` when ``target`` misses its heartbeats, or beats as another process (it
        restarted from ``asked``, the process it was), before it answers."""
        subject = Subjects.schedule_to(target) if target else Subjects.SCHEDULE
        ask = asyncio.ensure_future(self.nc.request(subject, body, timeout=max(0.01, deadline - time.monotonic())))
        try:
            while True:
                done, _ = await asyncio.wait({ask}, timeout=CONDUCTOR_CHECK_SECONDS)
                if done:
                    return ask.result()
                if target and (self._lost("conductor", target)
                               or asked and self._incarnation("conductor", target) not in ("", asked)):
                    raise ConductorLost(target)
        finally:
            ask.cancel()

    async def _reschedule(self, attempt_id: str, prompt: list[int], sampling, resume: Resume, slo: SLO,
                          patience: float = 15.0) -> ScheduleReply:
        """Schedule a resumed attempt, waiting out a short outage (the bus or the conductor coming
        back, a replacement instance joining) instead of failing at once."""
        deadline = time.monotonic() + patience
        while True:
            try:
                return await self._schedule(attempt_id, prompt, sampling, resume, slo)
            except oa.ApiError as e:
                if e.status != 503 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)

    @staticmethod
    def _met(slo: SLO, ttft: float | None, tbt: float | None) -> bool:
        """Whether a finished request met its objectives (TTFT, and TBT as the 90th percentile gap)."""
        if slo.ttft > 0 and (ttft is None or ttft > slo.ttft):
            return False
        return not (slo.tbt > 0 and tbt is not None and tbt > slo.tbt)

    def _incarnation(self, kind: str, instance_id: str) -> str:
        """The process an instance's last heartbeat came from ("": none heard, or not given)."""
        seen = self.live.get((kind, instance_id))
        return seen[1].incarnation if seen is not None else ""

    def _lost(self, kind: str, instance_id: str) -> bool:
        """An instance this gateway heard from that has now missed three heartbeats."""
        seen = self.live.get((kind, instance_id))
        return seen is not None and time.monotonic() - seen[0] > 3 * seen[1].interval

    async def _events(self, rid: str, norm: oa.Normalized, state: Choices, client_gone):
        """Schedule the request and yield its TokenEvents, each choice's in order, until every choice
        is done (``state``: the caller may end one early); aborts what is left if left early.

        If the decode instance serving a choice is lost (or a worker hands a choice back), the
        choice is resumed: rescheduled as a new attempt whose prompt is the original prompt plus
        the choice's tokens already streamed, its events numbered on from where the client stands,
        so the client sees no token twice and none missing. A request of n choices is one attempt
        until then; each choice it hands back is resumed alone (``services/gateway/choices.py``).
        """
        queue: asyncio.Queue = asyncio.Queue()
        sub = await self.nc.subscribe(Subjects.output(rid), cb=queue.put)
        placed = False
        try:
            reply = await self._schedule(rid, norm.prompt_token_ids, norm.sampling, None, norm.slo)
            state.placed(rid, reply.decode_id)
            self.dashboard.placed(rid, len(norm.prompt_token_ids), reply)
            placed = True
            reconnects = self.reconnects
            deadline = time.monotonic() + self.settings.request_timeout
            while True:
                stall = time.monotonic() + STALL_TIMEOUT
                msg = None
                failed: list[str] = []
                while msg is None:
                    if client_gone():
                        raise ClientGone()
                    left = min(stall, deadline) - time.monotonic()
                    if left <= 0:
                        raise oa.ApiError(504, "the request timed out waiting for the model", code="timeout",
                                          type="server_error")
                    if self.reconnects != reconnects:
                        failed = list(state.decode)
                    else:
                        failed = [a for a, d in state.decode.items() if self._lost("decode", d)]
                    if failed:
                        break
                    try:
                        msg = await asyncio.wait_for(queue.get(), min(left, 1.0))
                    except asyncio.TimeoutError:
                        pass
                if msg is not None:
                    try:
                        ev = decode(msg.data, TokenEvent)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue
                    ready, gone = state.accept(ev)
                    # every event let through, even when the last of them finished the request:
                    # an attempt running ahead (one taken for lost that went on) can fill a choice's
                    # whole tail at once, and the choice is done before the first of them is yielded
                    for e in ready:
                        yield e
                    if state.done:
                        return
                    if gone is not None:
                        failed = [gone]  # the worker handed the choice back: resume it from here
                if failed:
                    reconnects = self.reconnects
                    await self._resume(rid, norm, state, failed)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if self.nc.is_connected:
                # what is not finished; a request whose scheduling failed may still have been placed
                for attempt in list(state.decode) if placed else [rid]:
                    with contextlib.suppress(Exception):
                        await self.nc.publish(Subjects.ABORT, encode(Abort(attempt_id=attempt, reason="client")))

    async def _resume(self, rid: str, norm: oa.Normalized, state: Choices, failed: list[str]) -> None:
        """Resume the choices the ``failed`` attempts served, each alone on live instances."""
        for attempt in failed:
            lost_decode = state.decode.get(attempt, "")
            choices = state.failed(attempt)
            await self.nc.publish(Subjects.ABORT, encode(Abort(attempt_id=attempt, reason="resume")))
            for c in choices:
                if c.tries >= MAX_ATTEMPTS:
                    raise oa.ApiError(503, "the request failed on every attempt", code="worker_error",
                                      type="server_error")
                attempt_id = resume_id(rid, c, norm.n)
                self.log.warning("request_resumed", request_id=rid, attempt=c.tries + 1, choice=c.index,
                                 tokens_so_far=len(c.got), lost_decode=lost_decode)
                reply = await self._reschedule(attempt_id, norm.prompt_token_ids + c.got,
                                               resume_sampling(norm.sampling, c),
                                               Resume(output_id=rid, seq_base=c.expected, index=c.index,
                                                      failed_decode=lost_decode), norm.slo)
                state.moved(c, attempt_id, reply.decode_id)

    async def _serve(self, request: web.Request, norm: oa.Normalized, kind: str, rid: str,
                     echoed: str = "") -> web.StreamResponse:
        """Stream or return the request's choices; ``echoed``: the prompt's text, which an echo puts
        before each choice's text."""
        log = self.log.bind(request_id=rid)
        started = time.monotonic()
        times = PhaseTimes(started)  # its phases, for the metrics
        created = oa.now()
        transport = request.transport

        def client_gone() -> bool:
            return transport is None or transport.is_closing()

        state = Choices(rid, norm.n)
        outs = [_Output(IncrementalDetokenizer(self.tokenizer), StopStrings(norm.stop)) for _ in range(norm.n)]
        n_out = 0
        cached = 0
        first_at = None
        gaps: list[float] = []
        prompt_rows = None  # an echo's prompt logprobs, from the first event that carries them
        resp: web.StreamResponse | None = None

        async def send(obj) -> None:
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

        def chunk(index: int, text: str, reason: str | None, logprobs=None) -> dict:
            if kind == "chat":
                return oa.chat_chunk(rid, self.model_name, created, {"content": text} if text else {}, reason, index,
                                     logprobs)
            return oa.completion_chunk(rid, self.model_name, created, text, reason, index, logprobs)

        metrics.REQUESTS_RUNNING.inc()
        try:
            events = self._events(rid, norm, state, client_gone)
            async with contextlib.aclosing(events):
                async for ev in events:
                    now = time.monotonic()
                    if ev.error:
                        raise oa.ApiError(503, f"generation failed: {ev.error}", code="worker_error", type="server_error")
                    o = outs[ev.index]
                    if o.finish is not None:
                        continue  # a stop string ended this choice: what its worker sent after is not the client's
                    times.event(ev, now)
                    if ev.seq == 0 and ev.index == 0:
                        cached = ev.cached_tokens
                    if ev.prompt_logprobs is not None and prompt_rows is None:
                        prompt_rows = ev.prompt_logprobs.rows()
                    out = []
                    entries = []  # (token, its logprobs) of the tokens the client gets, when asked for
                    for i, tok in enumerate(ev.token_ids):
                        n_out += 1
                        if first_at is None:
                            first_at = now
                            metrics.TTFT.observe(now - started)
                        if o.last_at is not None:
                            metrics.ITL.observe(now - o.last_at)
                            gaps.append(now - o.last_at)
                        o.last_at = now
                        if ev.logprobs is not None and i < len(ev.logprobs):
                            entries.append((tok, ev.logprobs[i]))
                        if i == len(ev.token_ids) - 1 and oa.ended_by_stop_token(
                                tok, ev.finish_reason, norm.sampling.stop_token_ids):
                            break
                        piece = o.stops.feed(o.detok.add(tok))
                        if piece:
                            out.append(piece)
                        if o.stops.stopped:
                            o.finish = "stop"
                            break
                    if o.finish is None and ev.finish_reason is not None:
                        o.finish = ev.finish_reason
                        tail = o.stops.flush()
                        if tail:
                            out.append(tail)
                    text = "".join(out)
                    if norm.echo and not o.echoed:  # the prompt first, with its logprobs when asked
                        o.echoed = True
                        text = echoed + text
                        if norm.logprobs:
                            if prompt_rows is None:
                                raise oa.ApiError(503, "generation failed: the prompt's logprobs did not come",
                                                  code="worker_error", type="server_error")
                            entries = oa.prompt_entries(norm.prompt_token_ids, prompt_rows) + entries
                    if norm.stream:
                        if resp is None:
                            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-cache"})
                            await resp.prepare(request)
                            if kind == "chat":
                                for index in range(norm.n):
                                    await send(oa.chat_chunk(rid, self.model_name, created,
                                                             {"role": "assistant", "content": ""}, None, index))
                        lp = self._logprobs(kind, entries, o.sent) if norm.logprobs and entries else None
                        if text or lp:
                            await send(chunk(ev.index, text, None, lp))
                            o.sent += len(text)
                    else:
                        o.parts.append(text)
                        o.entries.extend(entries)
                    if o.finish is not None:
                        abort = state.finish(ev.index)
                        if abort is not None:  # a stop string ended it: its worker need not go on
                            await self.nc.publish(Subjects.ABORT, encode(Abort(attempt_id=abort, reason="stop")))
                        if norm.stream:
                            await send(chunk(ev.index, "", o.finish))
                        if state.done:
                            break
        except ClientGone:
            log.info("client_disconnected", completion_tokens=n_out)
            self.dashboard.recent.cancelled(rid, time.time())
            metrics.REQUESTS_RUNNING.dec()
            return resp or web.Response(status=499)
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("client_disconnected", completion_tokens=n_out)
            self.dashboard.recent.cancelled(rid, time.time())
            metrics.REQUESTS_RUNNING.dec()
            raise
        except oa.ApiError as e:
            metrics.REQUESTS_RUNNING.dec()
            log.warning("request_failed", status=e.status, error=e.message)
            self.dashboard.recent.failed(rid, e.message, time.time(),
                                         None if first_at is None else first_at - started)
            if first_at is not None:  # admitted and prefilled, then failed: its prefill was wasted
                metrics.WASTED_PREFILL.inc(len(norm.prompt_token_ids) - cached)
            if resp is None:
                raise
            await send(e.body())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        metrics.REQUESTS_RUNNING.dec()
        finish = outs[0].finish
        use = oa.usage(len(norm.prompt_token_ids), n_out, cached)  # the prompt once, every choice's tokens
        metrics.PROMPT_TOKENS.inc(len(norm.prompt_token_ids))
        metrics.PROMPT_TOKENS_CACHED.inc(cached)
        metrics.observe_phases(times.phases())
        metrics.GENERATION_TOKENS.inc(n_out)
        metrics.E2E.observe(time.monotonic() - started)
        metrics.SUCCESS.labels(finished_reason=finish).inc()
        ttft = (first_at - started) if first_at is not None else None
        tbt = metrics.request_tbt(gaps)
        met = self._met(norm.slo, ttft, tbt)
        metrics.SLO_REQUESTS.labels(result="met" if met else "missed").inc()
        self.dashboard.recent.finished(rid, time.time(), ttft=ttft, tbt=tbt, met=met, cached_tokens=cached,
                                       output_tokens=n_out, finish_reason=finish or "")
        if not met:
            metrics.WASTED_PREFILL.inc(len(norm.prompt_token_ids) - cached)
        if norm.session_id is not None and self.sessions.enabled:
            self.spawn(self._keep_session(norm.session_id, norm.prompt_token_ids + state.all[0].got))
        log.info("request_done", prompt_tokens=len(norm.prompt_token_ids), completion_tokens=n_out,
                 cached_tokens=cached, finish=finish, choices=norm.n, seconds=round(time.monotonic() - started, 4),
                 ttft=None if ttft is None else round(ttft, 4), tbt=None if tbt is None else round(tbt, 4),
                 slo_met=met)
        if not norm.stream:
            if kind == "chat":
                choices = [oa.chat_choice(i, "".join(o.parts), o.finish,
                                          self._logprobs(kind, o.entries, 0) if norm.logprobs else None)
                           for i, o in enumerate(outs)]
                return _json(oa.chat_body(rid, self.model_name, created, choices, use))
            choices = [oa.completion_choice(i, "".join(o.parts), o.finish,
                                            self._logprobs(kind, o.entries, 0) if norm.logprobs else None)
                       for i, o in enumerate(outs)]
            return _json(oa.completion_body(rid, self.model_name, created, choices, use))
        if norm.include_usage:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            await send(oa.usage_chunk(rid, self.model_name, created, obj, use))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _logprobs(self, kind: str, entries: list, offset: int):
        """The logprobs of ``entries`` (token, its logprobs or None) as the endpoint gives them: chat's
        ``content`` entries, or completions' object with text offsets from ``offset``."""
        if kind == "chat":
            return oa.chat_logprobs([t for t, _ in entries], [lp for _, lp in entries], self.token_text)
        return oa.CompletionLogprobs(self.token_text, offset).body(entries)


@dataclass
class _Output:
    """One choice's output as the gateway sends it."""

    detok: IncrementalDetokenizer
    stops: StopStrings
    finish: str | None = None
    last_at: float | None = None  # when its last token came
    echoed: bool = False  # the prompt has gone before its text (an echo)
    sent: int = 0  # characters of it streamed so far (completions' text offsets go on from there)
    parts: list[str] = field(default_factory=list)  # not streamed: its text
    entries: list = field(default_factory=list)  # not streamed: its tokens' logprobs
