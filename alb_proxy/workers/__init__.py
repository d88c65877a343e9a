"""Worker processes: the supervisor in the control plane, the worker main, their channel."""
