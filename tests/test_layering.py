"""The folders' arrows only go down (ARCHITECTURE.md): read every module's imports (without
running them) and check that no folder imports one it must not know about."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "skyreels_local"

# folder (or top-level module) -> the skyreels_local folders it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # The HTTP process: torch lives in engine/worker/bench, and the server never imports them.
    "server": ("engine", "worker", "bench"),
    # Generation only: no HTTP, no job table, no worker loop.
    "engine": ("server", "jobs", "worker", "cli"),
    # Shared below both processes.
    "jobs": ("server", "worker", "engine", "bench", "cli", "media"),
    "media": ("server", "worker", "engine", "bench", "cli"),
    "params": ("server", "worker", "engine", "bench", "cli", "jobs", "media"),
    "config": ("server", "worker", "engine", "bench", "cli", "jobs", "media"),
    "weights": ("server", "worker", "jobs", "cli"),
    "worker": ("server", "cli"),
    # The NSFW checker runs in the worker (and `generate`), which record its verdicts and counts
    # in the job table: it knows neither of them, nor the HTTP process, nor the video model.
    "safety": ("server", "worker", "cli", "jobs", "engine", "bench"),
    # Several machines: the dispatcher (in the HTTP process) and the remote worker (GPU side).
    "cluster": ("server", "cli", "bench"),
}
# Third-party packages the HTTP process must not import at module level either.
HEAVY = ("torch", "diffusers", "transformers", "accelerate")
# Outside server/, what the HTTP process imports at module level too: held to the same rule.
HTTP_SIDE = (
    "safety/__init__.py",
    "safety/policy.py",
    "cluster/__init__.py",
    "cluster/protocol.py",
    "cluster/celery_app.py",
    "cluster/dispatcher.py",
)


def skyreels_imports(path: Path) -> list[tuple[str, int]]:
    """Absolute names of the skyreels_local modules that `path` imports, with the line."""
    module = ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found += [(name, node.lineno)]
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def area_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "skyreels_local" and len(parts) > 1 else None


def modules_in(area: str) -> list[Path]:
    folder = PACKAGE_DIR / area
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE_DIR / f"{area}.py"]


@pytest.mark.parametrize("area", sorted(FORBIDDEN))
def test_no_folder_imports_one_above_it(area: str) -> None:
    bad = [
        f"{path.relative_to(PACKAGE_DIR)}:{line} imports {name}"
        for path in modules_in(area)
        for name, line in skyreels_imports(path)
        if area_of(name) in FORBIDDEN[area]
    ]
    assert not bad, "\n".join(bad)


def test_the_server_imports_no_heavy_package_at_module_level() -> None:
    bad = []
    for path in [*modules_in("server"), *(PACKAGE_DIR / name for name in HTTP_SIDE)]:
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{path.relative_to(PACKAGE_DIR)}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert not bad, "\n".join(bad)


def test_the_server_reads_only_the_torch_free_safety_policy() -> None:
    """safety/checker.py imports torch; the HTTP process needs only the settings and folder checks."""
    bad = [
        f"{path.relative_to(PACKAGE_DIR)}:{line} imports {name}"
        for path in modules_in("server")
        for name, line in skyreels_imports(path)
        if area_of(name) == "safety"
        and name != "skyreels_local.safety"  # `from ..safety import policy` lists the package too
        and not (name + ".").startswith("skyreels_local.safety.policy.")
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself can fail: a server module importing the engine is caught."""
    fake = tmp_path / "skyreels_local" / "server"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..engine.loader import load_engine\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE_DIR", tmp_path / "skyreels_local")
    with pytest.raises(AssertionError, match="imports skyreels_local.engine.loader"):
        test_no_folder_imports_one_above_it("server")


def test_the_http_side_of_the_cluster_never_imports_the_gpu_side() -> None:
    """`serve --broker` imports the dispatcher and what it uses (protocol, celery_app); only
    cluster/remote_worker.py (the `worker` command) may reach the worker and the engine."""
    gpu_side = ("engine", "worker", "bench")
    bad = [
        f"{name_}:{line} imports {name}"
        for name_ in HTTP_SIDE
        if name_.startswith("cluster/")
        for name, line in skyreels_imports(PACKAGE_DIR / name_)
        if area_of(name) in gpu_side or name.startswith("skyreels_local.cluster.remote_worker")
    ]
    assert not bad, "\n".join(bad)
