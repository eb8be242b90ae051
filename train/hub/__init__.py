"""Everything that turns a trained ProCLIP folder into something others use: build from towers, convert upstream
checkpoints, model cards, push, ONNX export."""
