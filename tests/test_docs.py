"""The face of the project: the docs site builds strictly and offline, and its CLI reference comes from the app."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# --- the README and the measured tables ---------------------------------------------------------------------

def load_results():
    spec = importlib.util.spec_from_file_location("docs_results", ROOT / "docs" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results = load_results()

# Wording about how the project was made, which means nothing to a user.
PROCESS = ("was lent", "not lent", "the aim", "our aim", "earlier version", "previous version", "this machine",
           "this project's machine", "project's machines", "we measured", "measured here", "not measured yet",
           "the issue", "session")
# A table cell that is a bare figure: 0.591, 1,024, 85%, 3.04x, 4.4 GB, 220.9 records/s ...
FIGURE = re.compile(r"^\**[-+]?[\d,]*\d(\.\d+)?(e[-+]?\d+)?\s*"
                    r"(%|x|×|[kMG]?B|G|s|ms|records/s|draws/s|steps/s|images/s)?\**$")


def test_readme_is_read_in_two_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_readme_links_reach_files_in_the_repository():
    targets = re.findall(r"\]\(([^)#\s]+)[^)]*\)", (ROOT / "README.md").read_text())
    assert "docs/shapes-world.md" in targets
    assert [t for t in targets if "://" not in t and not (ROOT / t).exists()] == []


def test_every_measured_table_is_what_its_json_renders():
    marked = [page for page in results.pages() if results.blocks(page.read_text())]
    assert ROOT / "README.md" in marked and len(marked) >= 3
    stale = {str(page.relative_to(ROOT)): results.stale(page) for page in marked}
    assert not any(stale.values()), f"run `make results`: {stale}"


def test_no_measured_table_is_typed_by_hand():
    for page in results.pages():
        for line in results.outside_blocks(page.read_text()).splitlines():
            if line.startswith("|") and not set(line) <= set("|-: "):
                cells = [c.strip() for c in line.strip("|").split("|")]
                assert not any(FIGURE.match(c) for c in cells), f"{page.name}: a figure typed by hand: {line}"


def test_pages_say_nothing_about_how_they_were_made():
    for page in results.pages():
        text = page.read_text().lower()
        found = [phrase for phrase in PROCESS if phrase in text]
        assert not found, f"{page.relative_to(ROOT)}: {found}"


def test_every_result_file_names_its_command_and_a_table_reads_it():
    read = {name for page in results.pages() for spec, _ in results.blocks(page.read_text())
            for name in results.parse(spec)[1]}
    for path in (ROOT / "docs" / "results").glob("*.json"):
        assert json.loads(path.read_text())["command"].startswith("sdit ")
        assert path.stem in read, f"{path.name} is rendered by no table"


# --- the renderer on pages of its own ----------------------------------------------------------------------

def distill_result(fair: float, command: str) -> dict:
    return {"command": command, "runs": {"kd": {"heldout_acc": fair, "seen_acc": 0.5}},
            "teacher": {"heldout_acc": 0.8, "seen_acc": 0.9}}


def test_a_page_is_rendered_again_from_its_files_and_a_changed_file_makes_it_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    monkeypatch.setattr(results, "ROOT", tmp_path)
    (tmp_path / "x-seed0.json").write_text(json.dumps(distill_result(0.4, "sdit bench distill --json x-seed0.json")))
    (tmp_path / "x-seed1.json").write_text(json.dumps(distill_result(0.6, ["sdit", "bench", "distill", "--seed", "1"])))
    page = tmp_path / "README.md"
    page.write_text("Intro.\n<!-- results: distill x-seed0 x-seed1 columns=fair,share -->\nold\n"
                    "<!-- /results -->\nEnd.\n")
    assert results.stale(page) == ["distill x-seed0 x-seed1 columns=fair,share"]
    page.write_text(results.render_page(page.read_text()))
    text = page.read_text()
    assert results.stale(page) == []
    assert "| kd | 0.400 | 0.600 | 50% | 75% |" in text and "| teacher | 0.800 | 0.800 |  |  |" in text
    assert "held-out concepts (fair), seed 0 | seed 1" in text
    assert "sdit bench distill --json x-seed0.json\nsdit bench distill --seed 1\n" in text
    assert text.startswith("Intro.\n") and text.endswith("<!-- /results -->\nEnd.\n")
    (tmp_path / "x-seed1.json").write_text(json.dumps(distill_result(0.7, "sdit bench distill --seed 1")))
    assert results.stale(page) == ["distill x-seed0 x-seed1 columns=fair,share"]


def test_the_curves_view_shows_each_run_at_every_step_it_scored_per_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    for seed, late in ((0, 0.5), (1, 0.625)):
        data = distill_result(0.4, f"sdit bench distill --seed {seed}")
        data["runs"]["kd"]["curves"] = [{"step": 0, "heldout_acc": 0.0, "seen_acc": 0.0},
                                        {"step": 1500, "heldout_acc": 0.25, "seen_acc": late}]
        (tmp_path / f"x-seed{seed}.json").write_text(json.dumps(data))
    text = results.render("curves x-seed0 x-seed1")
    assert "| run | seed | step 0 | step 1,500 |" in text
    assert "| kd | 0 | 0.00 | 0.50 |" in text and "| kd | 1 | 0.00 | 0.62 |" in text
    assert "| kd | 0 | 0.00 | 0.25 |" in results.render("curves x-seed0 metric=fair")
    (tmp_path / "flat-seed0.json").write_text(json.dumps(distill_result(0.4, "sdit bench distill")))
    for spec, words in (("curves flat-seed0", "no learning curve"), ("curves x-seed0 metric=colour", "metric")):
        with pytest.raises(results.ResultsError, match=words):
            results.render(spec)


def test_a_marker_that_names_what_does_not_exist_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    (tmp_path / "x.json").write_text(json.dumps(distill_result(0.4, "sdit bench distill")))
    (tmp_path / "bare.json").write_text(json.dumps({"runs": {}, "teacher": {}}))
    for spec, words in (("distill missing", "does not exist"), ("nothing x", "choose one of"),
                        ("distill x runs=kd,other", "'other' is in none"), ("distill x columns=colour", "column"),
                        ("distill bare", "no \"command\"")):
        with pytest.raises(results.ResultsError, match=words):
            results.render(spec)


def test_the_experiment_page_names_every_option_a_variant_may_change():
    from pipeline.experiments.config import INIT_OPTIONS, LABEL_OPTIONS, TRAIN_OPTIONS

    page = (ROOT / "docs" / "shapes-world.md").read_text()
    paragraph = page[page.index("`--variants FILE` adds runs"):].split("\n\n")[0]
    named = set(re.findall(r"`(\w+)`", paragraph))
    assert set(LABEL_OPTIONS) | set(TRAIN_OPTIONS) | set(INIT_OPTIONS) <= named
