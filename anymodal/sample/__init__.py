"""anymodal.sample."""
