"""The one exception the command turns into a one-line message and exit status 2."""


class UsageError(Exception):
    """Something the user gave (an argument, a file, a model directory) cannot be used.

    The message is shown as a single line, `pypeft finetune: error: <message>`,
    and the command exits with status 2, without a traceback.
    """
