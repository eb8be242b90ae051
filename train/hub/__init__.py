"""Everything that turns a trained ProCLIP folder into something others use: build from towers, convert upstream
checkpoints, model cards, push, ONNX export, a Gradio Space, a local Inference Endpoints server."""
