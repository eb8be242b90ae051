"""A Gradio Space for a saved ProCLIP folder: the folder it writes (`space`) and the app that runs in it (`space_app`,
copied as the Space's app.py)."""
