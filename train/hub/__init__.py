"""Everything that turns a trained ProCLIP folder into something others use, one subpackage per concern:

    build/    make a folder: from towers (`init`), from upstream checkpoints (`convert`)
    export/   other runtimes' formats (ONNX)
    serving/  a local Inference Endpoints server for the folder's handler
    space/    a Gradio Space for the folder
    publish/  results, the model card, the push to the Hub

They import the floors below (evaluation, training, the model files), never cli or demo; `space` reads `publish`'s
card and results.
"""
