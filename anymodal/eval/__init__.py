"""Evaluation: the docs/world.md metrics (`metrics`) and the `anymodal eval` runner (`run.evaluate`)."""
