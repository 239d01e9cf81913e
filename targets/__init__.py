"""Target descriptions, one small module per board."""
