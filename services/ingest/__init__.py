"""The gateway: any PyAV source → yuv420p frame batches (closed GOPs) on JetStream."""

from services.ingest.gateway import IngestStats, ingest, open_source, read_batches

__all__ = ["IngestStats", "ingest", "open_source", "read_batches"]
