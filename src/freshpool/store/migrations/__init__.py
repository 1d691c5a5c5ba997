"""The store's Alembic migrations (versions/)."""

# The newest revision in versions/. Opening a store compares it with the database's
# revision before it loads Alembic at all, so a command on an up-to-date store does
# not pay for Alembic's import; tests/store/test_store.py checks it is Alembic's head.
HEAD = "0004"
