"""Which engines can serve which proxied endpoints.

Chat, completions, embeddings, messages and responses are served by every engine (the
last two translated where the vendor speaks another format). The media endpoints and
moderations exist only in OpenAI's API: routing skips providers of other engines, and a
model no provider can serve them for is a clear 400 rather than a vendor's 404.
"""

from __future__ import annotations

OPENAI_STYLE_ENGINES = frozenset({"openai", "azure", "echo"})

# Endpoints only some engines serve; any endpoint not named here is served by every engine.
SERVED_BY: dict[str, frozenset[str]] = {
    "images/generations": OPENAI_STYLE_ENGINES,
    "images/edits": OPENAI_STYLE_ENGINES,
    "audio/transcriptions": OPENAI_STYLE_ENGINES,
    "audio/translations": OPENAI_STYLE_ENGINES,
    "audio/speech": OPENAI_STYLE_ENGINES,
    "moderations": OPENAI_STYLE_ENGINES,
}
