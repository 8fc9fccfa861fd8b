"""anymodal: a unified early-fusion any-to-any model trained from scratch.

Text, images, audio and box coordinates become one discrete token stream that a
decoder-only transformer learns by next-token prediction.
"""

__version__ = "0.1.0"
