"""Text sources: the paper's default paragraph and text files evaluated the reference's way."""
from __future__ import annotations

from pathlib import Path

from jaxcrit.errors import JaxcritError

# The reference's default input (its README's Stage 1 command): a WikiText paragraph on Bookends.
BOOKENDS = (
    "Later reviews were more positive. In just over 29 minutes, Bookends is stunning in its vision "
    "of a bewildered America in search of itself, said AllMusic writer Thom Jurek, who gave it five "
    "stars out of five. Pitchfork Media's Stephen M. Deusner called Bookends the moment in which the "
    "duo were settling into themselves, losing their folk revival pretensions and emphasizing quirky "
    "production techniques to match their soaring vocals. The A.V. Club called it the group's most "
    "musically and conceptually daring album."
)


def read_paragraphs(path: str | Path, min_chars: int = 50, limit: int = 0) -> list[str]:
    """Rows of a text file longer than min_chars (the reference's WikiText rule); limit 0: all."""
    p = Path(path)
    if not p.is_file():
        raise JaxcritError(f"{p}: no such text file")
    rows = [r.strip() for r in p.read_text(encoding="utf-8").splitlines() if len(r) > min_chars]
    if not rows:
        raise JaxcritError(f"{p}: no row longer than {min_chars} characters")
    return rows[:limit] if limit else rows
