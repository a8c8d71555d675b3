"""The contract between aic services: schemas, pixel formats, bus, codecs, quality, config."""
