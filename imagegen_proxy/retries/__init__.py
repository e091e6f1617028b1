"""Retries that never pay twice: the idempotency registry and its recordings."""
