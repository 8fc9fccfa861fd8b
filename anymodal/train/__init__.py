"""anymodal.train."""
