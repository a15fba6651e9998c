"""The file formats the stages write and read (frame store, boxes, trajectories, pooled flow, features): below every stage."""
