"""The Hub side: build a checkpoint from towers, convert upstream checkpoints, model cards, push."""
