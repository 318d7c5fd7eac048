"""Root pytest configuration: what doctest collection over ``fico/`` must skip."""

import importlib.util

# the lmms-eval model class imports lmms_eval at module level; without `make lmms` it is not importable
collect_ignore = [] if importlib.util.find_spec("lmms_eval") else ["fico/integrations/lmms_model.py"]
