"""The learned codec: layers, entropy models and models, kept apart as in CompressAI.

Importing this package imports torch; only the compressor, the receiver and the
tools that code with the neural codec do so.
"""
