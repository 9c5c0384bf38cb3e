"""The data used is the data asked for: an explicit data_dir is the only place looked in, and the
resolved source (folder + content hash) is a record a runner can save and compare."""

from __future__ import annotations

import json

import pytest

import sfwprune.data.fashion_mnist as fm
from sfwprune.data import DataSource, check_source, load_dataset, resolve_source

STEMS = tuple(fm.FILES.values())


def test_missing_explicit_data_dir_is_an_error_never_a_fallback(tmp_path, monkeypatch, files):
    system = tmp_path / "system"
    files.write_fashion(system)
    monkeypatch.setattr(fm, "SYSTEM_DIR", system)  # a complete fallback exists and is not used
    missing = tmp_path / "does-not-exist"
    for call in (load_dataset, resolve_source):
        with pytest.raises(FileNotFoundError) as info:
            call("fashion-mnist", data_dir=missing)
        msg = str(info.value)
        assert msg.startswith(f"Invalid data_dir: {str(missing)!r}") and "no such folder" in msg
    assert load_dataset("fashion-mnist").source.path == str(system)  # no data_dir: search


@pytest.mark.parametrize("stem", STEMS)
def test_explicit_data_dir_lacking_one_file_names_it(tmp_path, monkeypatch, files, stem):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    files.write_fashion(tmp_path / "system")
    files.write_fashion(tmp_path / "mine")
    (tmp_path / "mine" / f"{stem}.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path / "mine")
    msg = str(info.value)
    assert str(tmp_path / "mine") in msg and f"missing {stem}[.gz]" in msg
    assert [s for s in STEMS if s in msg.split("missing", 1)[1]] == [stem]


def test_empty_explicit_folder_lists_every_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")
    assert all(stem in str(info.value) for stem in STEMS)
    with pytest.raises(FileNotFoundError, match=r"Invalid data_dir: .*test_batch"):
        load_dataset("cifar10", data_dir=tmp_path / "empty")


@pytest.mark.parametrize("where", ["env", "arg"])
def test_unknown_user_home_is_a_value_error(monkeypatch, where):
    if where == "env":
        monkeypatch.setenv("SFWPRUNE_DATA", "~nouser_sfwprune/x")
        kwargs = {}
    else:
        kwargs = {"data_dir": "~nouser_sfwprune/x"}
    name = "SFWPRUNE_DATA" if where == "env" else "data_dir"
    with pytest.raises(ValueError, match=rf"Invalid {name}: '~nouser_sfwprune/x' \(cannot expand"):
        load_dataset("fashion-mnist", **kwargs)


def test_source_record_hashes_the_files_read(tmp_path, files):
    files.write_fashion(tmp_path / "a", seed=1)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path / "a", limit=4)
    src = resolve_source("fashion-mnist", tmp_path / "a")
    assert src == ds.source and src.path == str(tmp_path / "a") and len(src.sha256) == 64
    assert sorted(src.files) == sorted(f"{s}.gz" for s in STEMS)
    assert json.loads(json.dumps(src.as_dict())) == {"path": src.path, "sha256": src.sha256}
    assert ds.describe()["source_sha256"] == src.sha256
    # same bytes elsewhere: same hash; other bytes: another hash
    files.write_fashion(tmp_path / "b", seed=1)
    files.write_fashion(tmp_path / "c", seed=2)
    assert resolve_source("fashion-mnist", tmp_path / "b").sha256 == src.sha256
    assert resolve_source("fashion-mnist", tmp_path / "c").sha256 != src.sha256
    # one changed byte in one file changes it
    f = tmp_path / "b" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 1
    f.write_bytes(bytes(raw))
    assert resolve_source("fashion-mnist", tmp_path / "b").sha256 != src.sha256


def test_cifar_and_tiny_imagenet_sources(tmp_path, files):
    files.write_cifar(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path, limit=2)
    assert ds.source == resolve_source("cifar10", tmp_path) and "batches.meta" in ds.source.files
    files.write_tiny_imagenet(tmp_path / "t")
    tiny = load_dataset("tiny-imagenet", data_dir=tmp_path / "t")
    again = resolve_source("tiny-imagenet", tmp_path / "t")
    assert tiny.source.sha256 == again.sha256 and tiny.source.path == again.path


def test_generated_sources_depend_on_options_not_limit():
    a = resolve_source("synthetic", seed=1)
    assert a == load_dataset("synthetic", seed=1, limit=10).source
    assert a.path == "generated (seed=1)" and a.sha256 != resolve_source("synthetic", seed=2).sha256


def test_check_source_refuses_other_data():
    here = DataSource("/data/a", "ab" * 32)
    check_source(here.as_dict(), DataSource("/moved/a", "ab" * 32))  # same content: fine
    check_source(None, here)  # older records carry no source
    with pytest.raises(ValueError, match=r"Invalid data source: '/data/b' has sha256 cdcdcd"):
        check_source(here.as_dict(), DataSource("/data/b", "cd" * 32))
    with pytest.raises(ValueError, match="Invalid data source record"):
        check_source({"path": "/x"}, here)
