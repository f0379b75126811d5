"""What a run leaves and how it is read again: run directories, checkpoints, the sweep
leaderboard."""
