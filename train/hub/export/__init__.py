"""A saved ProCLIP folder in other runtimes' formats: ONNX (`onnx`), transformers.js (`transformers_js`)."""
