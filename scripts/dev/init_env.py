"""Write .env for docker compose from .env.example, with fresh random local secrets (used by `make up`).

An existing .env is left as it is. Standard library only: runs before any virtualenv exists.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fill(line: str) -> str:
    if line.strip() == "SECRET_KEY=":
        return f"SECRET_KEY={secrets.token_urlsafe(50)}\n"
    if line.strip() == "FLOWER_BASIC_AUTH=":
        return f"FLOWER_BASIC_AUTH=admin:{secrets.token_urlsafe(12)}\n"
    return line


def main() -> int:
    target = ROOT / ".env"
    if target.exists():
        print(f"[up] using existing {target.name}")
        return 0
    lines = (ROOT / ".env.example").read_text().splitlines(keepends=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.writelines(fill(line) for line in lines)
    auth = next(line for line in target.read_text().splitlines() if line.startswith("FLOWER_BASIC_AUTH="))
    print(f"[up] wrote .env with new local secrets; Flower login {auth.split('=', 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
