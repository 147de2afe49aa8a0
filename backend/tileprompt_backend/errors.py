"""Exceptions shared by the engine, the index, the job queue and the CLI (light: imports nothing heavy)."""


class Cancelled(Exception):
    """The caller asked to stop; nothing was written."""
