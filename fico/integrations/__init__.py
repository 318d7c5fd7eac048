"""Bridges from fico to evaluation frameworks.

``fico.integrations.lmms`` registers fico as an lmms-eval model (``--model fico``) and
writes the toy VQA task; it imports nothing from lmms-eval until lmms-eval asks for the
model, so fico works without it. ``fico.integrations.lmms_model`` is the model class.
"""
