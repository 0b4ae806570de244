"""Least privilege on the bus, checked against the real nats-server of a running cluster: with each
instance's own credentials, from outside the services, what it has no business doing is refused by
the server (reading others' replies or KV, managing streams, pulling others' tasks, forging replies),
while what it must do still works."""

import asyncio

import nats
import pytest

from libs.bus import synced
from libs.natsserver import permissions
from libs.protocol import Subjects

USERS = ("gateway-0", "conductor-0", "prefill-0", "decode-0", "cachestore-0")


class _Client:
    """A connection with one instance's credentials that records the server's refusals."""

    def __init__(self, server, user: str):
        self.server, self.user = server, user
        self.errors: list[str] = []

    async def __aenter__(self):
        async def on_error(e):
            self.errors.append(str(e).lower())

        self.nc = await nats.connect(self.server.url_for(self.user), error_cb=on_error, allow_reconnect=False,
                                     inbox_prefix=Subjects.inbox_prefix("probe", self.user))
        return self

    async def __aexit__(self, *exc):
        await self.nc.close()

    async def refused(self, what: str, timeout: float = 3.0) -> bool:
        for _ in range(int(timeout / 0.05)):
            if any("permissions violation" in e and what.lower() in e for e in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False


async def _received(admin, subject: str, send) -> list[str]:
    """What a subscriber (admin) on ``subject`` gets while ``send()`` runs."""
    got: list[str] = []

    async def record(msg):
        got.append(msg.subject)

    sub = await admin.subscribe(subject, cb=record)
    await synced(admin)
    await send()
    await asyncio.sleep(0.5)
    await sub.unsubscribe()
    return got


@pytest.mark.parametrize("user", USERS)
async def test_nobody_reads_every_inbox_or_another_instances_kv(tiny_cluster, user):
    server = tiny_cluster.nats
    admin = await nats.connect(server.url)
    try:
        async with _Client(server, user) as c:
            seen: list[str] = []

            async def record(msg):
                seen.append(msg.subject)

            other = "conductor.conductor-0" if user == "gateway-0" else "gateway.gateway-0"
            for subject in ("_INBOX.>", f"_INBOX.{other}.>", "yb.kv.decode-1", "yb.kv.>"):
                await c.nc.subscribe(subject, cb=record)
            await c.nc.flush()
            for subject in ("_INBOX.>", f"_INBOX.{other}.>", "yb.kv.>"):
                assert await c.refused(f'subscription to "{subject}"'), (user, subject, c.errors)
            await admin.publish(f"_INBOX.{other}.probe", b"a reply")
            await admin.publish("yb.kv.decode-1", b"a prompt's kv")
            await admin.flush()
            await asyncio.sleep(0.5)
            assert seen == [], (user, seen)
    finally:
        await admin.close()


@pytest.mark.parametrize("user", ["gateway-0", "prefill-0", "decode-0", "cachestore-0"])
async def test_only_the_conductor_manages_streams(tiny_cluster, user):
    server = tiny_cluster.nats
    admin = await nats.connect(server.url)
    try:
        before = {s: (await admin.jetstream().stream_info(s)).config.subjects
                  for s in (Subjects.PREFILL_STREAM, Subjects.DECODE_STREAM, Subjects.KV_EVENTS_STREAM)}
        async with _Client(server, user) as c:
            js = c.nc.jetstream(timeout=1.0)
            for stream in before:
                with pytest.raises(Exception):
                    await js.purge_stream(stream)
                with pytest.raises(Exception):
                    await js.delete_stream(stream)
            assert await c.refused("$js.api.stream.purge"), c.errors
            assert await c.refused("$js.api.stream.delete"), c.errors
        for stream, subjects in before.items():  # still there, as they were
            assert (await admin.jetstream().stream_info(stream)).config.subjects == subjects
    finally:
        await admin.close()


async def test_an_instance_pulls_only_its_own_tasks(tiny_cluster):
    """prefill-0 cannot make or read a consumer of another prefill instance's tasks, nor decode's;
    decode-0 cannot read prefill's at all."""
    server = tiny_cluster.nats
    attempts = [
        ("prefill-0", Subjects.PREFILL_STREAM, Subjects.prefill_task("prefill-1"), "prefill-1"),
        ("prefill-0", Subjects.DECODE_STREAM, Subjects.decode_task("decode-0"), "decode-0"),
        ("decode-0", Subjects.PREFILL_STREAM, Subjects.prefill_task("prefill-0"), "prefill-0"),
        ("cachestore-0", Subjects.PREFILL_STREAM, Subjects.prefill_task("prefill-0"), "prefill-0"),
    ]
    for user, stream, subject, durable in attempts:
        async with _Client(server, user) as c:
            js = c.nc.jetstream(timeout=1.0)
            with pytest.raises(Exception):
                sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
                await sub.fetch(1, timeout=1.0)
            assert await c.refused("$js.api.consumer"), (user, durable, c.errors)


async def test_forged_replies_and_tasks_are_refused(tiny_cluster):
    """Replies go back through the server's response permissions: no instance may publish into
    another's inbox unprompted (except the block streams into prefill instances' inboxes, which
    the cachestore and peers send), or on subjects outside its own work."""
    server = tiny_cluster.nats
    admin = await nats.connect(server.url)
    forgeries = [
        ("decode-0", "_INBOX.gateway.gateway-0.forged"),  # a schedule reply to the gateway
        ("prefill-0", "_INBOX.conductor.conductor-0.forged"),
        ("cachestore-0", "_INBOX.gateway.gateway-0.forged"),
        ("gateway-0", "_INBOX.prefill.prefill-0.forged"),  # a block stream into a prefill instance
        ("decode-0", "yb.sched"),
        ("decode-0", "yb.task.prefill.prefill-0"),
        ("gateway-0", "yb.kv.decode-0"),
        ("cachestore-0", "yb.out.someone"),
        ("prefill-0", "yb.kvev.cachestore-0"),  # another instance's KV events
        ("prefill-0", "yb.hb.prefill.prefill-9"),  # another instance's heartbeat
    ]
    try:
        for user, subject in forgeries:
            async with _Client(server, user) as c:
                async def send():
                    await c.nc.publish(subject, b"forged")
                    await c.nc.flush()

                assert await _received(admin, subject, send) == [], (user, subject)
                assert await c.refused(f'publish to "{subject}"'), (user, subject, c.errors)
        # and what an instance must do still goes through
        async with _Client(server, "decode-0") as c:
            async def send():
                await c.nc.publish("yb.out.probe", b"a token")
                await c.nc.flush()

            assert await _received(admin, "yb.out.probe", send) == ["yb.out.probe"]
    finally:
        await admin.close()
    with pytest.raises(Exception):  # no credentials, no connection
        await nats.connect(server.public_url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


def test_every_kind_can_do_its_own_work_and_no_more():
    """The permission table itself: shared subjects only where the design says, instance
    subjects scoped to the instance."""
    p = {k: permissions(k, "x-1") for k in ("gateway", "conductor", "prefill", "decode", "cachestore", "worker")}
    for kind, perms in p.items():
        assert "_INBOX.>" not in perms["sub"] and "_INBOX.>" not in perms["pub"], kind
        assert f"{Subjects.inbox_prefix(kind, 'x-1')}.>" in perms["sub"], kind
        assert not any(s.startswith("$JS.API.STREAM.DELETE") for s in perms["pub"]), kind
    assert not any(s.startswith("$JS.API") for s in p["gateway"]["pub"]) and not p["gateway"]["allow_responses"]
    assert "yb.kv.x-1" in p["decode"]["sub"] and "yb.kv.>" not in p["decode"]["sub"]
    assert "$JS.API.CONSUMER.MSG.NEXT.YB_PREFILL.x-1" in p["prefill"]["pub"]
    assert not any("MSG.NEXT" in s and not s.endswith(".x-1") for s in p["prefill"]["pub"] + p["decode"]["pub"])
    assert "$JS.API.STREAM.CREATE.YB_PREFILL" in p["conductor"]["pub"]
    # a cachestore copies hot blocks to the others: their puts, not their gets or pins
    assert "yb.cache.*.put" in p["cachestore"]["pub"] and "yb.hb.cachestore.>" in p["cachestore"]["sub"]
    assert not any(s.startswith("yb.cache.") and not s.endswith(".put") for s in p["cachestore"]["pub"])
