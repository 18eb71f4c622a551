"""Settings an admin changes through the API in fleet mode, layered over api.yaml.

With one process, changing a key's billing mode rewrites that value in api.yaml, the one
source of truth. In a fleet every instance reads its own copy of the file (one per host, a
read-only ConfigMap), so an edit on one would reach no other. There the change is stored in
PostgreSQL (`key_settings`) instead, and every instance applies the stored settings over the
file it loaded, on each reload of the file and within a second of a change. The file stays
as written; `GET /v1/config/status` lists what the database overrides.
"""

from __future__ import annotations

from dataclasses import replace

from core.config import ApiKey, Config
from core.config_billing import BILLING_MODES
from core.keys import KeyIndex

BILLING_MODE = "billing_mode"
SETTABLE = {BILLING_MODE: BILLING_MODES}

KeySettings = dict[str, dict[str, str]]  # key id → setting name → value


def layered(config: Config, settings: KeySettings) -> Config:
    """`config` with the stored settings applied; the same object when they change nothing
    (a setting for a key the file no longer has, or a value it already has, is ignored)."""
    if not settings:
        return config
    keys: list[ApiKey] = []
    changed = False
    for key in config.keys:
        mode = settings.get(key.id, {}).get(BILLING_MODE)
        if mode in BILLING_MODES and mode != key.billing.mode:
            key = replace(key, billing=replace(key.billing, mode=mode))
            changed = True
        keys.append(key)
    if not changed:
        return config
    layered_keys = tuple(keys)
    return replace(config, keys=layered_keys, key_index=KeyIndex(layered_keys), keys_by_id={key.id: key for key in layered_keys})


def overrides(config: Config, settings: KeySettings) -> list[dict[str, str]]:
    """The settings in force from the database, for the status page: key name, setting, value."""
    shown = []
    for key_id, values in sorted(settings.items()):
        key = config.keys_by_id.get(key_id)
        if key is None:
            continue
        for name, value in sorted(values.items()):
            shown.append({"key": key.name, "key_id": key_id, "setting": name, "value": value})
    return shown
