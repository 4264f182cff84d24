"""Task heads and their post-processing: classification and token classification (NER)."""
