"""Rebuild the committed notebooks from their py:percent sources and execute them (outputs saved).

    .venv/bin/python notebooks/build.py [NAME.py ...]
"""
import sys
from pathlib import Path

import jupytext
import nbclient

HERE = Path(__file__).parent

for src in [HERE / a for a in sys.argv[1:]] or sorted(HERE.glob("[0-9]*.py")):
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}}).execute()
    jupytext.write(nb, src.with_suffix(".ipynb"))
    print("wrote", src.with_suffix(".ipynb"))
