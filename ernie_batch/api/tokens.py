"""Prompt-token estimates, shared by the rate limiter, `plan` and the simulator's billing.

The vendor publishes no tokenizer for ERNIE 4.5 VL. These are the documented rules of thumb
the simulator bills by, and the pipeline corrects its estimates from each response's `usage`:
text ~ 4 characters a token; an image one token per 28x28-pixel patch (ERNIE's ViT patch
size) plus 8 for its frame; a PDF page as an image of 1288 px on its longer side.
"""

from __future__ import annotations

import math
from typing import Any

PATCH = 28
PDF_PAGE_TOKENS = math.ceil(1288 * 1000 / (PATCH * PATCH)) + 8  # a letter-size page at 1288 px


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def image_tokens(width: int, height: int) -> int:
    return math.ceil(width / PATCH) * math.ceil(height / PATCH) + 8


def text_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in all messages (string contents and text parts)."""
    total = 0
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content if p.get("type") == "text")
    return total


def prompt_tokens(chars: int, images: list[tuple[int, int]], pdf_pages: int) -> int:
    """Estimated prompt tokens for a request with this much text, these images, these PDF pages."""
    return (
        math.ceil(chars / 4)
        + sum(image_tokens(w, h) for w, h in images)
        + pdf_pages * PDF_PAGE_TOKENS
    )


def completion_tokens(text: str) -> int:
    return max(1, text_tokens(text))
