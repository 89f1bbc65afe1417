"""A plain (non-editable) install works outside the checkout: package data, defaults, a whole run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_runs_from_any_folder(tmp_path):
    src, wheels = tmp_path / "src", tmp_path / "wheels"  # built from a copy: the checkout stays clean
    src.mkdir()
    for part in ("pyproject.toml", "README.md", "dimkit", "dimkit_dev"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, src / part, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (ROOT / part).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(src)], check=True, timeout=300)
    wheel = next(wheels.glob("dimkit-*.whl"))
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    site = next(fresh.glob("lib/python*/site-packages"))
    # the dependencies (torch, open_clip, ...) come from this venv; dimkit itself only from the wheel
    (site / "deps.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIMKIT_") and k != "PYTHONPATH"}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    env.pop("XDG_DATA_HOME", None), env.pop("XDG_CACHE_HOME", None)
    py = str(fresh / "bin" / "python")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([py, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)

    probe = run("-c", "import dimkit, dimkit.paths as p, dimkit.tables as t; "
                      "print(dimkit.__file__); print(p.REPO_ROOT); print(p.data_dir()); print(p.cache_dir()); "
                      "print(p.runs_dir()); print(p.sample_source_dir().is_dir(), p.sample_clip_dir().is_dir(), "
                      "t.load_reference().shape[0] > 0)")
    assert probe.returncode == 0, probe.stderr
    file, repo, data, cache, runs, found = probe.stdout.splitlines()
    assert file.startswith(str(site)) and repo == "None"
    assert data == str(home / ".local/share/dimkit/data") and cache == str(home / ".cache/dimkit")
    assert runs == str(work / "runs") and found == "True True True"

    info = run("-m", "dimkit.cli", "info", "sample")
    assert info.returncode == 0 and "mentions_train: 420" in info.stdout, info.stderr
    train = run("-m", "dimkit.cli", "train", "sample+", "--epochs", "1")
    assert train.returncode == 0, train.stderr[-2000:]
    assert list((work / "runs").glob("sample+-paper-full-*/metrics.json"))
    notebooks = run("-m", "dimkit.cli", "notebooks")
    assert notebooks.returncode == 2 and "live in the dimkit repository" in notebooks.stderr


def _imports(path: Path, modules: set[str]) -> set[str]:
    """dimkit modules a module imports, at the top or inside a function."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dimkit"):
            parts = node.module.split(".")
            out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
    return (out & modules) - {path.stem}


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    """The modules form layers: no import cycle, even through an import inside a function."""
    files = {p.stem: p for p in (ROOT / "dimkit").glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(p, set(files)) for m, p in files.items()}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", "import cycle: " + " -> ".join(path[path.index(n):] + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert "prepare" not in graph["datasets"] and "train" not in graph["tables"]
