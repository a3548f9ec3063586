"""`pytest --nbmake notebooks` (part of `make test`): every notebook in smoke mode.

Each notebook runs top to bottom in a real Jupyter kernel (nbmake, through nbclient).
This file makes that kernel the Python running pytest (``.venv``'s under ``make``) and
turns smoke mode on, unless the caller chose otherwise: ``JAXMT_NOTEBOOK_SMOKE=0 pytest
--nbmake notebooks`` runs the notebooks' full (Colab-sized) mode.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAXMT_NOTEBOOK_SMOKE", "1")
if "JAXMT_NOTEBOOK_DIR" not in os.environ:  # model directories, removed after the run
    os.environ["JAXMT_NOTEBOOK_DIR"] = tempfile.mkdtemp(prefix="jaxmt-notebooks-")
    atexit.register(shutil.rmtree, os.environ["JAXMT_NOTEBOOK_DIR"], True)
# Kernel specs are looked up in JUPYTER_PATH first: this environment's own "python3" spec
# (ipykernel's, whose "python" jupyter_client runs as sys.executable) wins over any
# user-wide one that could start another Python.
os.environ["JUPYTER_PATH"] = os.pathsep.join(
    p for p in (os.path.join(sys.prefix, "share", "jupyter"), os.environ.get("JUPYTER_PATH"))
    if p)


def pytest_sessionstart(session):
    from jupyter_client.kernelspec import KernelSpecManager

    argv = KernelSpecManager().get_kernel_spec("python3").argv
    if argv[0] not in ("python", "python3", sys.executable):
        raise RuntimeError(f"the notebooks' kernel would run {argv[0]}, not {sys.executable}")
