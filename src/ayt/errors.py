"""User-facing errors: one readable line that names the problem and the fix."""


class AytError(Exception):
    """Bad input from the user (config, path, checkpoint). The CLI prints it and exits 2."""


def check(condition: bool, message: str) -> None:
    """Raise `AytError(message)` unless `condition` holds."""
    if not condition:
        raise AytError(message)
