"""Which launcher drives which provider, when several share one database: a pure
function of the live launchers and what each may drive, so every launcher works
out the same answer on its own and no one has to hand out the providers."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Mapping

# A launcher not seen for this many lease TTLs is removed from the store (and so from
# /status, which shows it as dead from one TTL on): long enough to notice it died.
FORGET_TTLS = 10.0
# The lease of the fleet's image builder, in the providers' lease table: one launcher
# builds, uploads and validates images for the fleet at a time. No provider can
# have this name (names start with a letter or digit).
BUILDER_LEASE = "@images"


def score(provider: str, launcher: str) -> int:
    """The rendezvous hash of a (provider, launcher) pair: stable across processes
    and hosts (Python's own hash() is salted per process)."""
    digest = hashlib.sha256(f"{provider}\0{launcher}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def assign(
    providers: Collection[str], launchers: Mapping[str, Collection[str] | None]
) -> dict[str, str]:
    """provider -> the launcher that should drive it. `launchers` maps each live
    launcher to the providers it may drive (None: any). Providers are dealt out by
    name, each to the launcher that may drive it and has the fewest so far, ties to
    the one whose rendezvous hash with the provider is highest: every launcher gets
    about the same number, and a provider no launcher may drive gets none."""
    load: Counter[str] = Counter({name: 0 for name in launchers})
    owners: dict[str, str] = {}
    for provider in sorted(providers):
        eligible = [
            name for name, allowed in launchers.items() if allowed is None or provider in allowed
        ]
        if not eligible:
            continue
        chosen = min(eligible, key=lambda name: (load[name], -score(provider, name)))
        owners[provider] = chosen
        load[chosen] += 1
    return owners
