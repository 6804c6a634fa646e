"""User-facing errors: each message is one line that names the problem and what to do.
The CLI prints them without a traceback and exits with code 2."""


class LDFAError(ValueError):
    """Base of the project's user-facing errors."""


class ConfigError(LDFAError):
    """A recipe, override or command-line value that cannot be used."""


class DataError(LDFAError):
    """A dataset that is missing and cannot be downloaded, or is malformed."""


class FeedbackConfigError(LDFAError):
    """A rule, option, rank or layer that cannot be used (``ldfa_cli.feedback`` raises it)."""


class CheckpointError(LDFAError):
    """A checkpoint or run folder that is corrupt, foreign or missing."""


class TrainingError(RuntimeError):
    """A run that started and had to stop (a diverged loss): one line, exit code 1."""
