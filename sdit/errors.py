"""Errors: `SDiTError`, the one a user can cause (the CLI prints it in one line, without a traceback), and
`RejectedInput`, a record a stage skips and lists in its rejects file; `read_json_object` reads a JSON file that
may have been cut short, as one of them."""

import json
from pathlib import Path


class SDiTError(Exception):
    """A problem with the user's input, options or files; the message says what to do."""


def brief(err: BaseException, limit: int = 100) -> str:
    """Another library's error in a few words, for inside a one-line message: its first sentence, cut at `limit`
    characters (torch's run to paragraphs of advice)."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    text = text.splitlines()[0].split(". ")[0].rstrip(".")
    if " " not in text:  # a bare key or number (KeyError: 101) says nothing without its type
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


class RejectedInput(Exception):
    """A record that is skipped and listed in the rejects file."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # short snake_case code, e.g. "unreadable_image"
        self.detail = detail


def read_json_object(path: Path, advice: str) -> dict:
    """The JSON object in `path`; an SDiTError naming the file, with `advice`, where it is cut short or its bytes
    changed on disk."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise SDiTError(f"{path} is damaged ({brief(err)}); {advice}") from None
    return data
