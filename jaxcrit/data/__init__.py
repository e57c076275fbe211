"""Text -> token ids, the way transformers tokenizes for the same checkpoint."""
