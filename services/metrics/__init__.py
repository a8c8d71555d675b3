"""The metrics service: JetStream metrics records → PostgreSQL, exactly one row per batch."""

from services.metrics.writer import MetricsWriter

__all__ = ["MetricsWriter"]
