"""The build's promises: setup.py stops at once, saying what to install, when
torch is missing; the installed metadata never admits an unbounded torch."""

import importlib.metadata
import os
import re
import subprocess
import venv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_without_torch_says_what_to_install(tmp_path):
    env_dir = tmp_path / "no-torch"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    proc = subprocess.run([str(python), "setup.py", "build_ext"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode != 0
    assert "pip install torch" in proc.stderr and "--no-build-isolation" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_torch_requirement_is_bounded_above():
    reqs = importlib.metadata.requires("pypeft") or []
    torch_reqs = [r for r in reqs if re.match(r"torch\b", r) and "extra ==" not in r]
    assert torch_reqs, reqs
    for r in torch_reqs:
        assert re.search(r"<|==", r), f"unbounded torch requirement: {r}"
