"""The one exception type vitlab raises for bad input, so the CLI can print one line and exit 2."""


class VitlabError(ValueError):
    """Bad input: a file, key, argument or value that vitlab cannot use. The message names it."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""
