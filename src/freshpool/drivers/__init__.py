"""Drivers: the adapters between freshpool and each place its nodes run (see base.py)."""
