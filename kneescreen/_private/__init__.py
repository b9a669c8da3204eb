"""Internal helpers shared by the layers above; not part of the public surface."""
