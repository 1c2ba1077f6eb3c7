"""Telling clients: signed webhooks and their outbox."""
