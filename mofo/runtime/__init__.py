"""What training and evaluation share when they run: distributed context, device and precision, seeding, the stages' datasets and loaders."""
