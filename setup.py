"""The JupyterLab panel in the wheel: built from labextension/ when it is not built yet (a clean clone) or older
than its sources, so that `pip install .`, `pip wheel .`, `python -m build` and the sdist give users the panel
without node on their side.

Building it needs node and npm here (and the npm registry); without them the wheel is built without the panel,
and says so: the broker and worker images, which need no panel, build this way.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILT = os.path.join("burla_jupyter", "labextension")


def up_to_date(source):
    """The built panel is there and newer than every file it is built from (the sdist carries both)."""
    built = os.path.join(HERE, BUILT, "package.json")
    if not os.path.exists(built):
        return False
    inputs = [os.path.join(source, "package.json"), os.path.join(source, "package-lock.json"),
              *glob.glob(os.path.join(source, "src", "**", "*"), recursive=True),
              *glob.glob(os.path.join(source, "style", "**", "*"), recursive=True)]
    newest = max((os.path.getmtime(p) for p in inputs if os.path.isfile(p)), default=0.0)
    return newest <= os.path.getmtime(built)


def build_panel():
    source = os.path.join(HERE, "labextension")
    if up_to_date(source):
        return True
    if not os.path.exists(os.path.join(source, "package.json")) or not shutil.which("npm"):
        return os.path.exists(os.path.join(HERE, BUILT, "package.json"))  # (older than its sources: still a panel)
    run = dict(cwd=source, check=True, stdout=sys.stderr)
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], **run)
    subprocess.run(["npm", "run", "build:lib"], **run)
    # jupyter-builder is a build requirement (pyproject.toml): run it with this interpreter, wherever its script is
    subprocess.run([sys.executable, "-c", "import sys; from jupyter_builder.main import main; "
                    "sys.argv = ['jupyter-builder', 'build', '.']; sys.exit(main())"], **run)
    return os.path.exists(os.path.join(HERE, BUILT, "package.json"))


data_files = [("etc/jupyter/jupyter_server_config.d", ["jupyter-config/server/burla_jupyter.json"])]
try:
    built = build_panel()
except (OSError, subprocess.CalledProcessError) as e:
    print(f"burla: the JupyterLab panel could not be built ({e})", file=sys.stderr)
    built = False
if built:
    data_files += [("share/jupyter/labextensions/burla-labextension", [f"{BUILT}/package.json"]),
                   ("share/jupyter/labextensions/burla-labextension/static",
                    sorted(glob.glob(f"{BUILT}/static/*")))]
else:
    print("burla: building without the JupyterLab panel (it needs node and npm: see the README)", file=sys.stderr)

setup(data_files=data_files)
