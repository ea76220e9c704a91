"""MLflow tracking of a shadow run: the only package (with `shadow report`) that imports MLflow.

`tracker.MlflowTracker` (the controller callback) -> `spool.Spool` (write-ahead log in the run
directory) -> `worker.TrackingWorker` (background thread) -> `sender.MlflowSender` (MLflow client).
`keys` says what records look like in MLflow, `state` which MLflow runs belong to a run directory,
`uri` where they go and how to print a URI without its credentials.
"""
