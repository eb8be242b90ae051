"""proclip_train: everything around the ProCLIP model, as subpackages whose imports point one way.

    cli/         the `proclip` command: one thin argparse module per verb (the only place argparse lives)
    demo/        the embedded default: synthetic world, teacher CLIP, real small LLM, end to end on a CPU
    hub/         build from towers, convert upstream checkpoints, model cards, push to the Hub
    evaluation/  metrics, evaluation tasks, any text tower as an embedder, prompt templates, `evaluate` modules
    training/    arguments, losses, curriculum stages, the Trainer, data, collators, the embedding cache, stage 0

cli -> demo -> hub -> evaluation -> training -> the model files (`modeling_proclip`, `configuration_proclip`).
"""
