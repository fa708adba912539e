"""The vendored test data (tests/data) is byte for byte what its SHA256SUMS list: a corrupted,
edited, missing or unlisted file fails here, by name, instead of as a puzzling oracle mismatch in
some other test."""

import hashlib

import pytest

from conftest import DATA, FIXTURES, STORIES

CHECKSUMMED = [FIXTURES, STORIES]  # each holds a SHA256SUMS covering every file below it
NOTES = {"README.md", ".gitattributes"}  # tests/data's own files, describing the folders


def listed(folder) -> dict[str, str]:
    """{path relative to folder: sha256 hex digest} from `sha256sum`'s `DIGEST  PATH` lines."""
    sums = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.removeprefix("*")] = digest  # "*" marks sha256sum's binary mode
    return sums


@pytest.mark.parametrize("folder", CHECKSUMMED, ids=lambda p: p.relative_to(DATA).as_posix())
def test_every_file_is_listed_and_matches_its_checksum(folder):
    sums = listed(folder)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    present.discard("SHA256SUMS")
    assert present == set(sums), (
        f"{folder}: missing {sorted(set(sums) - present)}, unlisted {sorted(present - set(sums))}"
    )
    wrong = [
        name
        for name, digest in sorted(sums.items())
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest
    ]
    assert not wrong, f"{folder}: contents differ from SHA256SUMS: {wrong}"


def test_no_data_outside_the_checksummed_folders():
    stray = [
        p.relative_to(DATA).as_posix()
        for p in DATA.rglob("*")
        if p.is_file()
        and not any(p.is_relative_to(folder) for folder in CHECKSUMMED)
        and p.relative_to(DATA).as_posix() not in NOTES
    ]
    assert not stray, f"files in tests/data not covered by a SHA256SUMS: {stray}"
