"""Admission control: budgets and rate limits per tenant, end user and system key."""
