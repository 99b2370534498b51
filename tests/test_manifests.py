"""The cluster manifests in docker/ agree with the image and with the code they run.

Docker and Kubernetes are not available here, so these read the text: the KubeRay RayCluster and RayJob
manifests and the cluster launcher config parse, name the image the Dockerfile builds, run an
entrypoint module that exists with arguments its command accepts, ask for resources that agree with
their `ray start` parameters and with the job spec, and never serve a dashboard on all interfaces
without token auth.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from lvd.schemas.job_spec import parse_job_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no TOML reader in the standard library
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
KUBE_MANIFESTS = ("raycluster.yaml", "rayjob.yaml")
ALL_DOTS = "0.0.0.0"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DOCKER / name).read_text()) if d is not None]


def _kind(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def _cluster_specs() -> dict[str, dict[str, Any]]:
    """The RayCluster spec of each KubeRay manifest (the RayJob's is inline)."""
    return {
        "raycluster.yaml": _kind("raycluster.yaml", "RayCluster")["spec"],
        "rayjob.yaml": _kind("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
    }


def _groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def _quantity(value: Any) -> float:
    """A Kubernetes quantity ("8", "500m", "32Gi", "24g") as a number of units (cores or bytes)."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m, f"not a quantity: {value!r}"
    scale = {"": 1, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "g": 2**30, "T": 1e12}
    scale |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m.group(1)) * scale[m.group(2)]


def _image_tags() -> dict[str, str]:
    """The tags the Dockerfile's build commands give: {"cpu": "lvd:cpu", "gpu": "lvd:gpu"}."""
    tags = re.findall(r"-t (\S+?:(\w+)) \.", DOCKERFILE)
    return {flavour: tag for tag, flavour in tags}


def _job() -> tuple[dict[str, Any], Any]:
    """The RayJob, and the job spec it runs (from the ConfigMap its entrypoint's file is mounted from)."""
    rayjob = _kind("rayjob.yaml", "RayJob")
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    path = Path(argv[argv.index("run") + 1])
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in _ray_container({"template": {"spec": head}})["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    sources = [name for name, where in mounts.items() if path.parent == Path(where)]
    assert sources, f"no volume of the head is mounted at {path.parent}"
    config_map = volumes[sources[0]]["configMap"]["name"]
    data = next(
        d for d in _docs("rayjob.yaml") if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config_map
    )
    return rayjob, parse_job_spec(yaml.safe_load(data["data"][path.name]))


def test_manifests_parse_and_are_kuberay_objects():
    for name in KUBE_MANIFESTS:
        for doc in _docs(name):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), name
    assert _kind("raycluster.yaml", "RayCluster")["apiVersion"] == "ray.io/v1"
    assert _kind("rayjob.yaml", "RayJob")["apiVersion"] == "ray.io/v1"
    launcher = _docs("ray-cluster.yaml")[0]
    assert {
        "cluster_name",
        "docker",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    } <= launcher.keys()


def test_every_manifest_runs_the_image_the_dockerfile_builds():
    tags = _image_tags()
    assert set(tags) == {"cpu", "gpu"}, tags
    for name, spec in _cluster_specs().items():
        for group_name, group in _groups(spec):
            for container in group["template"]["spec"]["containers"]:
                assert container["image"] == tags["gpu"], (name, group_name)
    assert _docs("ray-cluster.yaml")[0]["docker"]["image"] == tags["gpu"]


def test_dockerfile_installs_the_lvd_namespace_from_the_mapped_folders():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY (\S+) \1$", DOCKERFILE, re.MULTILINE))
    assert folders <= copied, f"package folders not copied into the image: {sorted(folders - copied)}"
    assert re.search(r'pip install "\.\[\$\{EXTRA\}\]"', DOCKERFILE)
    assert "import lvd.jobs.cli" in DOCKERFILE  # the build fails if the installed namespace is broken


def test_ray_version_of_the_manifests_is_the_pinned_one():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    version = pinned.split("==")[1]
    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == version, name


def test_entrypoint_is_lvd_run_with_arguments_its_command_accepts():
    from lvd.jobs import cli

    rayjob, _ = _job()
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "lvd.jobs.cli"], argv
    assert Path(cli.__file__).resolve() == ROOT / "jobs" / "cli.py"
    group = typer.main.get_command(cli.app)
    assert "run" in group.commands
    assert argv[3] == "run"
    # Click parses the arguments as `python -m lvd.jobs.cli run ...` would: an unknown option fails here.
    group.commands["run"].make_context("run", argv[4:])


def test_job_spec_parses_and_its_actors_fit_the_gpu_group():
    rayjob, spec = _job()
    cluster = rayjob["spec"]["rayClusterSpec"]
    gpus = sum(
        g["replicas"] * int(g["rayStartParams"].get("num-gpus", 0)) for g in cluster["workerGroupSpecs"]
    )
    assert gpus > 0
    # One model replica and one search actor per GPU: fewer leaves GPUs idle, more cannot be placed.
    assert spec.embedding.num_actors == gpus
    assert spec.dedup.search_actors == gpus
    assert spec.retrieval.search_actors == gpus
    worker_cpus = min(int(g["rayStartParams"]["num-cpus"]) for g in cluster["workerGroupSpecs"])
    assert spec.embedding.cpus_per_actor < worker_cpus  # decode tasks need CPUs beside the actor
    # The driver and Spark run on the head: Spark's local threads and memory fit its pod.
    head = _ray_container(cluster["headGroupSpec"])["resources"]["limits"]
    local = re.fullmatch(r"local\[(\d+)\]", spec.spark.master)
    assert local and int(local.group(1)) <= _quantity(head["cpu"])
    assert _quantity(spec.spark.driver_memory) < _quantity(head["memory"])
    assert spec.ray.address is None  # a submitted job joins the cluster through RAY_ADDRESS


def test_group_resources_match_their_ray_start_parameters():
    for name, spec in _cluster_specs().items():
        for group_name, group in _groups(spec):
            params = group["rayStartParams"]
            resources = _ray_container(group)["resources"]
            assert resources["requests"] == resources["limits"], (name, group_name)
            limits = resources["limits"]
            gpus = int(limits.get("nvidia.com/gpu", 0))
            assert gpus == int(params.get("num-gpus", 0)), (name, group_name)
            cpus = int(params.get("num-cpus", _quantity(limits["cpu"])))
            if group_name == "head":
                assert cpus == 0  # the driver and its Spark use the head's CPUs
            else:
                assert cpus == _quantity(limits["cpu"]), (name, group_name)
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            if gpus:
                tolerated = {t["key"] for t in group["template"]["spec"].get("tolerations", [])}
                assert "nvidia.com/gpu" in tolerated, (name, group_name)


def test_the_two_kuberay_clusters_have_the_same_shape():
    specs = list(_cluster_specs().values())
    shapes = [
        [(n, g["rayStartParams"], g.get("replicas"), _ray_container(g)["resources"]) for n, g in _groups(s)]
        for s in specs
    ]
    assert shapes[0] == shapes[1]


def test_kuberay_clusters_use_token_auth_from_a_secret():
    for name, spec in _cluster_specs().items():
        auth = spec.get("authOptions", {})
        assert auth.get("mode") == "token", name
        assert auth.get("secretName"), f"{name}: the token must come from a Secret"
        for group_name, group in _groups(spec):
            ports = {
                p["containerPort"]
                for c in group["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            assert 10001 not in ports, f"{name} {group_name}: Ray Client port exposed"
            for c in group["template"]["spec"]["containers"]:
                modes = [e.get("value") for e in c.get("env", []) if e["name"] == "RAY_AUTH_MODE"]
                assert modes in ([], ["token"]), f"{name} {group_name}: auth mode {modes} overrides the token"


def _dashboard_hosts(text: str) -> list[str]:
    return re.findall(r"--dashboard-host[ =](\S+)", text)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_dashboard_on_all_interfaces_only_with_auth(name):
    spec = _cluster_specs()[name]
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", ALL_DOTS)  # KubeRay's default
    if host == ALL_DOTS:
        assert spec["authOptions"]["mode"] == "token"


def test_launcher_config_starts_every_node_with_token_auth_and_a_loopback_dashboard():
    launcher = _docs("ray-cluster.yaml")[0]
    starts = [
        c
        for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
        if "ray start" in c
    ]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", command).group(1)
        assert token_path in launcher["file_mounts"], "the token file is copied to every node"
    assert _dashboard_hosts(" ".join(launcher["head_start_ray_commands"])) == ["127.0.0.1"]
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]


def test_dockerfile_enables_token_auth_and_never_serves_an_open_dashboard():
    assert re.search(r"^ENV RAY_AUTH_MODE=token$", DOCKERFILE, re.MULTILINE)
    lines = DOCKERFILE.splitlines()
    for i, line in enumerate(lines):
        for host in _dashboard_hosts(line):
            if host == ALL_DOTS:
                # Its docker run publishes the port on the host's loopback only and passes the token.
                command = " ".join(lines[max(0, i - 2) : i + 1])
                assert "-p 127.0.0.1:8265:8265" in command, line
                assert "-e RAY_AUTH_TOKEN" in command, line
    assert _dashboard_hosts(DOCKERFILE), "the Dockerfile documents how to start a head"
    assert not re.search(r"^USER root", DOCKERFILE, re.MULTILINE)
