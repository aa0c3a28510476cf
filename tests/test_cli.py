"""`rewire-jax generate` end to end on a tiny model (in-process and as a subprocess)."""
import json
import os
import subprocess
import sys

import numpy as np

import hf_models
import rewire_jax
from rewire_jax import cli


def test_generate_json_matches_library(hf_dirs, tmp_path, capsys):
    _, d = hf_dirs("olmoe")
    prompt = hf_models.prompt(10)
    out = tmp_path / "o.json"
    rc = cli.main(["generate", "--model", str(d), "--prompt-ids", ",".join(map(str, prompt)),
                   "--max-new-tokens", "12", "--interval", "5", "--selection", "hard", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"tokens", "text", "deltas", "moe_layers", "phases", "timing"}
    assert res["text"] is None and res["moe_layers"] == [0, 1, 2]
    assert len(res["phases"]) == 3 and {"context_len", "loss_before", "loss_after", "scores", "weights"} <= set(res["phases"][0])
    lib = rewire_jax.generate(rewire_jax.load(d), [prompt], 12,
                              rewire=rewire_jax.RewireOptions(interval=5, selection="hard"))
    assert res["tokens"] == lib.tokens[0]
    np.testing.assert_allclose(np.array(res["deltas"]), lib.deltas[0], atol=1e-6)
    assert "phase 0" in capsys.readouterr().err


def test_compare_runs_equal_each_run_alone(hf_dirs, tmp_path):
    """--compare runs the baseline on a second thread beside the rewired run (sharing compiled
    programs only): each equals the library's run of it alone."""
    _, d = hf_dirs("olmoe")
    prompt = hf_models.prompt(10)
    out = tmp_path / "c.json"
    assert cli.main(["generate", "--model", str(d), "--prompt-ids", ",".join(map(str, prompt)), "--compare",
                     "--max-new-tokens", "12", "--interval", "5", "--selection", "hard", "--json", str(out),
                     "--quiet"]) == 0
    res = json.loads(out.read_text())
    model = rewire_jax.load(d)
    lib = rewire_jax.generate(model, [prompt], 12, rewire=rewire_jax.RewireOptions(interval=5, selection="hard"))
    base = rewire_jax.generate(model, [prompt], 12)
    assert res["tokens"] == lib.tokens[0] and res["baseline"]["tokens"] == base.tokens[0]
    assert res["tokens"] != res["baseline"]["tokens"] or np.any(np.array(res["deltas"]) != 0)
    np.testing.assert_allclose(np.array(res["deltas"]), lib.deltas[0], atol=1e-6)
    assert len(res["phases"]) == 3 and res["summary"]["generated_tokens"] == 12


def test_baseline_flag_means_no_optimisation(hf_dirs, tmp_path):
    _, d = hf_dirs("olmoe")
    out = tmp_path / "b.json"
    assert cli.main(["generate", "--model", str(d), "--prompt-ids", "5,6,7", "--max-new-tokens", "6",
                     "--baseline", "--json", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["phases"] == [] and np.all(np.array(res["deltas"]) == 0)


def test_cli_errors_are_clear(hf_dirs, tmp_path):
    _, d = hf_dirs("olmoe")
    run = lambda *a: subprocess.run([sys.executable, "-m", "rewire_jax.cli", "generate", *a],
                                    capture_output=True, text=True)
    r = run("--model", str(d), "--prompt", "hello")
    assert r.returncode == 2 and "no tokenizer" in r.stderr
    r = run("--model", str(d), "--prompt-ids", "1,x")
    assert r.returncode == 2 and "comma-separated integers" in r.stderr
    r = run("--model", str(tmp_path / "missing"), "--prompt-ids", "1")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run("--model", str(d), "--prompt-ids", "1", "--selection", "bogus")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    (tmp_path / "a_file").write_text("")
    r = run("--model", str(d), "--prompt-ids", "1", "--compile-cache", str(tmp_path / "a_file"))
    assert r.returncode == 2 and "--compile-cache" in r.stderr and "not a usable directory" in r.stderr


def test_no_compile_cache_writes_nothing(hf_dirs, tmp_path):
    """The compile cache is on by default (test_main_job); --no-compile-cache keeps nothing."""
    _, d = hf_dirs("olmoe")
    env = {k: v for k, v in os.environ.items() if k not in ("REWIRE_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "home-cache")
    r = subprocess.run([sys.executable, "-m", "rewire_jax.cli", "generate", "--model", str(d), "--prompt-ids",
                        "5,6,7", "--max-new-tokens", "4", "--interval", "2", "--no-compile-cache", "--quiet"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "home-cache").exists()
