"""Answers from the usage ledger: monthly usage, anomalies, model-switch recommendations."""
