"""The one exception type for errors a user can cause.

The CLI prints ``str(err)`` on one line (``one_line``) and exits non-zero without a traceback; anything else is a bug
and keeps its traceback.
"""

import re


class UserError(Exception):
    """Something the user can fix: an unknown name, a missing file, a bad card or checkpoint.

    The message says what is wrong and what to do about it.
    """


# torch's weights-only refusal wraps the one line that says what failed in paragraphs of advice
_TORCH_ADVICE = (
    re.compile(r"Weights only load failed\..*?WeightsUnpickler error:", re.S),
    re.compile(r"Check the documentation of torch\.load.*?torch\.load\.html\.?", re.S),
)


def one_line(text: object, limit: int | None = 300) -> str:
    """A library's message (torch's are several paragraphs) as one line for a UserError:
    torch's advice paragraphs dropped, whitespace collapsed, cut at ``limit`` characters."""
    text = str(text)
    for advice in _TORCH_ADVICE:
        text = advice.sub(" ", text)
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
