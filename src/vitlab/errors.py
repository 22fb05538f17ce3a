"""The one exception type vitlab raises for bad input, so the CLI can print one line and exit 2."""


class VitlabError(ValueError):
    """Bad input: a file, key, argument or value that vitlab cannot use. The message names it."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""


def printable(text: object) -> str:
    """`text` with every non-printable character (newlines, ANSI escapes, undecodable bytes) written as its Python
    escape, so a hostile class or file name cannot split a one-line message or drive the terminal."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for char in str(text))
