"""compose.yaml describes the same cluster as `yuebing up`, each worker scalable."""

from pathlib import Path

import yaml

from yuebing.cli import SERVICES, build_parser

ROOT = Path(__file__).resolve().parent.parent


def _compose():
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_has_nats_with_jetstream_and_every_service():
    services = _compose()["services"]
    assert "-js" in services["nats"]["command"]
    assert services["nats"]["environment"]["GODEBUG"] == "madvdontneed=0"  # as the local cluster's server
    for kind in SERVICES:
        assert kind in services, kind
        cmd = services[kind]["command"]
        assert cmd[:2] == ["serve", kind]
        assert cmd[cmd.index("--nats") + 1] == "nats://nats:4222"
        # the command must be one the CLI accepts
        args = build_parser().parse_args(cmd)
        assert args.service == kind


def test_workers_are_scalable_and_wait_for_the_model():
    services = _compose()["services"]
    for kind in ("prefill", "decode", "cachestore", "gateway", "conductor"):
        svc = services[kind]
        assert "container_name" not in svc  # a fixed name would forbid --scale
        assert svc["depends_on"]["model"]["condition"] == "service_completed_successfully"
        assert svc["depends_on"]["nats"]["condition"] == "service_started"
    for kind in ("prefill", "decode"):
        assert "ports" not in services[kind]  # host ports would collide when scaled
    assert services["gateway"]["ports"] == ["8000:8000"]
    assert services["model"]["command"] == ["convert"]
    assert (ROOT / services["prefill"]["build"] / "Dockerfile").exists()


def test_gateway_requires_an_api_key():
    gateway = _compose()["services"]["gateway"]
    assert "YUEBING_API_KEYS" in gateway["environment"]
    assert ":?" in gateway["environment"]["YUEBING_API_KEYS"]  # compose refuses to start without one
