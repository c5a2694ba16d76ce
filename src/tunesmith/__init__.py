"""tunesmith: from a labelled dataset to a fine-tuned, evaluated, versioned and served language model."""

__version__ = "0.1.0"
