"""Finding the host's Debian mirror among its apt sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from freshpool.images.mirror import MirrorNotFound, host_mirror, read_sources

NODESOURCE = """\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
Signed-By: /usr/share/keyrings/nodesource.gpg
"""

DEBIAN = """\
Types: deb deb-src
# a comment inside the stanza
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def _apt_dir(tmp_path: Path, main: str = "", parts: dict[str, str] | None = None) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(main)
    for name, text in (parts or {}).items():
        (tmp_path / "sources.list.d" / name).write_text(text)
    return tmp_path


def test_deb822_debian_mirror_wins_over_other_repositories(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        "deb [signed-by=/usr/share/keyrings/cloud.gpg] https://packages.cloud.google.com/apt "
        "cloud-sdk-bookworm main\n",
        {"a-nodesource.sources": NODESOURCE, "debian.sources": DEBIAN},
    )
    assert host_mirror("bookworm", apt) == "http://mirror.example/debian"


def test_one_line_format_with_options_and_comments(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        "# deb http://old.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb cdrom:[Debian 12]/ bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] https://one.example/debian bookworm main # here\n"
        "deb http://two.example/debian bookworm main\n",
    )
    assert host_mirror("bookworm", apt) == "https://one.example/debian"


def test_disabled_entries_and_other_file_names_are_ignored(tmp_path: Path) -> None:
    apt = _apt_dir(
        tmp_path,
        parts={
            "off.sources": "Enabled: no\n" + DEBIAN.replace("mirror.example", "off.example"),
            "google.list.disabled": "deb http://disabled.example/debian bookworm main\n",
            "z.list": "deb http://on.example/debian bookworm main\n",
        },
    )
    assert host_mirror("bookworm", apt) == "http://on.example/debian"


def test_another_suite_falls_back_to_a_debian_archive(tmp_path: Path) -> None:
    apt = _apt_dir(tmp_path, parts={"n.sources": NODESOURCE, "debian.sources": DEBIAN})
    assert host_mirror("trixie", apt) == "http://mirror.example/debian"


def test_no_debian_mirror_is_a_clear_error(tmp_path: Path) -> None:
    apt = _apt_dir(tmp_path, parts={"n.sources": NODESOURCE})
    with pytest.raises(MirrorNotFound, match="set `mirror:` for the image"):
        host_mirror("bookworm", apt)


def test_the_hosts_own_sources_parse() -> None:
    # Whatever this machine has, reading it must not fail.
    assert isinstance(read_sources(), list)
