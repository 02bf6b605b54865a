"""Create or migrate the Mini-Claude database schema (docker-compose runs this before the server starts).

Usage: python scripts/setup_database.py [DATABASE_URL]   (default: MINI_CLAUDE_DATABASE_URL, then SQLite)
It is `mini-claude db upgrade` under the name deployments look for.
"""

from __future__ import annotations

import sys

from mini_claude.__main__ import main

if __name__ == "__main__":
    url = sys.argv[1:2]
    sys.exit(main(["db", "upgrade", *(["--database_url", url[0]] if url else [])]))
