"""Evaluation: the WORLD.md metrics (`metrics`) and the `anymodal eval` runner (`run.evaluate`)."""
