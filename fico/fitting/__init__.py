"""Calibration procedures that fit a method's schedule on a model (FitPrune's tables)."""
