"""Every notebook in notebooks/ executes top to bottom on the demo model (CPU).

The slow notebooks follow papermill's convention (without papermill): ONE code cell tagged
`parameters` holds the knobs that set the notebook's size, committed at full size. The test runs
such a notebook with a cell of smaller values (`OVERRIDES`) inserted right after that cell, so every
cell still runs, on a smaller grid (fewer compiled programs).
"""
import ast
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

#: notebook -> {variable of its `parameters` cell: the value the test runs it with}
OVERRIDES = {
    # 01, 03, 06: two phases per rewired generation (on the prompt and 16 tokens later), not 3-4
    "01_quickstart.ipynb": {"max_new_tokens": 32, "interval": 16},
    "03_confidence_entropy.ipynb": {"num_docs": 4, "max_new_tokens": 32, "interval": 16},
    # one context bucket for every phase (prefix 40 and 48 both pad to 48): in the grid two phases
    # per document at m = 8, one at m = 16; Adam steps 1 and 5 (5 shared with the ablation table,
    # one phase per document there: 'hard' / 'reverse' / 'random' compile a program per split point)
    "04_sweeps.ipynb": {"PREFIX": 40, "CONT": 16, "max_docs": 2, "intervals": [8, 16], "steps": [1, 5],
                        "table_interval": 16, "table_steps": 5},
    # k = 0 and 1 (both figures' curves), one interval besides the run's, sc:2 (one pair per problem)
    "05_context_shift.ipynb": {"num_problems": 2, "K": (1,), "interval": 4, "sweep": (8,), "sc_k": 2,
                               "max_new_tokens": 8},
    "06_extend_with_flax.ipynb": {"max_new_tokens": 32, "interval": 16},
}


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4
    assert set(OVERRIDES) <= {p.name for p in NOTEBOOKS}, "OVERRIDES names a notebook that is not in notebooks/"


def _assigned(source: str) -> set:
    """Names a cell's code assigns at top level (`a = ...`, `a, b = ...`)."""
    names = set()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def with_overrides(nb, name: str) -> int:
    """Insert the cell of OVERRIDES[name] right after the notebook's one `parameters` cell, after
    checking that it will be used: that cell assigns every overridden name and no later cell
    assigns one again. -> the inserted cell's index."""
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    tagged = [i for i in code if "parameters" in nb.cells[i].metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} code cells tagged 'parameters', the test's sizes need one"
    at, values = tagged[0], OVERRIDES[name]
    missing = set(values) - _assigned(nb.cells[at].source)
    assert not missing, f"{name}: its parameters cell does not set {sorted(missing)}"
    for i in (i for i in code if i > at):
        again = set(values) & _assigned(nb.cells[i].source)
        assert not again, f"{name}: cell {i} sets {sorted(again)} again after the parameters cell"
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()),
                                     metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, cell)
    return at + 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    injected = with_overrides(nb, path.name) if path.name in OVERRIDES else None
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    if injected is not None:   # it ran, right after the parameters cell
        ran = [c.execution_count for c in nb.cells[injected - 1:injected + 1]]
        assert None not in ran and ran[1] == ran[0] + 1, ran


def test_overrides_check_catches_a_missing_parameters_cell():
    """A notebook listed in OVERRIDES without a parameters cell (or one not setting a name) fails."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("PREFIX = 128")])
    with pytest.raises(AssertionError, match="0 code cells tagged"):
        with_overrides(nb, "04_sweeps.ipynb")
    nb.cells[0].metadata["tags"] = ["parameters"]
    with pytest.raises(AssertionError, match="does not set"):
        with_overrides(nb, "04_sweeps.ipynb")
    nb.cells[0].source = "\n".join(f"{k} = 0" for k in OVERRIDES["04_sweeps.ipynb"])
    nb.cells.append(nbformat.v4.new_code_cell("max_docs = 3"))
    with pytest.raises(AssertionError, match="sets \\['max_docs'\\] again"):
        with_overrides(nb, "04_sweeps.ipynb")
    nb.cells.pop()
    assert with_overrides(nb, "04_sweeps.ipynb") == 1 and nb.cells[1].source.startswith("PREFIX = 40")
