"""Files replaced whole, and folders checked before a stage writes into them (sdit.files)."""

import os

import pytest

from sdit.errors import SDiTError
from sdit.files import check_folder, recover_folder, replace_text, replacing, writing_folder


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a.txt"
    replace_text(path, "old")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    replace_text(path, "new")
    assert path.read_text() == "new"


def test_a_folder_to_write_into_may_be_new_or_existing_but_not_a_file(tmp_path):
    assert check_folder(tmp_path) == tmp_path
    assert check_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(SDiTError, match=r"^--out .*a.txt is a file; give a folder$"):
        check_folder(tmp_path / "a.txt")
    with pytest.raises(SDiTError, match=r"^--run .*a.txt/run is inside .*a.txt, a file; give a folder$"):
        check_folder(tmp_path / "a.txt" / "run", "--run")


def test_a_folder_is_replaced_whole_and_a_kill_between_its_renames_is_recovered(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    with writing_folder(folder) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError), writing_folder(folder) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed while writing")
    assert (folder / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint"]

    renames = []

    def killed_after_the_first(src, dst):
        if renames:
            raise KeyboardInterrupt  # the kill: the old folder is aside, the new one not yet in place
        renames.append(src)
        os.rename(src, dst)

    monkeypatch.setattr("sdit.files.os.replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt), writing_folder(folder) as tmp:
        (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert not folder.exists() and renames == [folder]
    assert (recover_folder(folder) / "weights").read_text() == "old"
    with writing_folder(folder) as tmp:
        (tmp / "weights").write_text("new")
    assert (folder / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
