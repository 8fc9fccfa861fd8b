"""anymodal.data."""
