"""User-facing errors: one paragraph that names the file, key or value and the fix.

The CLI prints these without a stack trace and exits with `exit_code`.
"""


class Exl2BuildError(Exception):
    """An error the user can fix; its message says how."""

    exit_code = 1


class ConfigError(Exl2BuildError):
    """A recipe or override is invalid (bad key, type, value or missing path)."""

    exit_code = 2


class InputError(Exl2BuildError):
    """An input file (model, calibration, evaluation text) cannot be used as given."""

    exit_code = 2


class StepError(Exl2BuildError):
    """A step of the build failed; the message names the step and the cause."""

    exit_code = 1
