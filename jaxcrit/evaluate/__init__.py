"""What a neuron set does to the model: perplexity, generation, lm-eval tasks."""
