"""Errors that end the service."""

from __future__ import annotations


class FatalError(Exception):
    """Stops the service with one line for the operator and a non-zero exit."""
