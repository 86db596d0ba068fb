"""One module per arrow of the data flow: read formats -> call kernels -> write formats."""
