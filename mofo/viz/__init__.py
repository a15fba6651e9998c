"""Drawing only: reconstruction, confusion and motion pictures."""
