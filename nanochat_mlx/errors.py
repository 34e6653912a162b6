"""Errors meant for users: a short message that names the file, tensor or option at fault."""


class NanochatError(Exception):
    """A problem the user can fix (bad file, bad option, missing download).

    Front ends print ``str(err)`` on one line and exit non-zero; no traceback unless ``--debug``.
    """


class CheckpointError(NanochatError):
    """A checkpoint, meta or tokenizer file is missing, corrupt, unsafe or inconsistent."""
