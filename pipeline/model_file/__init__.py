"""The final model file: saving it with its metadata, and loading it back for predict, evaluate and export."""
