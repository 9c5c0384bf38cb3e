"""Provenance: the code revision is recorded when a process starts (commit, and a hash of the
diff when the tree is dirty), and a grid refuses to mix revisions unless told to."""

from __future__ import annotations

import json
import subprocess

import pytest

from sfwprune.cli import main
from sfwprune.experiments.provenance import code_revision, git_revision, provenance
from sfwprune.experiments.reproduce import (
    ReproduceConfig,
    check_revisions,
    grid_revisions,
    run_reproduce,
)

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def _repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("x = 1\n")
    (repo / "notes.md").write_text("notes\n")
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "first"]):
        subprocess.run([*GIT, *cmd], cwd=repo, check=True, capture_output=True)
    return repo


def test_revision_of_clean_and_dirty_trees(tmp_path) -> None:
    repo = _repo(tmp_path)
    fresh = code_revision.__wrapped__  # uncached: each call reads the tree now
    clean = fresh(str(repo))
    assert not clean["dirty"] and clean["diff_sha256"] is None and len(clean["commit"]) == 40
    (repo / "notes.md").write_text("results, docs: not code\n")
    assert not fresh(str(repo))["dirty"]
    (repo / "src" / "a.py").write_text("x = 2\n")
    one = fresh(str(repo))
    (repo / "src" / "a.py").write_text("x = 3\n")
    two = fresh(str(repo))
    assert one["dirty"] and two["dirty"] and one["commit"] == clean["commit"]
    assert one["diff_sha256"] != two["diff_sha256"] and len(one["diff_sha256"]) == 12
    (repo / "src" / "new.py").write_text("")
    assert fresh(str(repo))["untracked"] == ["src/new.py"]


def test_revision_is_the_one_recorded_first(tmp_path) -> None:
    repo = _repo(tmp_path)
    first = git_revision(repo)
    (repo / "src" / "a.py").write_text("edited after the process started\n")
    assert git_revision(repo) == first and "dirty" not in first
    assert provenance()["git_revision"] == git_revision()


def _old_grid(tmp_path):
    out = tmp_path / "grid"
    run = out / "lenet300" / "sgd" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps({"config": {}, "provenance": {"git_revision": "0" * 40 + "-dirty-abc"}})
    )
    return out


def test_reproduce_refuses_a_grid_of_another_revision(tmp_path, capsys) -> None:
    out = _old_grid(tmp_path)
    rc = ReproduceConfig(dataset="synthetic", models=("lenet300",), seeds=1, epochs=1, limit=64)
    with pytest.raises(ValueError, match="--allow-mixed-revisions"):
        run_reproduce(rc, out, log=lambda s: None)
    argv = ["reproduce", "fashion-mnist", "--out", str(out), "--models", "lenet300"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Invalid reproduce" in err and "0" * 40 in err
    assert not (out / "lenet300" / "reproduce_config.json").exists()  # nothing written


def test_grid_revisions_and_the_explicit_allowance(tmp_path) -> None:
    out = _old_grid(tmp_path)
    found = grid_revisions(out)
    assert list(found) == ["0" * 40 + "-dirty-abc"]
    check_revisions(out, "0" * 40 + "-dirty-abc")  # the same revision: nothing to refuse
    with pytest.raises(ValueError, match="1 other code revision"):
        check_revisions(out, "1" * 40)
