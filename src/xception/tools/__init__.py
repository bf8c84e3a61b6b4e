"""The commands that are not training or evaluation: demo, predict, export, bench (compute and input pipeline), prepare."""
