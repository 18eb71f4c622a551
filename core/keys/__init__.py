"""Keys and accounts: who may call, and whose money pays.

- index.py: finding a key by its secret in constant time (digests only), masking secrets.
- records.py: keys and accounts made or changed through the API, stored in the ledger database
  and applied over api.yaml (the one rule for where API changes live).
- admin.py: what an admin does to keys (make, change, rotate, delete), validated as api.yaml.
- accounts.py: the same for accounts (make, change, delete).
- self_service.py: what a key holder may do to the keys of their own account.
- states.py: a key's or account's billing state as the APIs and pages show it.

Keys themselves are parsed with the rest of api.yaml (core/config/__init__.py: `read_key`, `read_account`).
"""
