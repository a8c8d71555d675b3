"""aic services: ingest (gateway), compressor (workers), metrics (PostgreSQL), receiver (decode)."""
