"""User-facing errors: anything a user can cause (bad path, bad flag, broken checkpoint).

The CLI prints these as one line and exits with code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, described in one actionable sentence."""


class ExpertLoadError(UserError):
    """Reading one expert from the slow tier failed; names the expert and the cause."""
