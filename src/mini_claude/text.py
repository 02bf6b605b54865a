"""`Text`: a pydantic string type that refuses what no store or model can hold.

JSON may carry lone surrogates (`"\\ud800"`); Python accepts them in a str, but SQLite, PostgreSQL and the
tokenizer cannot encode them. Request models and agent definitions both validate their text with this one type.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text is not valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
