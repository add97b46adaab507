"""arcourse."""
