"""What a cluster makes of the rendered manifests, for tests that have none: the pods that
workloads and KubeRay's custom resources create (with the labels and ports KubeRay adds), label
selectors, NetworkPolicy admission and resource quantities.

KubeRay's part follows KubeRay v1.7's ray-operator/controllers/ray/common/pod.go (`labelPod`,
`BuildPod`, the default metrics port); NetworkPolicy admission follows the Kubernetes
NetworkPolicy API (networking.k8s.io/v1) for ingress rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

Doc = dict[str, Any]

# The namespace the manifests are applied to (docs/kubernetes.md).
NAMESPACE = "prefloop"
# Labels KubeRay sets on a Ray pod that the template cannot override.
KUBERAY_FIXED = ("ray.io/node-type", "ray.io/group", "ray.io/cluster")
# KubeRay adds this port, named `metrics`, to a Ray container that declares none.
KUBERAY_METRICS_PORT = 8080
# Where a Ray head listens unless its rayStartParams say otherwise: (port name, the start
# parameter that moves it, Ray's default), named as KubeRay names them.
HEAD_PORTS = (
    ("gcs-server", "port", 6379),
    ("dashboard", "dashboard-port", 8265),
    ("client", "ray-client-server-port", 10001),
)


@dataclass(frozen=True)
class Pod:
    owner: str  # kind/name of the object that makes it
    role: str  # head, worker, submitter or pod
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int]  # where it listens: port name -> number
    annotations: dict[str, str]

    def __str__(self) -> str:
        return f"{self.owner} {self.role} ({self.namespace})"


def ports(template: Doc) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"]
        for c in template["spec"]["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }


def pod(owner: str, role: str, template: Doc, labels: dict[str, str] | None = None) -> Pod:
    meta = template.get("metadata", {})
    own = meta.get("labels", {}) if labels is None else labels
    return Pod(owner, role, NAMESPACE, own, ports(template), meta.get("annotations", {}))


def name(obj: Doc) -> str:
    meta = obj["metadata"]
    return meta.get("name") or meta["generateName"].rstrip("-")


def ray_pod(obj: Doc, group_spec: Doc, node_type: str, group: str) -> Pod:
    """A Ray pod as KubeRay builds it from a head or worker group."""
    template, params = group_spec["template"], group_spec.get("rayStartParams", {})
    cluster = f"{name(obj)}-x7k2q"  # KubeRay names the RayCluster after the object, plus a suffix
    labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/cluster": cluster,
        "ray.io/node-type": node_type,
        "ray.io/group": group,
        "ray.io/identifier": f"{cluster}-{node_type}",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    own = template.get("metadata", {}).get("labels", {})
    labels.update({k: v for k, v in own.items() if k not in KUBERAY_FIXED})
    if obj["kind"] == "RayService":
        # On every worker; on the head once its proxy is healthy, unless the spec excludes it.
        excluded = node_type == "head" and obj["spec"].get("excludeHeadPodFromServeSvc")
        labels["ray.io/serve"] = "false" if excluded else "true"
    made = pod(f"{obj['kind']}/{name(obj)}", node_type, template, labels)
    listening = {"metrics": KUBERAY_METRICS_PORT}
    if node_type == "head":
        listening.update({n: int(params.get(param, port)) for n, param, port in HEAD_PORTS})
    return replace(made, ports={**listening, **made.ports})


def pods(obj: Doc) -> Iterator[Pod]:
    """The pods an object makes, one per template (replicas look alike)."""
    kind, spec = obj["kind"], obj.get("spec", {})
    owner = f"{kind}/{name(obj)}"
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield pod(owner, "pod", spec["template"])
    elif kind == "CronJob":
        yield pod(owner, "pod", spec["jobTemplate"]["spec"]["template"])
    elif kind in ("RayService", "RayCluster", "RayJob"):
        cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
        yield ray_pod(obj, cluster["headGroupSpec"], "head", "headgroup")
        for group in cluster.get("workerGroupSpecs", []):
            yield ray_pod(obj, group, "worker", group["groupName"])
        if kind == "RayJob" and "submitterPodTemplate" in spec:
            template = spec["submitterPodTemplate"]
            labels = {
                **template.get("metadata", {}).get("labels", {}),
                "ray.io/originated-from-crd": "RayJob",
                "app.kubernetes.io/created-by": "kuberay-operator",
            }
            yield pod(owner, "submitter", template, labels)


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector matches these labels; an empty selector matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        value, values = labels.get(e["key"]), e.get("values", [])
        matched = {
            "In": value in values,
            "NotIn": value not in values,
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }[e["operator"]]
        if not matched:
            return False
    return True


def namespace_labels(namespace: str) -> dict[str, str]:
    """The label Kubernetes puts on every namespace."""
    return {"kubernetes.io/metadata.name": namespace}


def _peer_matches(peer: Doc, source: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # pod-to-pod traffic is matched by labels here, not by address
    namespaces, pod_selector = peer.get("namespaceSelector"), peer.get("podSelector")
    if namespaces is None:
        in_namespace = source.namespace == NAMESPACE  # the policy's own namespace
    else:
        in_namespace = selects(namespaces, namespace_labels(source.namespace))
    return in_namespace and (pod_selector is None or selects(pod_selector, source.labels))


def _port_matches(spec: Doc, target: Pod, port: int) -> bool:
    if spec.get("protocol", "TCP") != "TCP":
        return False
    wanted = spec.get("port")
    if wanted is None:
        return True
    # A named port is the target's container port of that name.
    number: int | None = target.ports.get(wanted) if isinstance(wanted, str) else wanted
    if number is None:
        return False
    return int(number) <= port <= int(spec.get("endPort", number))


def admits(policies: list[Doc], source: Pod, target: Pod, port: int) -> bool:
    """Whether the NetworkPolicies of the namespace let `source` open a TCP connection to `port`
    of `target`: allowed while no policy selects the target for ingress, else only when a rule of
    one of those that do admits the source and the port."""
    isolating = [
        p
        for p in policies
        if target.namespace == NAMESPACE
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], target.labels)
    ]
    if not isolating:
        return True
    return any(
        (not rule.get("from") or any(_peer_matches(peer, source) for peer in rule["from"]))
        and (not rule.get("ports") or any(_port_matches(s, target, port) for s in rule["ports"]))
        for policy in isolating
        for rule in policy["spec"].get("ingress", [])
    )


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?")
_FACTORS = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (`500m`, `8`, `48Gi`) as a number."""
    match = _QUANTITY.fullmatch(str(value))
    if match is None:
        raise ValueError(f"not a resource quantity: {value!r}")
    return float(match.group(1)) * _FACTORS[match.group(2)]
