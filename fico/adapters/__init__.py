"""Model adapters: everything model-specific lives here, nothing method-specific."""
