"""proclip_train: everything around the ProCLIP model, as subpackages whose imports point one way.

    cli/         the `proclip` command: one thin argparse module per verb (the only place argparse lives)
    demo/        the embedded default: synthetic world, teacher CLIP, real small LLM, end to end on a CPU
    hub/         build (from towers, upstream checkpoints), export (ONNX), serving, space, publish (card, push)
    evaluation/  metrics, evaluation tasks, any text tower as an embedder, prompt templates, `evaluate` modules
    training/    arguments, losses, curriculum stages, the Trainer, data, collators, the embedding cache, stage 0,
                 and the names the CLI, the arguments and the demo share (`registry`)

cli -> demo -> hub -> evaluation -> training -> the model files (`modeling_proclip`, `configuration_proclip`); only
`cli/demo.py` imports the demo (tests/unit/test_layout.py).
"""
