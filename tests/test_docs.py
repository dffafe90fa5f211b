"""The face of the project: the docs site builds strictly and offline, and its CLI reference comes from the app."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_site(out: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True)


def test_site_builds_strictly_offline_with_the_cli_reference(tmp_path):
    done = build_site(tmp_path / "site")
    assert done.returncode == 0, done.stderr
    reference = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    for command in ("sdit encode", "sdit teacher-label", "sdit train", "sdit bench distill"):
        assert command in reference
    html = "".join(p.read_text() for p in (tmp_path / "site").rglob("*.html"))
    assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html  # nothing fetched to read it
