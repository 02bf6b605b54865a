"""The OpenAI-compatible HTTP server: `protocol` (wire format), `serving` (logic), `routes`, `app`, `metrics`.

`create_app(settings, engine=None)` builds it; `mini-claude serve` runs it with uvicorn.
"""

from mini_claude.server.app import create_app

__all__ = ["create_app"]
