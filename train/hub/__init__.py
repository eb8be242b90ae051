"""Everything that faces the Hub: the Gradio Space of a checkpoint (`space.py`) and a local server for its Inference
Endpoints handler (`serve.py`)."""
