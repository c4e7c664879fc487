"""The Kubernetes manifests under k8s/, checked without a cluster.

KubeRay objects are validated against the OpenAPI schemas of KubeRay's CRDs (the folder named by
KUBERAY_CRDS_DIR, else ../shared/k8s/crds/ beside the repository; without either those tests
skip, except under CI=true, where they fail), made strict: the API server silently drops a field
its schema does not know, so a misspelt field would pass a lenient check here and vanish there.
Every `PREFLOOP_` variable must name a setting and hold a value the settings accept; the Serve
config must agree with deploy/serve_config.yaml and service/deployment.py; the data volume must
be shared and mounted at PREFLOOP_DATA_DIR; no Secret may be applied from the repository. Where
kubectl is installed, `kubectl kustomize` renders the base and each overlay and the rendered
objects are checked too.

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
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import make_url

# _NOT_FIELDS: the PREFLOOP_ names the CLI reads that are no fields; imported to stay in step.
from service.settings import _NOT_FIELDS, OFFLINE_SECTIONS, Settings, settings_error
from training.config import TrainingSettings

ROOT = Path(__file__).resolve().parents[2]
CRDS = Path(os.environ.get("KUBERAY_CRDS_DIR") or ROOT.parent / "shared" / "k8s" / "crds")
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in K8S.glob("overlays/*/kustomization.yaml"))
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
PLACEHOLDER = "REPLACE-ME"
KUBECTL = shutil.which("kubectl")
# The CRDs are about 1 MB each: libyaml reads them ten times faster than pure Python.
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Doc = dict[str, Any]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def kustomization(directory: Path) -> Doc:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


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
    known = set(_NOT_FIELDS)

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


def serve_app(config: Doc) -> Doc:
    apps = {app["name"]: app for app in config["applications"]}
    assert "prefloop" in apps, f"no application named prefloop: {sorted(apps)}"
    return apps["prefloop"]


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


def test_serve_config_deploys_the_policy_of_service_deployment() -> None:
    app = serve_app(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert app["route_prefix"] == "/"
    tree, path, _ = builder_module(app["import_path"])
    names = {
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "deployment"
        for kw in node.keywords
        if kw.arg == "name" and isinstance(kw.value, ast.Constant)
    }
    for deployment in app.get("deployments", []):
        assert deployment["name"] in names, f"{path} declares no deployment {deployment['name']!r}"
    app_name = [
        n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        and any(getattr(t, "id", None) == "APP_NAME" for t in n.targets)
        and isinstance(n.value, ast.Constant)
    ]
    assert app_name == ["prefloop"], f"{path}: APP_NAME should be the config's app name"


def test_serve_config_builder_takes_one_argument() -> None:
    """Serve calls an import path's function with the config's `args` dict, and accepts only
    functions of exactly one parameter."""
    app = serve_app(yaml.safe_load(SERVE_CONFIG.read_text()))
    tree, path, attr = builder_module(app["import_path"])
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == attr]
    if not found:
        pytest.xfail(f"{path} has no {attr}(args) yet: the builder of config-driven deploys")
    arguments = found[0].args
    params = [*arguments.posonlyargs, *arguments.args]
    assert len(params) == 1 and not arguments.kwonlyargs, f"{path}:{attr} must take one parameter"


def test_gpu_workers_hold_the_replicas_and_a_training_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, training = load_config(monkeypatch, config_data())
    service = base_one("RayService")
    policy = serve_app(yaml.safe_load(service["spec"]["serveConfigV2"]))["deployments"][0]
    serving = settings.replicas * policy["ray_actor_options"].get("num_gpus", 0)
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
    assert sum(g["minReplicas"] * gpus for g, gpus in groups) >= serving
    assert sum(g["maxReplicas"] * gpus for g, gpus in groups) >= serving + cycle
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
            for c in containers(spec):
                refs = {e.get("configMapRef", {}).get("name") for e in c.get("envFrom", [])}
                if obj["kind"] not in KUBERAY_KINDS and not refs & configs:
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


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda d: d.name)
def test_kustomize_renders_valid_objects(
    schemas: dict[tuple[str, str], Doc], directory: Path
) -> None:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert "Secret" not in {d["kind"] for d in rendered}
    for obj in rendered:
        if obj["kind"] in KUBERAY_KINDS:
            errors = schema_errors(schemas, obj)
            assert not errors, f"{directory.name} {obj['kind']}:\n  " + "\n  ".join(errors)
        for where, spec in pod_specs(obj):
            for c in containers(spec):
                assert c["image"] != "prefloop", f"{where}: `images` did not set the image"
    service = next(d for d in rendered if d["kind"] == "RayService")
    app = serve_app(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert app["import_path"] == serve_app(yaml.safe_load(SERVE_CONFIG.read_text()))["import_path"]
    if directory.name == "cpu":
        assert "nvidia.com/gpu" not in out.stdout
        assert "entrypoint-num-gpus" not in out.stdout
        assert all(d["ray_actor_options"].get("num_gpus", 0) == 0 for d in app["deployments"])
