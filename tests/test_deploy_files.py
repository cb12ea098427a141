"""The container files: compose.yaml, docker/Dockerfile.*, docker/entrypoint.sh, .dockerignore, configs/server.yaml.

No Docker daemon runs where these tests run, so nothing is built: the files are
parsed and checked against each other and against the project (base image's
Python, lerobot's torch pin, files the builds copy, ports, grace periods), the
example configuration goes through ``policylink serve --print-config``, and the
entry point script runs for real with a stand-in ``policylink`` on ``PATH``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import POLICYLINK

ROOT = Path(__file__).resolve().parents[1]
SERVER_DOCKERFILE = ROOT / "docker" / "Dockerfile.server"
CLIENT_DOCKERFILE = ROOT / "docker" / "Dockerfile.client"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
COMPOSE = ROOT / "compose.yaml"
SERVER_CONFIG = ROOT / "configs" / "server.yaml"
DEFAULT_CONFIG = Path("/config/server.yaml")


# -- reading Dockerfiles ---------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: continuation lines joined, comments dropped (as Docker reads them)."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue  # a comment or blank line, even inside a continuation
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return result


def arguments(dockerfile: Path, keyword: str) -> list[str]:
    return [args for name, args in instructions(dockerfile) if name == keyword]


def build_args(dockerfile: Path) -> dict[str, str]:
    """``ARG NAME=default`` values, for expanding ``${NAME}``."""
    return dict(arg.split("=", 1) for arg in arguments(dockerfile, "ARG") if "=" in arg)


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def copied_sources(dockerfile: Path) -> list[str]:
    """What each ``COPY`` takes from the build context (``--from`` copies take nothing from it)."""
    sources = []
    for args in arguments(dockerfile, "COPY"):
        words = shlex.split(args)
        if any(word.startswith("--from") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources += paths[:-1]  # the last one is the destination
    return sources


def dockerignored(path: str) -> bool:
    """Whether ``.dockerignore`` keeps ``path`` out of the build context (last matching pattern wins; a directory's pattern covers its files)."""
    ignored = False
    candidates = [str(Path(*Path(path).parts[:n])) for n in range(1, len(Path(path).parts) + 1)]
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def final_user(dockerfile: Path) -> str:
    users = arguments(dockerfile, "USER")
    assert users, f"{dockerfile.name} sets no USER: the container would run as root"
    return users[-1]


# -- Dockerfiles -----------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [SERVER_DOCKERFILE, CLIENT_DOCKERFILE], ids=lambda path: path.name)
def test_dockerfiles_run_as_a_user_on_python_311_and_copy_only_what_exists(dockerfile: Path) -> None:
    user = final_user(dockerfile)
    assert user.split(":")[0] not in ("root", "0"), f"{dockerfile.name} runs as {user}"
    base = expand(arguments(dockerfile, "FROM")[-1].split()[0], build_args(dockerfile))
    assert base.startswith("python:3.11"), f"{dockerfile.name}: base {base}: lerobot 0.4.4 is run on Python 3.11 here"
    sources = copied_sources(dockerfile)
    assert sources, f"{dockerfile.name} copies nothing from the project"
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
        assert not dockerignored(source), f"{dockerfile.name} copies {source}, which .dockerignore leaves out of the build context"
    # The package build needs these (pyproject.toml names README.md as the readme).
    assert {"pyproject.toml", "README.md", "src"} <= set(sources)


def test_dockerignore_keeps_the_context_small() -> None:
    for heavy in (".venv", ".git", "tests", "models", "secrets", "out", "src/policylink/__pycache__"):
        assert dockerignored(heavy), f"{heavy} would be sent to the Docker builder"


def test_server_image_installs_the_server_extras_on_a_torch_lerobot_accepts() -> None:
    text = " ".join(arguments(SERVER_DOCKERFILE, "RUN"))
    assert re.search(r"pip install \"?/tmp/policylink\[server,grpc,jpeg\]", text), "the server image must install .[server,grpc,jpeg]"
    args = build_args(SERVER_DOCKERFILE)
    assert "/whl/cu" in args["TORCH_INDEX_URL"], "torch must come from a CUDA build of PyTorch's index"
    assert "torch==${TORCH_VERSION}" in text and "torchvision==${TORCHVISION_VERSION}" in text
    try:
        from importlib.metadata import PackageNotFoundError, requires

        from packaging.requirements import Requirement

        pins = {Requirement(line).name: Requirement(line).specifier for line in requires("lerobot") or [] if ";" not in line}
    except (ImportError, PackageNotFoundError):
        pytest.skip("lerobot (the [server] extra) is not installed here: its torch pin cannot be read")
    assert args["TORCH_VERSION"] in pins["torch"], f"torch {args['TORCH_VERSION']} is outside lerobot's pin {pins['torch']}"
    assert args["TORCHVISION_VERSION"] in pins["torchvision"], f"torchvision {args['TORCHVISION_VERSION']} is outside lerobot's pin {pins['torchvision']}"


def test_server_image_exposes_8000_checks_readiness_and_starts_through_tini_and_the_entrypoint() -> None:
    assert "8000" in " ".join(arguments(SERVER_DOCKERFILE, "EXPOSE")).split()
    (healthcheck,) = arguments(SERVER_DOCKERFILE, "HEALTHCHECK")
    assert healthcheck.endswith("CMD curl -fsS http://127.0.0.1:8000/readyz || exit 1")
    assert "curl" in " ".join(arguments(SERVER_DOCKERFILE, "RUN")), "the health check needs curl in the image"
    (entrypoint,) = arguments(SERVER_DOCKERFILE, "ENTRYPOINT")
    assert entrypoint == '["/usr/bin/tini", "--", "/usr/local/bin/policylink-entrypoint"]'
    assert any(args.endswith("docker/entrypoint.sh /usr/local/bin/policylink-entrypoint") for args in arguments(SERVER_DOCKERFILE, "COPY"))
    env = " ".join(arguments(SERVER_DOCKERFILE, "ENV"))
    assert "HF_HOME=/cache/huggingface" in env, "the Hugging Face cache belongs on the /cache volume"
    assert '"/cache"' in " ".join(arguments(SERVER_DOCKERFILE, "VOLUME"))


def test_client_image_is_the_light_install() -> None:
    text = " ".join(arguments(CLIENT_DOCKERFILE, "RUN"))
    assert re.search(r"pip install \"?/tmp/policylink\[jpeg\]\"?", text), "the client image installs the base dependencies and [jpeg] only"
    assert "torch" not in text and "server" not in text
    assert arguments(CLIENT_DOCKERFILE, "ENTRYPOINT") == ['["policylink"]']


@pytest.mark.parametrize("dockerfile", [SERVER_DOCKERFILE, CLIENT_DOCKERFILE], ids=lambda path: path.name)
def test_hadolint(dockerfile: Path) -> None:
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed")
    result = subprocess.run(["hadolint", "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the entry point script ------------------------------------------------------


def run_entrypoint(tmp_path: Path, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    """Run docker/entrypoint.sh with a stand-in ``policylink`` that prints its process id and its arguments, one a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "policylink"
    fake.write_text('#!/bin/sh\necho "pid=$$"\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    if config is not None:
        env["POLICYLINK_CONFIG"] = str(config)
    process = subprocess.Popen(["sh", str(ENTRYPOINT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=30)
    if process.returncode == 0:  # `exec`: the server would be this very process, and get SIGTERM itself
        assert stdout.splitlines()[0] == f"pid={process.pid}", "the entry point ran policylink as a child instead of exec'ing it"
        stdout = "\n".join(stdout.splitlines()[1:])
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_entrypoint_is_valid_shell() -> None:
    for shell in ("sh", "bash"):
        if shutil.which(shell):
            result = subprocess.run([shell, "-n", str(ENTRYPOINT)], capture_output=True, text=True)
            assert result.returncode == 0, f"{shell} -n: {result.stderr}"
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "--shell=sh", str(ENTRYPOINT)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_entrypoint_serves_the_mounted_config_file(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("port: 8000\n")
    assert run_entrypoint(tmp_path, config=config).stdout.splitlines() == ["serve", "--config", str(config)]
    # Flags after the image name are added (and override the file).
    result = run_entrypoint(tmp_path, "--max-batch", "4", config=config)
    assert result.stdout.splitlines() == ["serve", "--config", str(config), "--max-batch", "4"]


def test_entrypoint_serves_from_the_environment_without_a_config_file(tmp_path: Path) -> None:
    if DEFAULT_CONFIG.exists():
        pytest.skip(f"{DEFAULT_CONFIG} exists on this machine")
    assert run_entrypoint(tmp_path).stdout.splitlines() == ["serve"]
    assert run_entrypoint(tmp_path, "--policy.type", "replay").stdout.splitlines() == ["serve", "--policy.type", "replay"]


def test_entrypoint_refuses_a_config_path_that_does_not_exist(tmp_path: Path) -> None:
    """A typo in POLICYLINK_CONFIG must not start a server with default settings."""
    missing = tmp_path / "nope.yaml"
    result = run_entrypoint(tmp_path, config=missing)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"policylink-entrypoint: POLICYLINK_CONFIG={missing}: no such file"


def test_entrypoint_runs_other_commands_as_given(tmp_path: Path) -> None:
    result = run_entrypoint(tmp_path, "policylink", "status", "ws://127.0.0.1:8000")
    assert result.stdout.splitlines() == ["status", "ws://127.0.0.1:8000"]


# -- compose.yaml and the example configuration ------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and "server" in data["services"]
    return data


def seconds(duration: str | int | float) -> float:
    """A compose duration (``40s``, ``1m30s``, ``600s``) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_server_has_the_gpu_ports_volumes_and_lifecycle() -> None:
    server = compose()["services"]["server"]
    assert server["build"] == {"context": ".", "dockerfile": "docker/Dockerfile.server"}
    assert (ROOT / server["build"]["dockerfile"]).exists()
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in server["deploy"]["resources"]["reservations"]["devices"]
    assert "8000:8000" in server["ports"]
    assert "./models:/models:ro" in server["volumes"]
    assert "./configs/server.yaml:/config/server.yaml:ro" in server["volumes"]
    assert (ROOT / "configs" / "server.yaml").is_file()
    assert server["restart"] == "unless-stopped"
    assert seconds(server["stop_grace_period"]) == 40
    assert all(name.startswith("POLICYLINK_") or name.startswith("HF_") for name in server.get("environment", {}))
    # Named volumes and secrets used by the service are declared at the top level.
    data = compose()
    for volume in server["volumes"]:
        source = volume.split(":")[0]
        if not source.startswith((".", "/")):
            assert source in data.get("volumes", {}), f"volume {source} is not declared"
    for secret in server.get("secrets", []):
        assert secret in data.get("secrets", {}), f"secret {secret} is not declared"


def test_compose_healthcheck_matches_the_image() -> None:
    check = compose()["services"]["server"]["healthcheck"]
    assert check["test"] == ["CMD", "curl", "-fsS", "http://127.0.0.1:8000/readyz"]
    for key in ("interval", "timeout", "start_period"):
        assert seconds(check[key]) > 0
    assert check["retries"] >= 1


def test_example_config_is_valid_for_policylink_serve_and_fits_the_compose_setup() -> None:
    config = yaml.safe_load(SERVER_CONFIG.read_text())
    assert isinstance(config, dict)
    assert config["port"] == 8000, "the image's health check and compose.yaml's ports expect 8000"
    assert str(config["policy.path"]).startswith("/models/"), "checkpoints live on the /models volume"
    secrets = compose()["services"]["server"].get("secrets", [])
    if "api-key-file" in config:
        assert Path(config["api-key-file"]).name in secrets, "the key file must be a secret compose mounts"
    grace = seconds(compose()["services"]["server"]["stop_grace_period"])
    assert float(config.get("drain-timeout", 30)) < grace, "Docker would kill the server before it has drained"

    help_text = subprocess.run([*POLICYLINK, "serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    if "--print-config" not in help_text:
        pytest.skip("this policylink serve has no --config/--print-config")
    env = {name: value for name, value in os.environ.items() if not name.startswith("POLICYLINK_")}
    result = subprocess.run([*POLICYLINK, "serve", "--config", str(SERVER_CONFIG), "--print-config"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["policy.path"] == config["policy.path"]
    assert effective["max-batch"] == config["max-batch"]
    assert effective["model-root"] == config["model-root"]
    assert effective["api-key-file"] == config["api-key-file"]
