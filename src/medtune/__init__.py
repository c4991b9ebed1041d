"""medtune: adapt LLMs to Chinese medicine and measure that it worked."""

__version__ = "0.1.0"
