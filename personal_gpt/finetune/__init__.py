"""Fine-tuning a GPT on a creator's own examples: reading and checking the
training data (data, formats), drafting pairs from knowledge passages (pairs)."""
