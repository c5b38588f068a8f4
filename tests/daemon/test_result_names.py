"""Final files' names from series ids: safe characters, bounded length, distinct for distinct long ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptylive.daemon.service.results import MAX_STEM_CHARS, output_path

pytestmark = pytest.mark.chaos  # issue 12: a fault row of docs/operations.md


def test_unsafe_characters_are_replaced_and_a_name_never_leaves_the_folder(tmp_path: Path) -> None:
    assert output_path(tmp_path, "../../etc/passwd").parent == tmp_path
    assert output_path(tmp_path, "a b/c").name == "a_b_c.h5"
    assert output_path(tmp_path, "...").name == "series.h5"


def test_a_300_character_id_gets_a_bounded_name_that_can_be_written(tmp_path: Path) -> None:
    long_a, long_b = "x" * 299 + "a", "x" * 299 + "b"
    path_a, path_b = output_path(tmp_path, long_a), output_path(tmp_path, long_b)
    assert len(path_a.stem) <= MAX_STEM_CHARS and path_a != path_b  # the hash keeps them apart
    path_a.write_bytes(b"")  # the file system accepts it (NAME_MAX is 255 on every Linux file system here)
    path_a.with_name(path_a.name + ".partial").write_bytes(b"")
    assert output_path(tmp_path, long_a).name == f"{path_a.stem}-1.h5"  # taken: numbered


def test_a_failed_write_leaves_no_partial_file_behind(tmp_path: Path) -> None:
    """A write that fails midway (here: an attribute h5py cannot store) removes its ``.partial``, so the name is
    free for the next series (a left-over once failed the next series on a full disk too)."""
    import numpy as np
    import pytest

    from ptylive.daemon.service.results import write_result

    path = tmp_path / "s.h5"
    with pytest.raises(TypeError):
        write_result(path, {"object": np.zeros((1, 2, 2), np.complex64)}, [], {"bad": object()})
    assert list(tmp_path.iterdir()) == []
    assert output_path(tmp_path, "s") == path
