"""Process supervision: starts the executor and the router, restarts a dead executor, drains."""
