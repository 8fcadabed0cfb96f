"""The page served at `GET /`: one self-contained HTML file (inline CSS and JS) to try the classifier in a browser."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files


@lru_cache(maxsize=1)
def page_html() -> str:
    """serving_page.html: pick or drop an image, POST it to ./classify, draw the top-k probabilities as bars."""
    return files("mbib").joinpath("serving_page.html").read_text(encoding="utf-8")
