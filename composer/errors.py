class ComposerError(Exception):
    """A problem the user can fix. The message is one paragraph that names the file, key or tensor at fault."""
