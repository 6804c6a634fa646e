"""The ``ldfa`` command: one module per command, wired in ``app.py``."""
