class ComposerError(Exception):
    """A problem the user can fix. The message is one paragraph that names the file, key or tensor at fault."""


class ComposerWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints it as one 'warning:' paragraph."""
