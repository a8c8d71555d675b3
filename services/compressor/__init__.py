"""Compressor workers: pull frame batches, code them, measure them, publish results."""

from services.compressor.worker import Compressor, process_batch

__all__ = ["Compressor", "process_batch"]
