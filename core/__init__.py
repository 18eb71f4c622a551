"""Tollgate's domain: config, routing, providers, metering. Nothing here knows about HTTP routes."""
