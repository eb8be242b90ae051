"""Serving a saved folder on this machine as Inference Endpoints serve it: the server (`serve`) and the worker process
that imports the checkpoint's own handler.py and answers its requests (`endpoint_worker`)."""
