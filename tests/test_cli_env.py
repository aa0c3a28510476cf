"""`rewire-jax --version` and `rewire-jax env`; the version has one source of truth."""
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jax

import rewire_jax
from rewire_jax import cli

ROOT = Path(__file__).resolve().parents[1]


def test_version_has_one_source_and_a_changelog_entry(capsys):
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rewire_jax.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", rewire_jax.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {rewire_jax.__version__}" in changelog, "CHANGELOG.md has no section for this version"
    try:
        cli.main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"rewire-jax {rewire_jax.__version__}"


def test_env_json_reports_this_process(capsys):
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rewire_jax"] == rewire_jax.__version__
    assert info["python"] == sys.version.split()[0]
    assert info["packages"]["jax"] == jax.__version__ and info["packages"]["flax"]
    assert info["backend"] == jax.default_backend()
    assert info["devices"] == [str(d) for d in jax.devices()]
    assert info["compile_cache"] == (jax.config.jax_compilation_cache_dir or None)
    from rewire_jax import compile_cache
    assert info["cli_compile_cache"] == str(os.environ.get("REWIRE_JAX_COMPILE_CACHE") or compile_cache.default_dir())


def test_env_text_names_the_compile_cache(tmp_path):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla-cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "rewire_jax.cli", "env"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in r.stdout.splitlines())
    assert lines["rewire-jax"] == rewire_jax.__version__
    assert lines["jax"] == jax.__version__ and lines["backend"] == jax.default_backend()
    assert lines["compile cache"] == str(tmp_path / "xla-cache")
