"""Integrations with model libraries: ``distfuse.integrations.transformers`` (HuggingFace)."""
