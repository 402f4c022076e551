"""splitc.cost_models."""
