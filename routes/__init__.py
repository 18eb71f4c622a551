"""Thin HTTP layer: parse the request, call core/, shape the response."""
