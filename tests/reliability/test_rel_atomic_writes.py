"""Atomic writes: a writer that fails or is killed at any moment leaves the old file or the new
one, never a truncated mix; and every file the package writes goes through ``sfwprune._io``."""

from __future__ import annotations

import ast
import errno
import multiprocessing
import os
import random
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from sfwprune import _io

SRC = Path(__file__).resolve().parents[2] / "src" / "sfwprune"


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- failures inside the process ------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(), RuntimeError("boom")],
    ids=["disk-full", "ctrl-c", "bug"],
)
def test_error_mid_write_keeps_old_file_and_no_temp(error, tmp_path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old\n")

    def half_then_fail(fh) -> None:
        fh.write(b'{"new": ')  # half of the new content reaches the temporary file
        fh.flush()
        assert _temp_files(tmp_path), "the writer should be writing a temporary file"
        raise error

    with pytest.raises(type(error)):
        _io._atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_failing_fsync_or_rename_keeps_old_checkpoint(stage, tmp_path, monkeypatch) -> None:
    target = tmp_path / "checkpoint.pt"
    _io.atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, target)

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, f"{stage} failed")

    monkeypatch.setattr(_io.os, stage, fail)
    with pytest.raises(OSError, match=f"{stage} failed"):
        _io.atomic_torch_save({"epoch": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert _io.safe_torch_load(target)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_unserializable_object_writes_nothing(tmp_path) -> None:
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(Exception):  # noqa: B017 - pickle raises AttributeError/PicklingError
        _io.atomic_torch_save({"fn": lambda: 0}, target)
    assert list(tmp_path.iterdir()) == []


def test_bad_targets(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _io.atomic_write_text(tmp_path / "missing" / "x.txt", "x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="it is a folder"):
        _io.atomic_write_text(tmp_path / "folder", "x")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _io.atomic_write_text(blocker / "x.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_file_mode_follows_umask_and_is_kept_on_replace(tmp_path) -> None:
    # mkstemp makes 0600 files; shared checkpoints must be readable as open(path, "w") makes them
    old_mask = os.umask(0o022)
    try:
        new = _io.atomic_write_text(tmp_path / "new.txt", "x")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o640)
        _io.atomic_write_text(kept, "new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "new"
    finally:
        os.umask(old_mask)


def test_append_line_keeps_earlier_lines(tmp_path) -> None:
    log = tmp_path / "metrics.jsonl"
    for i in range(3):
        _io.append_line(log, f'{{"epoch": {i}}}')
    assert log.read_text().splitlines() == ['{"epoch": 0}', '{"epoch": 1}', '{"epoch": 2}']


# --- real processes killed with SIGKILL -----------------------------------------------------

_CTX = multiprocessing.get_context("fork")  # a real child process; torch is already imported
_N = 1 << 21  # 8 MB of float32 per payload: each write takes a while


def _payload(i: int) -> dict:
    return {"i": i, "x": torch.full((_N,), float(i))}


def _write_forever(target: str, first: int) -> None:
    torch.set_num_threads(1)
    i = first
    while True:
        _io.atomic_torch_save(_payload(i), target)
        i += 1


def _check_complete(target: Path) -> int:
    obj = _io.safe_torch_load(target)  # raises on a truncated or torn file
    assert obj["x"].shape == (_N,)
    assert bool((obj["x"] == float(obj["i"])).all()), "a mix of two payloads"
    return int(obj["i"])


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


def test_sigkill_at_random_moments_leaves_a_complete_file(tmp_path) -> None:
    target = tmp_path / "checkpoint.pt"
    _io.atomic_torch_save(_payload(0), target)
    rng = random.Random(20240607)
    last = 0
    for _ in range(6):
        proc = _CTX.Process(target=_write_forever, args=(str(target), last + 1), daemon=True)
        proc.start()
        deadline = time.monotonic() + rng.uniform(0.05, 0.5)
        while time.monotonic() < deadline:  # readers meanwhile only ever see whole files
            seen = _check_complete(target)
            assert seen >= last
        _kill(proc)
        now = _check_complete(target)
        assert now >= last  # the old payload or a newer one, never an older or broken one
        last = now
    # killed writers may leave their temporary file behind, never a broken target
    for name in _temp_files(tmp_path):
        assert name.startswith(".checkpoint.pt.")


def _write_half_then_wait(target: str, ready) -> None:
    data = _io.io.BytesIO()
    torch.save(_payload(2), data)
    raw = data.getvalue()

    def slow(fh) -> None:
        fh.write(raw[: len(raw) // 2])
        fh.flush()
        ready.send("half")
        time.sleep(60)  # killed here
        fh.write(raw[len(raw) // 2 :])

    _io._atomic_write(target, slow)


def test_sigkill_in_the_middle_of_a_write_keeps_the_old_file(tmp_path) -> None:
    target = tmp_path / "checkpoint.pt"
    _io.atomic_torch_save(_payload(1), target)
    parent, child = _CTX.Pipe()
    proc = _CTX.Process(target=_write_half_then_wait, args=(str(target), child), daemon=True)
    proc.start()
    assert parent.poll(30) and parent.recv() == "half"
    _kill(proc)
    assert _check_complete(target) == 1  # the old file, whole
    assert len(_temp_files(tmp_path)) == 1  # the half-written temporary file, never renamed
    _io.atomic_torch_save(_payload(3), target)  # the next write is unaffected
    assert _check_complete(target) == 3


# --- every writer and loader in the package goes through _io ---------------------------------

_WRITE_CALLS = {"write_text", "write_bytes", "savefig", "tofile", "dump"}
_MODULE_CALLS = {
    ("torch", "save"), ("torch", "load"), ("pickle", "load"), ("pickle", "loads"),
    ("pickle", "dump"), ("np", "save"), ("np", "savez"), ("np", "load"), ("numpy", "load"),
    ("shutil", "copy"), ("shutil", "copyfile"), ("shutil", "move"), ("os", "rename"),
    ("json", "dump"),
}  # fmt: skip
# (file, call, enclosing function): why it is fine
ALLOWED = {
    ("experiments/runner.py", "write_bytes", "_prepare_folder"): "empty writability probe",
    ("experiments/plots.py", "savefig", "_save"): "renders into BytesIO, then atomic_write_bytes",
    ("distributed.py", "pickle.loads", "_shareable"): "round-trips its own exception, no file",
}


def _violations(source: str, rel: str) -> list[tuple[str, str, str, int]]:
    found = []

    class Visitor(ast.NodeVisitor):
        def __init__(self) -> None:
            self.func = "<module>"

        def visit_FunctionDef(self, node) -> None:
            outer, self.func = self.func, node.name
            self.generic_visit(node)
            self.func = outer

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_ClassDef(self, node) -> None:
            bases = [ast.unparse(b) for b in node.bases]
            if any(b.endswith("Unpickler") for b in bases) and rel != "data/cifar.py":
                found.append((rel, "Unpickler", node.name, node.lineno))
            self.generic_visit(node)

        def visit_Call(self, node) -> None:
            f = node.func
            name = None
            if isinstance(f, ast.Name) and f.id == "open":
                mode = node.args[1] if len(node.args) > 1 else None
                for kw in node.keywords:
                    if kw.arg == "mode":
                        mode = kw.value
                text = mode.value if isinstance(mode, ast.Constant) else "r"
                if not isinstance(text, str) or set(text) & set("wax+"):
                    name = "open"
            elif isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else None
                if (owner, f.attr) in _MODULE_CALLS:
                    name = f"{owner}.{f.attr}"
                elif f.attr in _WRITE_CALLS and owner not in ("json", "pickle"):
                    name = f.attr
                elif f.attr == "open" and any(
                    isinstance(a, ast.Constant)
                    and isinstance(a.value, str)
                    and set(a.value) & set("wax+")
                    for a in node.args[:1]
                ):
                    name = "Path.open"
            if name is not None and (rel, name, self.func) not in ALLOWED:
                found.append((rel, name, self.func, node.lineno))
            self.generic_visit(node)

    Visitor().visit(ast.parse(source))
    return found


def test_guard_flags_direct_writes_and_loads() -> None:
    bad = (
        "import torch, pickle, json\n"
        "def f(p, x):\n"
        "    open(p, 'w').write('x')\n"
        "    torch.save(x, p)\n"
        "    torch.load(p)\n"
        "    pickle.loads(x)\n"
        "    p.write_text('x')\n"
        "    p.open('a')\n"
        "    json.dump(x, p)\n"
        "    fig.savefig(p)\n"
    )
    names = [v[1] for v in _violations(bad, "x.py")]
    expected = ["open", "torch.save", "torch.load", "pickle.loads", "write_text", "Path.open"]
    assert names == [*expected, "json.dump", "savefig"]
    assert _violations("def g(p):\n    open(p, 'rb').read()\n", "x.py") == []


def test_every_write_and_load_in_the_package_goes_through_io() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = []
    for path in files:
        rel = str(path.relative_to(SRC))
        if rel == "_io.py":
            continue
        found += _violations(path.read_text(encoding="utf-8"), rel)
    assert found == [], (
        "write through sfwprune._io (atomic_*), load through _io.safe_torch_load: "
        + "; ".join(f"{r}:{line} {name} in {fn}()" for r, name, fn, line in found)
    )
