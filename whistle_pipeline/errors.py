"""Errors a user can act on. The CLI prints their message (one paragraph) and exits non-zero."""


class WhistleError(Exception):
    """A problem with the user's input, configuration, data or environment — never a bug in whistle.

    Messages say what was wrong, where (file, row, utterance id), and what to do about it.
    """
