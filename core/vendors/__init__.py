"""The vendor side of the money: what each provider (a vendor account) costs the operator.

Each request's vendor cost is priced when it settles (core.pricing.vendor) and stored in its
ledger row; `months.py` keeps each budgeted provider's spend this calendar month for routing
(`budget_action: stop`) and alerts; `states.py` reads the ledger's provider rollup for the
admin API, the Providers page and its CSV export.
"""
