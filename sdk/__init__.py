"""podtrain's SDK: verified checkpoints on any object store and exact resume."""
