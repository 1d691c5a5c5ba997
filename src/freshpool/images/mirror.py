"""Find the Debian mirror that the host's apt already uses, from its sources files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from freshpool.core.errors import Unavailable

APT_DIR = Path("/etc/apt")


class MirrorNotFound(Unavailable, LookupError):
    """The host's apt sources name no Debian mirror for the suite."""


@dataclass(frozen=True)
class Source:
    """One `deb` entry: a URI with the suites and components it serves."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str


def host_mirror(suite: str, apt_dir: Path = APT_DIR) -> str:
    """The first http(s) Debian mirror in the host's apt sources that serves `suite`.

    Repositories that are not Debian's (nodesource, google, ...) serve their own
    suite names, so matching the suite exactly and requiring `main` skips them.
    """
    every = read_sources(apt_dir)
    sources = [s for s in every if _is_http(s.uri) and "main" in s.components]
    for source in sources:
        if suite in source.suites:
            return source.uri
    # The host may run another release than the image: any plain Debian archive serves
    # every suite, while a security archive serves only its own.
    for source in sources:
        path = source.uri.rstrip("/").rsplit("/", 1)[-1]
        if path == "debian":
            return source.uri
    where = ", ".join(sorted({s.origin for s in every})) or "no sources found"
    raise MirrorNotFound(
        f"no http(s) Debian mirror for {suite!r} in the host's apt sources ({where}); "
        f"set `mirror:` for the image, e.g. http://deb.debian.org/debian"
    )


def read_sources(apt_dir: Path = APT_DIR) -> list[Source]:
    """Every enabled `deb` entry, in the order apt reads them."""
    found: list[Source] = []
    main = apt_dir / "sources.list"
    if main.is_file():
        found += parse_one_line(main.read_text(errors="replace"), str(main))
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if not path.is_file():
                continue
            if path.suffix == ".list":
                found += parse_one_line(path.read_text(errors="replace"), str(path))
            elif path.suffix == ".sources":
                found += parse_deb822(path.read_text(errors="replace"), str(path))
    return found


def parse_one_line(text: str, origin: str = "<string>") -> list[Source]:
    """Entries of the classic format: `deb [options] URI SUITE [COMPONENT...]`."""
    found: list[Source] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        # Options in brackets may contain spaces; they never matter for choosing a mirror.
        line = re.sub(r"\[[^\]]*\]", " ", line)
        words = line.split()
        if len(words) < 3 or words[0] != "deb":
            continue
        found.append(Source(words[1], (words[2],), tuple(words[3:]), origin))
    return found


def parse_deb822(text: str, origin: str = "<string>") -> list[Source]:
    """Entries of the deb822 format (`Types:`, `URIs:`, `Suites:`, `Components:` stanzas)."""
    found: list[Source] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key:
                fields[key] += " " + raw.strip()
                continue
            name, sep, value = raw.partition(":")
            if sep:
                key = name.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            found.append(Source(uri, suites, components, origin))
    return found


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))
