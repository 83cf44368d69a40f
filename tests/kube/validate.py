"""Every object `conductor kube render` prints, loaded into the official Python `kubernetes`
client's models (API 1.34) and serialized back: a field the models do not know is dropped
by them, a wrong type raises, a missing required field raises (client-side validation), so
any difference from what conductor printed fails here.

Kinds the client has no model for (the agent-sandbox CRDs) are checked through the core
objects they embed: the Pod template's PodSpec and the PVC templates' specs.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes
from kubernetes import client

MODELS = {
    "v1/Pod": "V1Pod",
    "v1/PersistentVolumeClaim": "V1PersistentVolumeClaim",
    "v1/ServiceAccount": "V1ServiceAccount",
    "networking.k8s.io/v1/NetworkPolicy": "V1NetworkPolicy",
    "rbac.authorization.k8s.io/v1/Role": "V1Role",
    "rbac.authorization.k8s.io/v1/RoleBinding": "V1RoleBinding",
    "rbac.authorization.k8s.io/v1/ClusterRole": "V1ClusterRole",
    "rbac.authorization.k8s.io/v1/ClusterRoleBinding": "V1ClusterRoleBinding",
}
SANDBOX_KINDS = {
    "extensions.agents.x-k8s.io/v1beta1/SandboxTemplate",
    "extensions.agents.x-k8s.io/v1beta1/SandboxWarmPool",
    "extensions.agents.x-k8s.io/v1beta1/SandboxClaim",
    "agents.x-k8s.io/v1beta1/Sandbox",
}
PRESETS = ["minimal", "python-dev", "nodejs-dev", "fullstack", "python-ml", "security-tools"]

api = client.ApiClient()


def load(data, model):
    # The client's own deserializer (what it applies to API server responses).
    obj = api._ApiClient__deserialize(data, model)
    return api.sanitize_for_serialization(obj)


def diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in b:
                yield f"{path}.{k}: unknown to the model (dropped)"
            elif k not in a:
                yield f"{path}.{k}: added by the model"
            else:
                yield from diff(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: {a!r} became {b!r}"


def check(data, model, what):
    problems = list(diff(data, load(data, model)))
    if problems:
        raise SystemExit(f"{what} as {model}:\n  " + "\n  ".join(problems))


def render(binary, config, args):
    out = subprocess.run(
        [binary, "--config", str(config), "kube", "render", *args, "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def main():
    binary = sys.argv[1]
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for network in ["isolated", "proxy", "egress"]:
            for readonly in ["false", "true"]:
                config = Path(tmp) / f"{network}-{readonly}.yaml"
                config.write_text(
                    f"storage:\n  base_path: {tmp}/data\n"
                    f"isolated_workspace:\n  agent_containers:\n    network: {network}\n    readonly_rootfs: {readonly}\n"
                    "engine:\n  backend: kubernetes\n  kubernetes:\n    storage_class: fast\n"
                )
                docs = render(binary, config, ["rbac"])
                for preset in PRESETS:
                    for mode in ["pod", "agent-sandbox"]:
                        for services in [[], ["--service", "redis:7", "--service", "postgres:14"]]:
                            docs += render(binary, config, ["preset", preset, "--mode", mode, *services])
                for doc in docs:
                    key = f"{doc['apiVersion']}/{doc['kind']}"
                    what = f"{key} {doc['metadata']['name']} ({network}, readonly_rootfs {readonly})"
                    if key in MODELS:
                        check(doc, MODELS[key], what)
                    elif key in SANDBOX_KINDS:
                        spec = doc["spec"]
                        if "podTemplate" in spec:
                            check(spec["podTemplate"]["spec"], "V1PodSpec", what + " podTemplate.spec")
                            for i, t in enumerate(spec.get("volumeClaimTemplates", [])):
                                check(t["spec"], "V1PersistentVolumeClaimSpec", f"{what} volumeClaimTemplates[{i}].spec")
                    else:
                        raise SystemExit(f"{what}: a kind this check does not know")
                    counts[key] = counts.get(key, 0) + 1
    for key, n in sorted(counts.items()):
        print(f"  {n:4d} {key}")
    missing = set(MODELS) - set(counts)
    if missing:
        raise SystemExit(f"never rendered: {sorted(missing)}")
    print(f"ok: every rendered object matches the kubernetes {kubernetes.__version__} models")


if __name__ == "__main__":
    main()
