"""`python main.py --check-config api.yaml`: load a config as the server would, and say what
it thinks of it, without opening a ledger or a port (for CI, or before a uni-api user's first
start). Keys stored through the keys API live in the ledger and are not checked here."""

from __future__ import annotations

from typing import TextIO

from core.config import load_config
from core.config.yamlsource import ConfigError


def check_config(path: str, out: TextIO, err: TextIO) -> int:
    """Every warning and the error (`file:line:column: reason`) on `err`, a one-line summary on
    `out` when it loads; the exit code: 0 when it loads (warnings or not), 1 when it does not."""
    try:
        config = load_config(path)
    except ConfigError as error:
        for warning in error.warnings:
            print(f"warning: {warning}", file=err)
        print(f"error: {error}", file=err)
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}", file=err)
    counts = f"{len(config.providers)} providers, {len(config.public_models)} models, {len(config.keys)} keys, {len(config.warnings)} warnings"
    print(f"{path}: OK ({counts})", file=out)
    return 0
