"""Celery workers: the embedding and evaluation jobs of the service."""
