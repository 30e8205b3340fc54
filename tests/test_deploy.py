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


def dockerfile_steps() -> dict[str, Any]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    steps: dict[str, Any] = {"COPY": [], "RUN": [], "ENV": {}}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "COPY":
            steps["COPY"].append(rest.split())
        elif word == "RUN":
            steps["RUN"].append(rest)
        elif word == "ENV":
            steps["ENV"].update(dict(re.findall(r"(\w+)=(\S+)", rest)))
        elif word in ("CMD", "HEALTHCHECK", "FROM"):
            steps[word] = rest
    return steps


def test_the_image_holds_the_sidecar_alone() -> None:
    steps = dockerfile_steps()
    copied = {source for *sources, _ in steps["COPY"] for source in sources}
    assert "upstream_demo" not in " ".join(copied)  # no demo IdP with hard-coded users
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", steps["FROM"])  # a pinned base
    assert "-c constraints.txt" in " ".join(steps["RUN"])


@pytest.mark.slow
def test_the_image_install_step_command_and_health_check_work_outside_docker(
    tmp_path: Path,
) -> None:
    """The Dockerfile's COPY and `pip install` steps, replayed into a fresh directory and a fresh
    venv; then its CMD serves the image's config and its HEALTHCHECK says healthy, then not."""
    steps = dockerfile_steps()
    image = tmp_path / "image"
    workdir = image / "opt" / "authproxy"
    workdir.mkdir(parents=True)
    for *sources, target in steps["COPY"]:
        for source in sources:
            # Docker's rules: into a directory when the target ends with "/", else onto it.
            base = image / target.lstrip("/") if target.startswith("/") else workdir / target
            destination = base / Path(source).name if target.endswith("/") else base
            destination.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(
                    ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy(ROOT / source, destination)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (pip_step,) = [r for r in steps["RUN"] if r.startswith("pip install")]
    pip_command = shlex.split(pip_step.split("&&")[0])
    pip_command = [
        str(venv / "bin" / "pip"),
        *[a for a in pip_command[1:] if a != "--no-cache-dir"],
    ]
    installed = subprocess.run(
        pip_command, cwd=workdir, capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
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
