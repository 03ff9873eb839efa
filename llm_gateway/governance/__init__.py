"""Admission control: budgets and rate limits per tenant, end user, system key and virtual key."""

from .keys import KeyQuota

__all__ = ["KeyQuota"]
