"""The services of the running process: stages on queues, the watcher, disk and HTTP."""
