"""deepfleet: a checked path from a few GPU servers to a fine-tuned LLM trained across all of them."""

__version__ = "0.1.0"
