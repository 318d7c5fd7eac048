"""One file per model family (:class:`fico.adapters.ModelFamily`); each registers itself with
``@fico.hookimpl fico_model_families``."""
