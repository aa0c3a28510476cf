"""The documentation: `mkdocs build --strict` passes (no broken link, no missing reference), the API
reference lists the public API with its docstrings, and the README stays a short first page whose
example uses only names that exist."""
import ast
import dataclasses
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import rewire_jax

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # cwd = tmp_path: mkdocs-jupyter keeps its conversion cache in ./.cache
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(site)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "WARNING" not in r.stderr, r.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", api)).split())
    for ident, doc in [("rewire_jax.load", rewire_jax.load), ("rewire_jax.Model", rewire_jax.Model),
                       ("rewire_jax.generation.generate.generate", rewire_jax.generate),
                       ("rewire_jax.generate_queue", rewire_jax.generate_queue),
                       ("rewire_jax.rewirer", rewire_jax.rewirer), ("rewire_jax.Rewirer.step", rewire_jax.Rewirer.step),
                       ("rewire_jax.RewireOptions", rewire_jax.RewireOptions), ("rewire_jax.forward", rewire_jax.forward),
                       ("rewire_jax.zero_deltas", rewire_jax.zero_deltas), ("rewire_jax.Sampling", rewire_jax.Sampling)]:
        assert f'id="{ident}"' in api, f"API reference has no entry {ident}"
        first = " ".join(doc.__doc__.replace("`", "").split()[:4])   # the docstring's opening words
        assert first in text, f"{ident}: {first!r} not on the API page"
    for f in dataclasses.fields(rewire_jax.RewireOptions):   # every option documented
        assert f">{f.name}<" in api or f"<code>{f.name}</code>" in api, f.name
    quick = (site / "notebooks" / "01_quickstart" / "index.html").read_text()
    assert "jp-OutputArea" in quick or "output_area" in quick, "notebook rendered without its outputs"


def test_readme_is_short_and_keeps_the_ci_lines():
    lines = README.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; reference material goes under docs/"
    i = lines.index("<!-- test-command -->")
    cmd = next(line for line in lines[i + 1:] if not line.startswith("```"))
    assert cmd.startswith("bash scripts/setup.sh --test && .venv/bin/python -m pytest")
    assert '.venv/bin/rewire-jax generate --prompt "def fibonacci(n):" --compare' in README
    for target in re.findall(r"\]\((docs/[^)#]+)", README):   # links into the docs exist
        assert (ROOT / target).exists(), target


def test_readme_example_uses_the_public_api():
    """The README's Python example (run by hand: it compiles for minutes on a 2-core CPU) parses and
    every `rewire_jax.X` / `RewireOptions(...)` keyword it uses exists."""
    code = re.search(r"<!-- example -->\s*```python\n(.*?)```", README, re.S).group(1)
    tree = ast.parse(code)
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name) and n.value.id == "rewire_jax"}
    assert names and all(hasattr(rewire_jax, n) for n in names), names
    fields = {f.name for f in dataclasses.fields(rewire_jax.RewireOptions)}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "RewireOptions":
            assert {k.arg for k in call.keywords} <= fields
