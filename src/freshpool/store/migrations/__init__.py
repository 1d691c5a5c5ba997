"""The store's Alembic migrations (versions/)."""

from pathlib import Path

# The newest revision in versions/. Opening a store compares it with the database's
# revision before it loads Alembic at all, so a command on an up-to-date store does
# not pay for Alembic's import; tests/store/test_store.py checks it is Alembic's head.
HEAD = "0009"


def known_revisions() -> list[str]:
    """Every revision this freshpool has a migration for, oldest first (by file name,
    without importing Alembic)."""
    versions = Path(__file__).parent / "versions"
    return sorted(p.name.split("_", 1)[0] for p in versions.glob("[0-9][0-9][0-9][0-9]_*.py"))
