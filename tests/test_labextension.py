"""The JupyterLab panel's TypeScript logic: its jest unit tests (labextension/src/__tests__), run here so that the
README's one test command covers them. .ci/run installs the panel's npm packages first."""

import os
import shutil
import subprocess

import pytest

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "labextension")


@pytest.mark.skipif(shutil.which("npx") is None or not os.path.isdir(os.path.join(FOLDER, "node_modules")),
                    reason="needs node and `npm ci` in labextension/")
def test_panel_logic_with_jest():
    done = subprocess.run(["npx", "jest", "--ci"], cwd=FOLDER, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed" not in done.stderr.split("Tests:")[-1].split("\n")[0]
