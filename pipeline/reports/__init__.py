"""What a run tells you: history.csv and TensorBoard, the report, metrics, plots, the console summary."""
