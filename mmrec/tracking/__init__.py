"""MLflow runs: one run and its logging (run), the store and its faults (store), where it is (location), the
parent run of a pipeline execution (pipeline_run), runs side by side (compare) and loss plots (plots)."""
