"""What ships for deployment, checked offline: the Kubernetes manifests against the Kubernetes
schemas and against the sidecar's own config (the one they mount), docker-compose.yml's files, and
the Dockerfile's install step, command and health check run outside Docker (no engine here)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.support.servers import ROOT, free_port, spawn

KUBE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def of_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def sidecar_container() -> dict[str, Any]:
    pod = of_kind("Deployment", "model-api")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "authproxy"]
    return container


def mounted_config() -> str:
    return str(of_kind("ConfigMap")["data"]["config.toml"])


def check_config(
    config: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


# --- Kubernetes --------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]
    present = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(present)


def test_the_config_the_deployment_mounts_passes_check_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(mounted_config())
    keys = tmp_path / "keys.toml"
    keys.write_text(of_kind("Secret")["stringData"]["keys.toml"])
    done = check_config(config, {"AUTHPROXY__AUTH__API_KEYS__KEYS_FILE": str(keys)})
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr


def test_the_deployment_mounts_what_the_config_names() -> None:
    settings = tomllib.loads(mounted_config())
    container = sidecar_container()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path in mounts and mounts[config_path]["subPath"] == "config.toml"
    keys_file = Path(settings["auth"]["api_keys"]["keys_file"])
    assert str(keys_file.parent) in mounts  # the Secret's directory (so updates reach it)
    pod = of_kind("Deployment", "model-api")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes[mounts[str(keys_file.parent)]["name"]]["secret"]["secretName"]
        == (of_kind("Secret")["metadata"]["name"])
    )
    assert keys_file.name in of_kind("Secret")["stringData"]


def test_shutdown_fits_in_the_grace_period() -> None:
    settings = tomllib.loads(mounted_config())
    server, websocket = settings["server"], settings.get("websocket", {})
    needed = (
        server.get("shutdown_delay_s", 0)
        + server.get("graceful_shutdown_s", 30)
        + websocket.get("drain_s", 5)
    )
    grace = of_kind("Deployment", "model-api")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert server.get("shutdown_delay_s", 0) > 0  # endpoints get time to catch up
    assert needed < grace, (needed, grace)


def test_traffic_enters_through_the_public_port_only() -> None:
    settings = tomllib.loads(mounted_config())
    container = sidecar_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings["server"]["listen"].endswith(f":{ports['http']}")
    assert settings["admin"]["listen"] == f"0.0.0.0:{ports['admin']}"  # probes reach it in a pod
    # The Service routes to the public port alone; the probes use the admin one.
    service_ports = of_kind("Service", "model-api")["spec"]["ports"]
    assert [p["targetPort"] for p in service_ports] == ["http"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "admin"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The app behind it listens on the pod's loopback, where only the sidecar reaches it.
    pod = of_kind("Deployment", "model-api")["spec"]["template"]["spec"]
    (app,) = [c for c in pod["containers"] if c["name"] != "authproxy"]
    assert "127.0.0.1" in app["args"] and "ports" not in app
    assert settings["upstream"]["url"].startswith("http://127.0.0.1:")


def test_a_disruption_budget_covers_the_deployment() -> None:
    pdb = of_kind("PodDisruptionBudget")
    labels = of_kind("Deployment", "model-api")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- containers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["container.toml", "compose.toml"])
def test_the_shipped_container_configs_pass_check_config(name: str) -> None:
    done = check_config(ROOT / "deploy" / name)
    assert done.returncode == 0, done.stderr


def test_compose_uses_files_that_exist() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        build = service["build"]
        dockerfile = (
            ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
            if isinstance(build, dict)
            else ROOT / build / "Dockerfile"
        )
        assert dockerfile.is_file(), (name, dockerfile)
        for volume in service.get("volumes", []):
            assert (ROOT / volume.split(":")[0]).is_file(), (name, volume)
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert not any(p.endswith(":9000") or p.endswith(":8001") for p in published), published


def dockerfile_stages() -> list[dict[str, Any]]:
    """The Dockerfile's stages in order, each with its FROM, name, WORKDIR, COPY, RUN, ENV, CMD
    and HEALTHCHECK."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: list[dict[str, Any]] = []
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            stages.append({"FROM": image, "name": name, "COPY": [], "RUN": [], "ENV": {}})
        elif word == "COPY":
            stages[-1]["COPY"].append(rest.split())
        elif word == "RUN":
            stages[-1]["RUN"].append(rest)
        elif word == "ENV":
            stages[-1]["ENV"].update(dict(re.findall(r"(\w+)=(\S+)", rest)))
        elif word in ("CMD", "HEALTHCHECK", "WORKDIR"):
            stages[-1][word] = rest
    return stages


def test_the_image_holds_the_sidecar_alone() -> None:
    stages = dockerfile_stages()
    image = stages[-1]
    copied = {source for stage in stages for *sources, _ in stage["COPY"] for source in sources}
    assert "upstream_demo" not in " ".join(copied)  # no demo IdP with hard-coded users
    for stage in stages:
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", stage["FROM"])  # a pinned base
        assert "-c constraints.txt" in " ".join(r for r in stage["RUN"] if "pip " in r)
    # The compiler and the sources stay in the build stage: the image gets the wheel alone.
    assert not any("apt-get" in r for r in image["RUN"])
    assert [c for c in image["COPY"] if c[-1] == "./proxy"] == []
    assert any("AUTHPROXY_MYPYC=1" in r for r in stages[0]["RUN"])


def _replay(stage: dict[str, Any], root: Path, built: dict[str, Path], venv: Path) -> Path:
    """One stage's COPY and RUN steps into `root` (the stage's file system), outside Docker.

    RUN steps run in bash from the WORKDIR with `venv` first on PATH (`pip` is the venv's);
    `apt-get` and `useradd` are left out: they need the engine (the build host has a compiler).
    Returns the WORKDIR.
    """
    workdir = root / stage["WORKDIR"].lstrip("/")
    workdir.mkdir(parents=True, exist_ok=True)
    for copy in stage["COPY"]:
        origin = ROOT
        if copy[0].startswith("--from="):
            origin = built[copy[0].removeprefix("--from=")]
            copy = copy[1:]
        *sources, target = copy
        for source in sources:
            # Docker's rules: into a directory when the target ends with "/", else onto it.
            base = root / target.lstrip("/") if target.startswith("/") else workdir / target
            destination = base / Path(source).name if target.endswith("/") else base
            destination.parent.mkdir(parents=True, exist_ok=True)
            path = origin / source.lstrip("/")
            if path.is_dir():
                shutil.copytree(
                    path, destination, ignore=shutil.ignore_patterns("__pycache__", "*.so")
                )
            else:
                shutil.copy(path, destination)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    for run in stage["RUN"]:
        parts = [p.strip() for p in run.split("&&")]
        kept = [p for p in parts if not p.startswith(("apt-get", "rm -rf /var", "useradd"))]
        script = " && ".join(p.replace("--no-cache-dir ", "") for p in kept)
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (script, done.stderr[-3000:])
    return workdir


@pytest.mark.slow
def test_the_image_install_step_command_and_health_check_work_outside_docker(
    tmp_path: Path,
) -> None:
    """The Dockerfile's stages replayed into fresh directories and fresh venvs (the build stage
    compiling the wheel, the image installing it); then its CMD serves the image's config, from
    the compiled request path, and its HEALTHCHECK says healthy, then not."""
    *builders, steps = dockerfile_stages()
    built: dict[str, Path] = {}
    for number, stage in enumerate(builders):
        root = tmp_path / f"stage{number}"
        _replay(stage, root, built, tmp_path / f"venv{number}")
        built[stage["name"]] = root
    image = tmp_path / "image"
    venv = tmp_path / "venv"
    workdir = _replay(steps, image, built, venv)
    assert not (workdir / "wheels").exists()  # the image keeps no wheel
    compiled = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import proxy.compiled as c; print(c.summary())"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert compiled.stdout.strip() == "mypyc", compiled.stderr
    config = image / steps["ENV"]["AUTHPROXY_CONFIG"].lstrip("/")
    assert config.is_file()
    port, admin = free_port(), free_port()
    env = {
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "AUTHPROXY_CONFIG": str(config),
        # What `docker run -e` would set to move the listeners; the health check must follow.
        "AUTHPROXY__SERVER__LISTEN": f"127.0.0.1:{port}",
        "AUTHPROXY__ADMIN__LISTEN": f"0.0.0.0:{admin}",
    }
    healthcheck = shlex.split(
        steps["HEALTHCHECK"].split("CMD", 1)[1].replace('", "', " ").strip('[] "')
    )
    command = shlex.split(steps["CMD"].replace('", "', " ").strip('[] "'))
    assert command[0] == "authproxy" and healthcheck[0] == "authproxy"
    cleared = {k: v for k, v in os.environ.items() if not k.startswith("AUTHPROXY")}
    sidecar = spawn(
        [str(venv / "bin" / command[0]), *command[1:]],
        tmp_path / "image.log",
        port,
        env={**cleared, **env},
    )
    try:
        probe = [str(venv / "bin" / healthcheck[0]), *healthcheck[1:]]
        healthy = subprocess.run(
            probe, env={**cleared, **env}, capture_output=True, text=True, timeout=30
        )
        assert healthy.returncode == 0, healthy.stderr + sidecar.output()
        assert httpx.get(f"http://127.0.0.1:{admin}/healthz").status_code == 200
    finally:
        assert sidecar.stop() == 0, sidecar.output()
    unhealthy = subprocess.run(
        probe, env={**cleared, **env}, capture_output=True, text=True, timeout=30
    )
    assert unhealthy.returncode == 1
    assert f"admin.listen 0.0.0.0:{admin}" in unhealthy.stderr
