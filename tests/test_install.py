"""Python started at the repository root, as a user at a prompt, in a notebook or with ``python -m`` starts it,
must import what our dependencies import: transformers imports Hugging Face's ``kernels`` package, and the
Triton kernels' folder ``kernels/`` (the subpackage ``fastlora.kernels``) must not stand in for it.  And the
wheel, which every user installing from the package index gets, must carry every module its commands need."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOT_IMPORTS = "import transformers.modeling_utils, peft, fastlora, fastlora.kernels.launchers"


def _run(args, cwd, extra_env=None, stdin=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(extra_env or {})
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args} in {cwd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed("kernels"), reason="Hugging Face's kernels package is not installed")
def test_python_started_at_the_root_imports_what_transformers_imports():
    where = "import kernels, pathlib; print(pathlib.Path(kernels.__file__).resolve())"
    found = Path(_run(["-c", f"{ROOT_IMPORTS}; {where}"], cwd=REPO).strip())
    assert found.parent != (REPO / "kernels").resolve(), f"'import kernels' at the repository root found {found}"
    # the interactive prompt and a notebook put '' (the working directory) first on sys.path, as -c does
    assert "imported" in _run(["-i", "-q"], cwd=REPO, stdin=f"{ROOT_IMPORTS}\nprint('imported')\n")
    assert _run(["-m", "fastlora", "--version"], cwd=REPO).startswith("fastlora ")
    assert "--steps" in _run(["-m", "fastlora", "demo", "--help"], cwd=REPO)
    assert "--output" in _run([str(REPO / "examples" / "trainer_finetune.py"), "--help"], cwd=REPO)


def test_no_top_level_folder_is_a_package_another_distribution_provides():
    """A regular package at the root (a folder with __init__.py) wins over any installed package of the same
    name for Python started there; a folder without one loses to it.  So none of ours may be a regular package
    under a name that an installed distribution provides (today transformers' ``kernels``; tomorrow whatever a
    dependency adds)."""
    providers = importlib.metadata.packages_distributions()
    ours = {"fastlora-kernels", "fastlora_kernels"}
    clashes = {
        folder.name: sorted(set(providers[folder.name]) - ours)
        for folder in REPO.iterdir()
        if folder.is_dir() and (folder / "__init__.py").exists() and set(providers.get(folder.name, ())) - ours
    }
    assert not clashes, f"top-level folders that shadow installed packages from the repository root: {clashes}"
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must stay a folder, not a top-level package"


def test_the_wheel_carries_every_module_and_its_commands_run_outside_the_repository(tmp_path):
    # not imported here: setuptools replaces distutils on import, which fails once another module loaded it
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel needs setuptools")
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__"))
    _run(["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."],
         cwd=source)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "fastlora"
    expected = {f"fastlora/{p.relative_to(package).as_posix()}" for p in package.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert expected - names == set(), "modules the wheel lacks"
    assert {n for n in names if not n.startswith("fastlora")} == set(), "the wheel installs more than fastlora"

    # the wheel's fastlora, with this environment's dependencies, from a folder outside the repository
    site = tmp_path / "site"
    _run(["-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], cwd=tmp_path)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {"PYTHONPATH": str(site)}
    modules = sorted(".".join(p.relative_to(site).with_suffix("").parts).removesuffix(".__init__")
                     for p in (site / "fastlora").rglob("*.py") if p.stem != "__main__")
    load = (f"import importlib, fastlora; assert fastlora.__file__.startswith({str(site)!r}), fastlora.__file__; "
            f"[importlib.import_module(m) for m in {modules!r}]; print('imported')")
    assert len(modules) >= 30 and "fastlora.kernels.gemm" in modules and "fastlora.bench.cli" in modules
    assert _run(["-c", load], cwd=away, extra_env=env).strip() == "imported"
    assert _run(["-m", "fastlora", "--version"], cwd=away, extra_env=env).startswith("fastlora ")
    for command in ("demo", "bench"):
        assert "usage:" in _run(["-m", "fastlora", command, "--help"], cwd=away, extra_env=env)
