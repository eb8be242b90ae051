"""Publishing to the Hub: evaluation results (`results`), the model card (`card`), the checked upload (`push`)."""
