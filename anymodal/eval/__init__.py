"""anymodal.eval."""
