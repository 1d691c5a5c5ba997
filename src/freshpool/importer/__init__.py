"""Configs of other node pools turned into freshpool ones."""
