"""The one error type a user can cause. The CLI prints it in one line, without a traceback."""


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
