"""Dockerfile.cuda cannot be built here (no Docker, no GPU): check it statically.

Every path it COPYs exists and is not excluded from the build context; every command it runs is
installed earlier in the same stage (or is part of the base image); the command it starts and its
health check use things this repository defines.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.cuda"
# Present in every Ubuntu-based CUDA image.
BASE_IMAGE_COMMANDS = {"apt-get", "rm", "mkdir", "chown", "useradd", "true"}


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(path: Path) -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)
            stages.append(Stage(match.group(1) if match else str(len(stages))))
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or rel.startswith(p + "/") for p in patterns)


def test_is_multi_stage_with_a_runtime_that_copies_the_build(stages):
    assert [s.name for s in stages] == ["build", "runtime"]
    copies = [rest for kw, rest in stages[1].instructions if kw == "COPY" and rest.startswith("--from=")]
    assert copies == ["--from=build /opt/venv /opt/venv"]


def test_every_copied_path_exists_and_is_in_the_build_context(stages):
    patterns = dockerignore_patterns()
    sources = []
    for stage in stages:
        for keyword, rest in stage.instructions:
            if keyword in ("COPY", "ADD") and not rest.startswith("--from="):
                *srcs, _dest = shlex.split(rest)
                sources += srcs
    assert sources, "no COPY found"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
        assert not ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    # What the image needs at run time is really there.
    assert (ROOT / "skyreels_local" / "profiles" / "24gb.toml").is_file()  # package data, in the wheel
    assert (ROOT / "scripts" / "gpu_check.py").is_file()


def test_build_context_leaves_out_weights_and_environments():
    patterns = dockerignore_patterns()
    for heavy in ("weights", "data", ".venv", ".git"):
        assert ignored(heavy, patterns), heavy


def run_commands(stage: Stage) -> list[list[str]]:
    """The commands of the stage's RUN lines, split at && / || / ; / |."""
    commands = []
    for keyword, rest in stage.instructions:
        if keyword == "RUN":
            for part in re.split(r"&&|\|\||;|\|", rest):
                words = shlex.split(part)
                if words:
                    commands.append(words)
    return commands


def apt_installed(stage: Stage) -> set[str]:
    packages: set[str] = set()
    for words in run_commands(stage):
        if words[:2] == ["apt-get", "install"]:
            packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


def test_every_command_run_is_installed_first(stages):
    for stage in stages:
        available = set(BASE_IMAGE_COMMANDS)
        packages = apt_installed(stage)
        if "python3" in packages:
            available.add("python3")
        for words in run_commands(stage):
            command = words[0]
            assert command in available, (
                f"stage {stage.name}: `{' '.join(words)}` runs {command!r} before it exists"
            )
            if words[:4] == ["python3", "-m", "venv", "/opt/venv"]:
                assert "python3-venv" in packages, "python3 -m venv needs python3-venv on Ubuntu"
                available.add("pip")  # /opt/venv/bin is on PATH from the next ENV on
        env = " ".join(rest for kw, rest in stage.instructions if kw == "ENV")
        if "pip" in available:
            assert "PATH=/opt/venv/bin:$PATH" in env


def test_torch_is_installed_from_the_cuda_index_before_the_package(stages):
    runs = [words for words in run_commands(stages[0]) if words[:2] == ["pip", "install"]]
    assert runs[0][2:4] == ["--index-url", "${TORCH_INDEX_URL}"] and runs[0][4] == "torch==${TORCH_VERSION}"
    assert runs[1][2] == ".[cluster]"  # the image also runs `worker --broker` (compose.cluster.yaml)


def exec_form(stage: Stage, keyword: str) -> list[str]:
    [rest] = [rest for kw, rest in stage.instructions if kw == keyword]
    return json.loads(rest)


def test_runs_as_non_root_under_an_init_process(stages):
    runtime = stages[1]
    users = [rest for kw, rest in runtime.instructions if kw == "USER"]
    assert users == ["skyreels"]
    assert any(words[:1] == ["useradd"] and "skyreels" in words for words in run_commands(runtime))
    entrypoint = exec_form(runtime, "ENTRYPOINT")
    assert entrypoint[:2] == ["tini", "--"] and "tini" in apt_installed(runtime)


def test_the_started_command_is_this_package(stages):
    runtime = stages[1]
    entrypoint, cmd = exec_form(runtime, "ENTRYPOINT"), exec_form(runtime, "CMD")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[2] in scripts
    from skyreels_local.cli import build_parser

    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    if cmd[0] not in subcommands:
        pytest.skip(f"`{cmd[0]}` subcommand is not on this branch (it comes with the server)")
    parser.parse_args(cmd)  # exits (fails the test) if the default command does not parse


def test_environment_names_are_settings(stages):
    from skyreels_local.config import Settings

    env = " ".join(rest for kw, rest in stages[1].instructions if kw == "ENV")
    names = re.findall(r"SKYREELS_([A-Z_]+)=", env)
    assert {"MODEL", "DATA_DIR", "HOST", "PORT"} <= set(names)
    for name in names:
        assert name.lower() in Settings.model_fields, f"SKYREELS_{name} is not a Settings field"
    assert "VOLUME" in {kw for kw, _ in stages[1].instructions}
    volumes = json.loads(next(rest for kw, rest in stages[1].instructions if kw == "VOLUME"))
    assert "/weights" in volumes and "SKYREELS_MODEL=/weights" in env


def test_healthcheck_polls_readiness(stages):
    [rest] = [rest for kw, rest in stages[1].instructions if kw == "HEALTHCHECK"]
    assert "--start-period=" in rest
    command = json.loads(rest[rest.index("CMD") + 3 :].strip())
    assert command[:2] == ["python3", "-c"]
    compile(command[2], "<healthcheck>", "exec")  # valid Python
    assert "/ready" in command[2] and "SKYREELS_PORT" in command[2]


def test_readme_shows_the_docker_run_line():
    readme = (ROOT / "README.md").read_text()
    assert "docker build -f Dockerfile.cuda" in readme
    assert re.search(r"docker run --gpus all .*-v .*:/weights", readme)
