"""The one user-facing error class: raised at the boundary, printed by the CLI as one line."""


class JaxcritError(Exception):
    """Bad input a user can fix; the message says what was wrong and what to do."""
