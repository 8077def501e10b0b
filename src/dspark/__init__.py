"""dspark: lossless speculative decoding with semi-autoregressive DSpark drafters.

Importing the package is cheap; torch and transformers load only when a model is used.
"""

__version__ = "0.1.0"
